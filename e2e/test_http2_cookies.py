"""The token cookie when the Cookie header arrives in pieces (SECURITY.md, Gaps 11).

HTTP/2 lets a client split the Cookie header into several `cookie` header fields ("crumbs",
RFC 9113 8.2.3); HTTP/1.1 clients sometimes send several `Cookie:` lines. Either way the cookie
list is one list: a token cookie in the second piece must authenticate exactly as in
`e2e/test_core.py: test_token_via_cookie`, and it must not show up in Envoy's logs.

curl joins cookies into one field, so the HTTP/2 requests here are made with hyper-h2 (`h2`,
installed into .venv by `make envoy`) over a plain socket (h2c with prior knowledge), and the
client checks by decoding its own HEADERS frame that the crumbs really left as separate fields.
"""
import re
import time

import pytest

from helpers import h2_get, http1_request, marker, new_token, sub_of
from test_core import assert_allowed
from servers.jwtutil import topic_id

NEWS = topic_id("news")
COOKIE = "revenprox_token"  # the default token.cookie


# ----------------------------------------------------------------------------------------------
# assertions
# ----------------------------------------------------------------------------------------------
def assert_crumbs_sent(sent, crumbs):
    """The client really sent one `cookie` field per crumb, in order (not one joined field)."""
    assert [v for k, v in sent if k == "cookie"] == crumbs, sent


def upstream_cookies(upstream, m):
    reqs = upstream.requests_containing(m)
    assert len(reqs) == 1, f"expected one request at the upstream, got {len(reqs)}"
    return reqs[0].header_all("cookie")


def assert_not_logged(env, m, tok):
    """As the run's token-leak scan (e2e/conftest.py) does for every token at the end: the cookie's
    token appears in neither Envoy's log nor its access log (waiting for the request's access-log
    line first)."""
    line = env.wait_log(m, timeout=5.0, access=True)
    assert line is not None, f"the request ({m}) never reached the access log"
    text = env.access_log() + "\n" + env.envoy_log()
    assert tok not in text, [ln[:200] for ln in text.splitlines() if tok in ln][:3]


# ----------------------------------------------------------------------------------------------
# HTTP/2 crumbs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("before,after", [
    (["theme=dark"], []),
    (["theme=dark"], ["lang=fr"]),
    (["theme=dark", "session=abc"], ["lang=fr"]),
], ids=["second_of_two", "second_of_three", "third_of_four"])
def test_h2_token_cookie_in_a_later_crumb(env, webhook, upstream, before, after):
    tok = new_token("crumb")
    m = marker()
    crumbs = [*before, f"{COOKIE}={tok}", *after]
    r, sent = h2_get(env.port, f"/events/news?{m}", [("cookie", c) for c in crumbs], until_first_event=True)
    assert_crumbs_sent(sent, crumbs)
    assert r.http_version == "2"
    assert_allowed(r, sub_of(tok))
    calls = webhook.calls_for(tok)
    assert len(calls) == 1 and calls[0].topic == NEWS, calls
    # RFC 9113 8.2.3: forwarded to HTTP/1.1, the crumbs become one Cookie field joined by "; ",
    # in order (Envoy's codec reassembles them before any filter runs) — without the token
    # cookie, which stays with the filter (token.forward_to_upstream is false by default).
    assert upstream_cookies(upstream, m) == ["; ".join(c for c in crumbs if not c.startswith(f"{COOKIE}="))]
    assert_not_logged(env, m, tok)


def test_h2_same_prefix_cookie_in_first_crumb_is_not_the_token(env, webhook, upstream):
    # `revenprox_tokenx` is another cookie: the token is the exact name in the second crumb.
    tok = new_token("crumbprefix")
    m = marker()
    crumbs = [f"{COOKIE}x=1", f"{COOKIE}={tok}"]
    r, sent = h2_get(env.port, f"/events/news?{m}", [("cookie", c) for c in crumbs], until_first_event=True)
    assert_crumbs_sent(sent, crumbs)
    assert_allowed(r, sub_of(tok))
    assert [c.jwt for c in webhook.calls if c.jwt in ("1", tok)] == [tok]
    # Only the token cookie leaves: its look-alike is another cookie and goes on.
    assert upstream_cookies(upstream, m) == [f"{COOKIE}x=1"]
    assert_not_logged(env, m, tok)


def test_h2_only_look_alike_cookies_in_crumbs_is_missing_token(env, webhook, upstream):
    # Control: a JWT under a look-alike name in any crumb is no token (401, nothing forwarded).
    tok = new_token("crumblookalike")
    m = marker()
    crumbs = [f"{COOKIE}x=1", f"x{COOKIE}={tok}", f"{COOKIE}_old={tok}"]
    r, sent = h2_get(env.port, f"/events/news?{m}", [("cookie", c) for c in crumbs], until_first_event=True)
    assert_crumbs_sent(sent, crumbs)
    assert r.status == 401, r
    assert r.json()["error"] == "missing_token", r.body
    assert webhook.calls_for(tok) == []
    time.sleep(0.05)
    assert upstream.requests_containing(m) == []
    assert_not_logged(env, m, tok)


# ----------------------------------------------------------------------------------------------
# HTTP/1.1: several Cookie lines
# ----------------------------------------------------------------------------------------------
def test_http1_token_cookie_in_second_cookie_line(env, webhook, upstream):
    tok = new_token("cookielines")
    m = marker()
    lines = ["theme=dark", f"{COOKIE}={tok}"]
    r = http1_request(env.port, f"/events/news?{m}", [("Cookie", c) for c in lines])
    assert_allowed(r, sub_of(tok))
    calls = webhook.calls_for(tok)
    assert len(calls) == 1 and calls[0].topic == NEWS, calls
    # Whatever shape Envoy gives them upstream, no other cookie is lost and the order stays; the
    # token cookie stays with the filter.
    got = "; ".join(upstream_cookies(upstream, m))
    assert re.split(r";\s*", got) == lines[:1], got
    assert_not_logged(env, m, tok)
