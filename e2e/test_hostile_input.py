r"""Hostile request bytes through a real Envoy 1.40 (SECURITY.md, Gaps 1-4 and 10), and the paths
that used to route around the filter.

Every request here is written byte by byte, over a raw HTTP/1.1 socket or an HTTP/2 (h2c)
connection with the `h2` library's validation off, so that no client library normalizes, escapes
or refuses the path or a header first. Two Envoys, both rendered from envoy/revenprox.yaml.tmpl:

- `env`, the shipped configuration: `normalize_path: true`, `merge_slashes: true`,
  `path_with_escaped_slashes_action: REJECT_REQUEST` resolve or refuse a path before the route
  table and the filter see it;
- `raw_env`, the same with NORMALIZE_PATH=false and ESCAPED_SLASHES_ACTION=KEEP_UNCHANGED: the
  filter gets dot segments, `%2F` and `%5C` exactly as sent, so the filter's OWN refusal is what
  its tests see. A test configuration, never a deployable one (see section 5).

Per class of hostile input:

- dot segments in every form the filter refuses (backslash, `;x` parameters, an invalid escape
  hiding encoded dots, double and triple encoding, overlong UTF-8, Unicode look-alikes), sent with
  a VALID token: on `raw_env` 404 `no_topic`, no webhook call, never forwarded; on `env` exactly
  what Envoy makes of each path first, and never 200 for a topic other than the one authorized;
- `:path` bytes that are not UTF-8: on `raw_env` never 200, on `env` pinned per path; the token in
  the URL reaches neither the upstream nor Envoy's logs;
- `Authorization` / `Cookie` bytes that are not UTF-8: 401, never 200;
- `;` inside a query parameter: a token behind it is never read, and never reaches the upstream
  or the access log;
- non-canonical spellings of `/events/<topic>` (`//events/news`, `/x/../events/news`,
  `/Events/news`, ...): never served without a token, never reach the upstream unchecked.

After each hostile request the wasm VM must not have failed and a normal request must still be
served (`assert_vm_healthy_and_serving`).

What Envoy 1.40 itself does with these bytes (pinned by the tests, so a change shows up):
- HTTP/1.1: a literal `\` in the request target is accepted; any byte >= 0x80 in the request
  target is refused by Envoy's codec with `400 Bad Request` (access log: `400 DPE
  http1.codec_error`, path `-`) before any filter runs. Bytes >= 0x80 in header values (obs-text)
  are accepted and reach the filter.
- HTTP/2: bytes >= 0x80 in `:path` are accepted; without normalization they reach the filter as
  they are, with it Envoy percent-encodes them first (`news\xff` -> `news%FF`).
- normalize_path turns `\` into `/`, decodes `%2e` and unreserved escapes, resolves `.`/`..`
  (also `..;x`), leaves `%25`, overlong UTF-8, look-alikes and `%2e%2e;x=1` alone.
- REJECT_REQUEST: `%2F`, `%5C` (any case) anywhere in the path -> 400, response details
  `path_normalization_failed`, before routing and filters.
"""
import socket
import uuid
from http.client import HTTPResponse

import pytest

import helpers
from helpers import Response, latin1_bytes, h2_get, new_token, sub_of
from servers.jwtutil import topic_id
from test_core import assert_allowed, assert_error, assert_not_forwarded, only_on, raw_path_envoy
from test_faults import assert_vm_healthy_and_serving

NEWS = topic_id("news")
SECRET = topic_id("secret")
PROTOCOLS = ["h1", "h2"]


# ----------------------------------------------------------------------------------------------
# raw clients
# ----------------------------------------------------------------------------------------------
def raw_h1(port, path, headers=(), timeout=5.0):
    """One GET written byte for byte on a fresh HTTP/1.1 connection; path and header values are
    bytes (or latin-1 str) sent exactly as given."""
    req = b"GET " + latin1_bytes(path) + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for k, v in headers:
        req += latin1_bytes(k) + b": " + latin1_bytes(v) + b"\r\n"
    req += b"Connection: close\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(req)
        resp = HTTPResponse(sock, method="GET")
        resp.begin()
        body = resp.read()
        return Response(resp.status, resp.getheaders(), body, "1.1")
    finally:
        sock.close()


def raw_h2(port, path, headers=(), timeout=5.0):
    """One GET over HTTP/2 (h2c) with every client-side header check off, so the `:path` and header
    bytes reach Envoy exactly as given; read to the end of the stream."""
    return h2_get(port, path, headers, timeout)[0]


def send(env, proto, path, headers=()):
    return (raw_h1 if proto == "h1" else raw_h2)(env.port, path, headers)


def marker():
    """A unique value for `m=` in the query (the tests here write `m=` themselves)."""
    return uuid.uuid4().hex


def hdr(tok, scheme="Bearer"):
    return [("Authorization", f"{scheme} {tok}")]


# Envoy's own 400s before any filter have no marker of the request in their access-log line (the
# codec's has no path, a rejected path's has no query): a test finds its line by counting these.
CODEC_ERROR = "http1.codec_error"
PATH_REJECTED = "path_normalization_failed"


def envoy_400_counts(env):
    """How many access-log lines of each of Envoy's own 400s there are now (take it before the
    request; the test before this one waited for its own line, so none is still on its way)."""
    return {k: env.log_count(k, access=True) for k in (CODEC_ERROR, PATH_REJECTED)}


def access_line_of(env, m):
    """The access-log line of the request carrying marker `m` (waits for it, fails after 5 s)."""
    lines = env.access_lines(m)
    assert len(lines) == 1, lines
    return lines[0]


def assert_not_in_logs(env, *secrets):
    """No secret in Envoy's log or access log. Call it once the request's own access-log line was
    waited for (access_line_of, assert_rejected_path, assert_refused_by_envoy_codec): the logs then
    cover the request."""
    text = env.access_log() + "\n" + env.envoy_log()
    for s in secrets:
        where = [ln[:200] for ln in text.splitlines() if s in ln][:2]
        assert s not in text, f"credential found in Envoy's logs: {where}"


def assert_upstream_never_saw(upstream, *secrets):
    for s in secrets:
        got = upstream.requests_containing(s)
        assert got == [], f"the upstream received the credential: {[(r.method, r.path) for r in got]}"


def assert_normal_request_works(env, proto, tok):
    """The token used for the hostile request is valid: the same token on the plain topic passes."""
    r = send(env, proto, "/events/news", hdr(tok))
    assert_allowed(r, sub_of(tok))


def has_raw_high_bytes(raw_path):
    return any(b >= 0x80 for b in raw_path)


def assert_refused_by_envoy_codec(env, r, before):
    """Envoy's HTTP/1 codec refuses raw bytes >= 0x80 in the request target before any filter.
    `before`: envoy_400_counts() taken before the request."""
    assert r.status == 400, r
    lines = env.access_lines(CODEC_ERROR, more_than=before[CODEC_ERROR])
    assert " 400 " in lines[-1], lines[-1]


def assert_rejected_path(env, r, before, m):
    """400 from path_with_escaped_slashes_action: REJECT_REQUEST, before routing and filters; the
    access log has the line WITHOUT the query (the filter never ran to strip a token from it).
    `before`: envoy_400_counts() taken before the request."""
    assert r.status == 400 and r.body == b"", r
    lines = env.access_lines(PATH_REJECTED, more_than=before[PATH_REJECTED])
    assert " 400 " in lines[-1], lines[-1]
    logged = [ln for ln in env.access_log().splitlines() if m in ln]
    assert not logged, f"query of a rejected path logged: {logged}"


@pytest.fixture(scope="module")
def raw_env(envoys):
    """The template with Envoy's path handling off: the filter gets the path as sent."""
    return raw_path_envoy(envoys)


# ----------------------------------------------------------------------------------------------
# 1. dot segments (core/src/auth/topic.rs: dot_segments_name_no_topic), sent with a VALID token.
#    test_core.py: test_dot_segments_are_not_authorized_as_the_first_topic has `../`, `%2e%2e/`
#    and `..%2f`; these are the other forms.
# ----------------------------------------------------------------------------------------------
DOT_PATHS = [
    # backslash as a separator (IIS, some Windows-minded servers)
    "/events/news/..\\secret",
    "/events/news\\..\\secret",
    "/events/news/%2e%2e\\secret",
    "/events/news/..%5csecret",
    # `;` path parameters (Servlet containers drop them before resolving dots)
    "/events/news/..;x/secret",
    "/events/news/%2e%2e;jsessionid=1/secret",
    # an invalid escape in the same segment must not hide the encoded dots from the check
    "/events/news/%zz\\%2e%2e\\secret",
    "/events/news/%2e%2e%2f%zz",
    # double and triple encoding (upstreams that decode more than once)
    "/events/news/%252e%252e/secret",
    "/events/news/%25252e%25252E/secret",
    "/events/news/..%252fsecret",
    # overlong UTF-8 encodings of `.` and `/`
    "/events/news/%c0%ae%c0%ae/secret",
    "/events/news/%e0%80%ae%e0%80%ae/secret",
    # Unicode look-alikes: FULLWIDTH FULL STOP, ONE DOT LEADER, FULLWIDTH SOLIDUS
    "/events/news/%ef%bc%8e%ef%bc%8e/secret",
    "/events/news/%e2%80%a4%e2%80%a4/secret",
    "/events/news/..%c0%afsecret",
    "/events/news/..%ef%bc%8fsecret",
    # the same look-alikes as raw UTF-8 bytes, not percent-encoded
    "/events/news/\uff0e\uff0e/secret",
    "/events/news/\u2024\u2024/secret",
    "/events/news/..\uff0fsecret",
]


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("path", DOT_PATHS)
def test_dot_segment_variants_name_no_topic(raw_env, webhook, upstream, proto, path):
    # The filter's own refusal: Envoy hands it the path as sent (raw_env).
    env = raw_env
    tok = new_token("dotvar")
    m = marker()
    raw_path = path.encode("utf-8") + f"?m={m}".encode()
    before = envoy_400_counts(env)
    r = send(env, proto, raw_path, hdr(tok))
    assert r.status != 200, f"{path!r} over {proto} was let through: {r}"
    if proto == "h1" and has_raw_high_bytes(raw_path):
        assert_refused_by_envoy_codec(env, r, before)
    else:
        assert_error(r, 404, "no_topic")
        assert " 404 " in access_line_of(env, m)
    assert webhook.calls_for(tok) == [], "a path that names no topic was sent to the webhook"
    assert_not_forwarded(upstream, m)
    assert_upstream_never_saw(upstream, tok)
    # the token was valid all along: the 404 came from the path alone
    assert_normal_request_works(env, proto, tok)
    assert [c.topic for c in webhook.calls_for(tok)] == [NEWS]
    assert_vm_healthy_and_serving(env)


# What the SHIPPED template makes of each DOT_PATHS entry before the filter sees it:
#   ("topic", seg, path)  normalize_path resolved it; the filter authorizes topic `seg` and the
#                         upstream gets `path`
#   "no_topic"            Envoy leaves it alone; the filter refuses it (404)
#   "rejected"            %2F / %5C: 400 from Envoy (REJECT_REQUEST)
# (HTTP/1.1 with raw bytes >= 0x80: the codec's 400, whatever the entry says.)
TO_SECRET = ("topic", "secret", "/events/secret")
DOT_PATHS_SHIPPED = {
    "/events/news/..\\secret": TO_SECRET,
    "/events/news\\..\\secret": TO_SECRET,
    "/events/news/%2e%2e\\secret": TO_SECRET,
    "/events/news/..%5csecret": "rejected",
    "/events/news/..;x/secret": TO_SECRET,
    "/events/news/%2e%2e;jsessionid=1/secret": "no_topic",
    "/events/news/%zz\\%2e%2e\\secret": ("topic", "news", "/events/news/secret"),  # `..` eats `%zz`
    "/events/news/%2e%2e%2f%zz": "rejected",
    "/events/news/%252e%252e/secret": "no_topic",
    "/events/news/%25252e%25252E/secret": "no_topic",
    "/events/news/..%252fsecret": "no_topic",
    "/events/news/%c0%ae%c0%ae/secret": "no_topic",
    "/events/news/%e0%80%ae%e0%80%ae/secret": "no_topic",
    "/events/news/%ef%bc%8e%ef%bc%8e/secret": "no_topic",
    "/events/news/%e2%80%a4%e2%80%a4/secret": "no_topic",
    "/events/news/..%c0%afsecret": "no_topic",
    "/events/news/..%ef%bc%8fsecret": "no_topic",
    "/events/news/\uff0e\uff0e/secret": "no_topic",
    "/events/news/\u2024\u2024/secret": "no_topic",
    "/events/news/..\uff0fsecret": "no_topic",
}


def test_every_dot_path_has_a_shipped_outcome():
    assert list(DOT_PATHS_SHIPPED) == DOT_PATHS


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("path", DOT_PATHS)
def test_dot_segment_variants_with_the_shipped_normalization(env, webhook, upstream, proto, path):
    # Never 200 for a topic other than the one authorized: a token that may read `news` only is
    # refused wherever Envoy resolved the dots to another topic.
    tok = new_token("dotnorm")
    webhook.program(tok, only_on(NEWS))
    m = marker()
    raw_path = path.encode("utf-8") + f"?m={m}".encode()
    before = envoy_400_counts(env)
    r = send(env, proto, raw_path, hdr(tok))
    outcome = DOT_PATHS_SHIPPED[path]
    if proto == "h1" and has_raw_high_bytes(raw_path):
        assert_refused_by_envoy_codec(env, r, before)
        outcome = "codec"
    elif outcome == "rejected":
        assert_rejected_path(env, r, before, m)
    elif outcome == "no_topic":
        assert_error(r, 404, "no_topic")
    else:
        _, seg, served = outcome
        assert [c.topic for c in webhook.calls_for(tok)] == [topic_id(seg)]
        if seg == "news":
            echo = assert_allowed(r, "only-" + NEWS[:8])
            assert echo["path"] == f"{served}?m={m}"
            assert [q.path for q in upstream.requests_containing(m)] == [f"{served}?m={m}"]
        else:
            assert_error(r, 401, "invalid_token")
            assert_not_forwarded(upstream, m)
            assert_upstream_never_saw(upstream, tok)
            # a token allowed on `seg` is served exactly what it was checked for
            other = new_token("dotnorm-any")
            m2 = marker()
            r = send(env, proto, path.encode("utf-8") + f"?m={m2}".encode(), hdr(other))
            echo = assert_allowed(r, sub_of(other))
            assert echo["path"] == f"{served}?m={m2}"
            assert [q.path for q in upstream.requests_containing(m2)] == [f"{served}?m={m2}"]
            assert [c.topic for c in webhook.calls_for(other)] == [topic_id(seg)]
    if not isinstance(outcome, tuple):
        assert webhook.calls_for(tok) == []
        assert_not_forwarded(upstream, m)
        assert_upstream_never_saw(upstream, tok)
    assert_vm_healthy_and_serving(env)


# ----------------------------------------------------------------------------------------------
# 2. :path bytes that are not UTF-8, token in the URL
# ----------------------------------------------------------------------------------------------
NON_UTF8_PATHS = [
    b"/events/news\xff?token={tok}&m={m}",
    b"/events/news/\xc0\xae\xc0\xae/secret?token={tok}&m={m}",  # raw overlong dots
    b"/events/\x80\xfe?m={m}&access_token={tok}",
    b"/events/news?m={m}&x=\xff&token={tok}",  # only the query is not UTF-8
    b"/events/news?m={m}&token={tok}\xff",  # the token parameter itself ends in a bad byte
]


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("template", NON_UTF8_PATHS, ids=lambda t: t.decode("latin-1").encode("unicode_escape").decode())
def test_non_utf8_path_is_never_served(raw_env, webhook, upstream, proto, template):
    # The bytes as sent, to the filter (raw_env): never served.
    env = raw_env
    tok = new_token("badpath")
    m = marker()
    raw_path = template.replace(b"{tok}", tok.encode()).replace(b"{m}", m.encode())
    before = envoy_400_counts(env)
    r = send(env, proto, raw_path)
    assert r.status != 200, f"{raw_path!r} over {proto} was let through: {r}"
    if proto == "h1":
        # Envoy's HTTP/1 codec: 400 before any filter; the access log has no path at all.
        assert_refused_by_envoy_codec(env, r, before)
    else:
        # HTTP/2 hands the bytes to the filter: 404 no_topic, the token stripped from the path
        # the access log records (the rest of the path is kept, bad bytes as U+FFFD).
        assert_error(r, 404, "no_topic")
        assert " 404 " in access_line_of(env, m)
    assert webhook.calls_for(tok) == []
    assert_not_forwarded(upstream, m)
    assert_upstream_never_saw(upstream, tok)
    assert_not_in_logs(env, tok)
    assert_normal_request_works(env, proto, tok)
    assert_vm_healthy_and_serving(env)


# The SHIPPED template over HTTP/2: normalize_path percent-encodes bytes >= 0x80 in the path part
# (not in the query) before the filter runs, so the filter sees a topic like `news%FF`: a topic of
# its own (id of the bytes `news\xff`), authorized as such, never as `news`.
NON_UTF8_SHIPPED_H2 = {
    NON_UTF8_PATHS[0]: ("topic", "news%FF"),
    NON_UTF8_PATHS[1]: "no_topic",  # -> %C0%AE%C0%AE: overlong dots, refused by the filter
    NON_UTF8_PATHS[2]: ("topic", "%80%FE"),
    NON_UTF8_PATHS[3]: "no_topic",  # the query is left alone: not UTF-8, the filter refuses it
    NON_UTF8_PATHS[4]: "no_topic",
}


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("template", NON_UTF8_PATHS, ids=lambda t: t.decode("latin-1").encode("unicode_escape").decode())
def test_non_utf8_path_with_the_shipped_normalization(env, webhook, upstream, proto, template):
    tok = new_token("badpath-norm")
    webhook.program(tok, only_on(NEWS))  # may read `news`, nothing else
    m = marker()
    raw_path = template.replace(b"{tok}", tok.encode()).replace(b"{m}", m.encode())
    before = envoy_400_counts(env)
    r = send(env, proto, raw_path)
    if proto == "h1":
        assert_refused_by_envoy_codec(env, r, before)
        assert webhook.calls_for(tok) == []
    elif NON_UTF8_SHIPPED_H2[template] == "no_topic":
        assert_error(r, 404, "no_topic")
        assert webhook.calls_for(tok) == []
        assert " 404 " in access_line_of(env, m)
    else:
        _, seg = NON_UTF8_SHIPPED_H2[template]
        assert_error(r, 401, "invalid_token")
        assert [c.topic for c in webhook.calls_for(tok)] == [topic_id(seg)]
        assert topic_id(seg) != NEWS
        line = access_line_of(env, m)
        assert f'"GET /events/{seg}?m={m} HTTP/2" 401' in line, line
    assert_not_forwarded(upstream, m)
    assert_upstream_never_saw(upstream, tok)
    assert_not_in_logs(env, tok)
    assert_vm_healthy_and_serving(env)


# ----------------------------------------------------------------------------------------------
# 3. header bytes that are not UTF-8
# ----------------------------------------------------------------------------------------------
BAD_HEADERS = {
    # a present Authorization that is not `Bearer <token>` (not even text): malformed_authorization
    "bearer_ff_fe": (lambda tok: [("Authorization", b"Bearer \xff\xfe" + tok.encode())], "malformed_authorization"),
    "bearer_jwt_then_80": (lambda tok: [("Authorization", b"Bearer " + tok.encode() + b"\x80")],
                           "malformed_authorization"),
    "bearer_scheme_ff": (lambda tok: [("Authorization", b"Bearer\xff " + tok.encode())], "malformed_authorization"),
    # a valid token in the query does not rescue a broken Authorization header
    "bearer_ff_with_query_token": (lambda tok: [("Authorization", b"Bearer \xff")], "malformed_authorization"),
    # a Cookie header that is not UTF-8 carries no token at all (the filter reads no cookie
    # from it, even the well-formed revenprox_token one): missing_token
    "cookie_ff_around_token": (lambda tok: [("Cookie", b"a=\xff; revenprox_token=" + tok.encode() + b"; b=\xfe\x80")],
                               "missing_token"),
    "cookie_token_value_80": (lambda tok: [("Cookie", b"revenprox_token=" + tok.encode() + b"\x80")],
                              "missing_token"),
    "cookie_name_ff": (lambda tok: [("Cookie", b"revenprox_token\xff=" + tok.encode())], "missing_token"),
}


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_non_utf8_header_bytes_are_refused(env, webhook, upstream, proto, case):
    tok = new_token("badhdr")
    make, code = BAD_HEADERS[case]
    m = marker()
    path = f"/events/news?m={m}"
    if case == "bearer_ff_with_query_token":
        other = new_token("badhdr-q")
        path += f"&token={other}"
    r = send(env, proto, path, make(tok))
    assert r.status != 200, f"{case} over {proto} was let through: {r}"
    assert_error(r, 401, code)
    assert " 401 " in access_line_of(env, m)
    assert webhook.calls_for(tok) == []
    assert_not_forwarded(upstream, m)
    assert_upstream_never_saw(upstream, tok)
    if case == "bearer_ff_with_query_token":
        assert webhook.calls_for(other) == []
        assert_not_in_logs(env, other)
    assert_not_in_logs(env, tok)
    assert_normal_request_works(env, proto, tok)
    assert_vm_healthy_and_serving(env)


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_cookie_with_utf8_neighbours_still_carries_the_token(env, webhook, proto):
    # The contrast to the cases above: bytes >= 0x80 that ARE UTF-8 (`é`, `€`) do not hide the
    # token cookie; only a Cookie header that is not UTF-8 does.
    tok = new_token("utf8cookie")
    cookie = "lang=fr-café; revenprox_token=" + tok + "; cur=€"
    r = send(env, proto, "/events/news", [("Cookie", cookie.encode("utf-8"))])
    assert_allowed(r, sub_of(tok))
    assert [c.topic for c in webhook.calls_for(tok)] == [NEWS]


# ----------------------------------------------------------------------------------------------
# 4. `;` inside the query (core/src/auth/token.rs: strip_params). Parameters are `&`-separated: a token
#    behind a `;` is not read, but is still removed from the path upstream and the access log see.
# ----------------------------------------------------------------------------------------------
SEMICOLON_QUERIES = [
    # (query with {tok} and {m}, what remains of it)
    ("m={m}&a=1;token={tok}", "m={m}&a=1"),
    ("m={m}&a=1;access_token={tok};b=2", "m={m}&a=1;b=2"),
    ("m={m}&a=1;%74oken={tok}", "m={m}&a=1"),  # percent-encoded parameter name
    ("a=1;token={tok}&m={m}", "a=1&m={m}"),
]


@pytest.mark.parametrize("query,kept", SEMICOLON_QUERIES)
def test_token_behind_semicolon_is_not_read_and_not_logged(env, webhook, upstream, query, kept):
    tok = new_token("semi")
    m = marker()
    q = query.format(tok=tok, m=m)
    r = raw_h1(env.port, f"/events/news?{q}")
    assert_error(r, 401, "missing_token")
    assert webhook.calls_for(tok) == [], "a token behind `;` was read"
    line = access_line_of(env, m)
    assert f'"GET /events/news?{kept.format(m=m)} HTTP/1.1" 401' in line, line
    assert_not_forwarded(upstream, m)
    assert_not_in_logs(env, tok)
    assert_normal_request_works(env, "h1", tok)
    assert_vm_healthy_and_serving(env)


def test_token_behind_semicolon_is_stripped_from_an_allowed_request(env, webhook, upstream):
    # Authorized by the header; the `;`-hidden second token must reach neither the upstream (an
    # upstream that splits on `;` would read it) nor the access log, nor the webhook.
    good, hidden = new_token("semi-hdr"), new_token("semi-hidden")
    m = marker()
    r = raw_h1(env.port, f"/events/news?m={m}&a=1;token={hidden}", hdr(good))
    echo = assert_allowed(r, sub_of(good))
    assert echo["path"] == f"/events/news?m={m}&a=1", echo["path"]
    assert [q.path for q in upstream.requests_containing(m)] == [f"/events/news?m={m}&a=1"]
    assert_upstream_never_saw(upstream, hidden)
    assert webhook.calls_for(hidden) == []
    assert [c.topic for c in webhook.calls_for(good)] == [NEWS]
    assert f'"GET /events/news?m={m}&a=1 HTTP/1.1" 200' in access_line_of(env, m)
    assert_not_in_logs(env, good, hidden)
    assert_vm_healthy_and_serving(env)


def test_first_token_wins_and_both_leave_the_path(env, webhook, upstream):
    first, second = new_token("semi-first"), new_token("semi-second")
    m = marker()
    r = raw_h1(env.port, f"/events/news?token={first}&b={m};access_token={second}")
    echo = assert_allowed(r, sub_of(first))
    assert echo["path"] == f"/events/news?b={m}", echo["path"]
    assert [c.topic for c in webhook.calls_for(first)] == [NEWS]
    assert webhook.calls_for(second) == [], "the `;`-separated token was read"
    assert_upstream_never_saw(upstream, first, second)
    line = access_line_of(env, m)
    assert f'"GET /events/news?b={m} HTTP/1.1" 200' in line, line
    assert_not_in_logs(env, first, second)
    assert_vm_healthy_and_serving(env)


# ----------------------------------------------------------------------------------------------
# 5. Topic paths that used to route around the filter. The template once routed every path that
#    did not start byte for byte with `/events/` to the catch-all route, where the filter is
#    DISABLED, and Envoy normalized nothing: `GET //events/news` without a token was served as a
#    live stream by this very test upstream (Python's http.server turns a leading `//` into `/`),
#    and an upstream that decodes unreserved escapes, resolves dot segments, drops `;` parameters,
#    reads `\` as `/` or ignores case served the others. Now the HCM normalizes (normalize_path,
#    merge_slashes), refuses escaped slashes (REJECT_REQUEST), and the guarded route is
#    `prefix: /events` case-insensitively: each spelling is either the canonical `/events/news`,
#    checked by the filter, or refused.
# ----------------------------------------------------------------------------------------------
# path -> "news": Envoy makes it /events/news (401 without a token; with one, the filter authorizes
#                 `news` and the upstream gets exactly /events/news)
#         "no_topic": the guarded route, but not /events/<topic>: 404 from the filter
#         "rejected": %2F / %5C: 400 from Envoy
ROUTED_AROUND = {
    "//events/news": "news",  # merge_slashes
    "/%65vents/news": "news",  # normalize_path: unreserved escape decoded
    "/x/../events/news": "news",  # normalize_path: dot segments
    "/./events/news": "news",
    "/events%2fnews": "rejected",
    "/events%2Fnews": "rejected",
    "/events\\news": "news",  # normalize_path: `\` is `/`
    "/events;x/news": "no_topic",  # prefix /events; the filter wants /events/<topic>
    "/Events/news": "no_topic",  # case-insensitive route, case-sensitive topic prefix
    "/EVENTS/news": "no_topic",
    "/events//news": "news",
    "/eventsfoo": "no_topic",
    "/events": "no_topic",
}


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("path", list(ROUTED_AROUND))
def test_topic_paths_routed_around_the_filter_are_not_served_unauthenticated(env, webhook, upstream, proto, path):
    m = marker()
    before = envoy_400_counts(env)
    r = send(env, proto, f"{path}?m={m}")  # no credential at all
    outcome = ROUTED_AROUND[path]
    if outcome == "news":
        assert_error(r, 401, "missing_token")
        line = access_line_of(env, m)
        assert f'"GET /events/news?m={m} HTTP/' in line and " 401 " in line, line
    elif outcome == "no_topic":
        assert_error(r, 404, "no_topic")
    else:
        assert_rejected_path(env, r, before, m)
    assert_not_forwarded(upstream, m)
    if outcome == "news":
        # with a token it is the ordinary topic stream: checked as `news`, served as /events/news
        tok = new_token("routed")
        m2 = marker()
        r = send(env, proto, f"{path}?m={m2}", hdr(tok))
        echo = assert_allowed(r, sub_of(tok))
        assert echo["path"] == f"/events/news?m={m2}"
        assert [q.path for q in upstream.requests_containing(m2)] == [f"/events/news?m={m2}"]
        assert [c.topic for c in webhook.calls_for(tok)] == [NEWS]


@pytest.mark.parametrize("path", ["/x/../events/news", "/./events/news", "/%65vents/news", "/%EF%BD%85vents/news",
                                  "//events/news", "/EVENTS/news", "/events;x/news", "/x/%2e%2e/events/news"])
def test_without_normalization_topic_spellings_are_still_refused(raw_env, webhook, upstream, path):
    # Even without Envoy's path hardening, no spelling of a topic path reaches the upstream on the
    # catch-all route: RevenProx runs on every route and reads the path as lenient upstreams would
    # (before: these were served unauthenticated through the catch-all route, where the filter
    # was disabled).
    # (`//events/news` is merged by Envoy, which the template always does: a topic without token.)
    m = marker()
    before = len(webhook.calls)
    r = raw_h1(raw_env.port, f"{path}?m={m}")
    assert (r.status, r.json()["error"]) in [(404, "no_topic"), (401, "missing_token")], r
    assert_not_forwarded(upstream, m)
    assert len(webhook.calls) == before


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("path,param", [("/events%2Fnews", "token"), ("/events/news/..%2fsecret", "access_token"),
                                        ("/events/news%5C", "ticket"), ("/events/news/%2e%2e%5Csecret", "token")])
def test_token_in_a_rejected_path_is_not_logged(env, webhook, upstream, proto, path, param):
    # REJECT_REQUEST answers before any filter: RevenProx never strips the query of such a
    # request, so the template logs these without the query.
    tok = new_token("rejected") if param != "ticket" else helpers.new_ticket()
    m = marker()
    before = envoy_400_counts(env)
    r = send(env, proto, f"{path}?{param}={tok}&m={m}")
    assert_rejected_path(env, r, before, m)
    assert webhook.calls_for(tok) == []
    assert_not_forwarded(upstream, m)
    assert_upstream_never_saw(upstream, tok)
    assert_not_in_logs(env, tok)

