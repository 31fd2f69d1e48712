"""RevenProx request path, end to end: client -> real Envoy + revenprox.wasm -> webhook / upstream.

Every test follows docs/contract.md. Tokens are unique per test (the verdict
cache is shared by all workers of one Envoy and lives as long as the module's Envoy).
"""
import concurrent.futures
import email.utils
import json
import re
import time
import uuid

import pytest

from helpers import closed_port, marker, new_ticket, new_token, sub_of
from servers.jwtutil import b64url, make_jwt, topic_id
from servers.webhook import Behaviour, invalid, valid

NEWS = topic_id("news")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def bearer(tok, scheme="Bearer"):
    return {"Authorization": f"{scheme} {tok}"}


def assert_allowed(r, user):
    assert r.status == 200, f"expected 200, got {r.status} {r.body[:300]!r}"
    assert (r.header("content-type") or "").startswith("text/event-stream"), r.headers
    echo = r.first_event_json()
    assert echo["headers"].get("x-revenprox-user") == user, echo
    return echo


def assert_error(r, status, code):
    assert r.status == status, f"expected {status} {code}, got {r.status} {r.body[:300]!r}"
    ctype = (r.header("content-type") or "").split(";")[0].strip().lower()
    assert ctype == "application/json", f"content-type {r.header('content-type')!r}"
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    if status == 401:
        www = r.header("www-authenticate")
        assert www is not None and www.split()[0] == "Bearer", f"WWW-Authenticate {www!r}"
    if status in (429, 503):
        ra = r.header("retry-after")
        assert ra, "Retry-After missing"
        assert re.fullmatch(r"\d+", ra.strip()) or email.utils.parsedate_tz(ra), f"Retry-After {ra!r}"
    return body


def assert_not_forwarded(upstream, needle):
    time.sleep(0.05)
    got = upstream.requests_containing(needle)
    assert got == [], f"request reached the upstream: {[(r.method, r.path) for r in got]}"


# ----------------------------------------------------------------------------------------------
# token channels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_token_via_authorization_header(env, webhook, scheme):
    tok = new_token("hdr")
    r = env.get("/events/news", bearer(tok, scheme))
    assert_allowed(r, sub_of(tok))
    calls = webhook.calls_for(tok)
    assert len(calls) == 1 and calls[0].topic == NEWS


@pytest.mark.parametrize("param", ["token", "access_token"])
def test_token_via_query_param(env, webhook, param):
    tok = new_token("q")
    r = env.get(f"/events/news?{param}={tok}")
    assert_allowed(r, sub_of(tok))
    assert len(webhook.calls_for(tok)) == 1


def test_token_via_cookie(env, webhook):
    tok = new_token("cookie")
    r = env.get("/events/news", {"Cookie": f"theme=dark; revenprox_token={tok}; lang=fr"})
    assert_allowed(r, sub_of(tok))
    assert len(webhook.calls_for(tok)) == 1


def test_token_via_ticket_param(env, webhook):
    t = new_ticket()
    webhook.program(t, valid("ticket-owner"))
    r = env.get(f"/events/news?ticket={t}")
    assert_allowed(r, "ticket-owner")
    calls = webhook.calls_for(t)
    # A ticket says so: the webhook can refuse one presented through a JWT channel.
    assert len(calls) == 1 and calls[0].body == json.dumps({"jwt": t, "topic": NEWS, "kind": "ticket"},
                                                           separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "case",
    [
        # header > query params (configured order) > ticket params > cookie
        "header_over_query",
        "header_over_cookie",
        "query_order_token_before_access_token",
        "query_over_ticket",
        "query_over_cookie",
        "ticket_over_cookie",
    ],
)
def test_token_precedence(env, webhook, case):
    a, b, c = new_token("a"), new_token("b"), new_token("c")
    t = new_ticket()
    webhook.program(t, valid("ticket-user-" + uuid.uuid4().hex[:6]))
    if case == "header_over_query":
        path, headers, winner = f"/events/news?token={b}", bearer(a), a
    elif case == "header_over_cookie":
        path, headers, winner = "/events/news", {**bearer(a), "Cookie": f"revenprox_token={c}"}, a
    elif case == "query_order_token_before_access_token":
        # the configured order is ["token", "access_token"]: order in the URL does not matter
        path, headers, winner = f"/events/news?access_token={b}&token={a}", {}, a
    elif case == "query_over_ticket":
        path, headers, winner = f"/events/news?ticket={t}&access_token={b}", {}, b
    elif case == "query_over_cookie":
        path, headers, winner = f"/events/news?access_token={b}", {"Cookie": f"revenprox_token={c}"}, b
    else:  # ticket_over_cookie
        path, headers, winner = f"/events/news?ticket={t}", {"Cookie": f"revenprox_token={c}"}, t
    r = env.get(path, headers)
    assert r.status == 200, r
    seen = [call.jwt for call in webhook.calls if call.jwt in (a, b, c, t)]
    assert seen == [winner], f"webhook saw {seen}, expected only the {case.split('_over_')[0]} credential"


# ----------------------------------------------------------------------------------------------
# the webhook call
# ----------------------------------------------------------------------------------------------
def test_webhook_call_is_exact(env, webhook):
    tok = new_token("exact")
    r = env.get("/events/news", bearer(tok))
    assert r.status == 200, r
    calls = webhook.calls_for(tok)
    assert len(calls) == 1
    c = calls[0]
    assert c.method == "POST"
    assert c.path == "/verify"
    assert c.header("host") == "auth.test"
    assert c.header("content-type") == "application/json"
    assert c.body == ('{"jwt":"%s","topic":"%s"}' % (tok, NEWS)).encode(), c.body


@pytest.mark.parametrize(
    "segment,expected",
    [
        ("news", topic_id("news")),
        ("caf%C3%A9", "850f7dc43910ff890f8879c0ed26fe69"),  # sha256("café")[:16], decoded first
        ("ABCDEF0123456789abcdef0123456789", "abcdef0123456789abcdef0123456789"),  # 32 hex: lowercased
        ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
        ("0123456789abcdef0123456789abcde", topic_id("0123456789abcdef0123456789abcde")),  # 31 hex: hashed
        ("hello%20world", topic_id("hello%20world")),
    ],
)
def test_topic_id_sent_to_webhook(env, webhook, segment, expected):
    assert topic_id(segment) == expected  # the harness itself agrees with the contract
    tok = new_token("topic")
    r = env.get(f"/events/{segment}", bearer(tok))
    assert r.status == 200, r
    calls = webhook.calls_for(tok)
    assert len(calls) == 1 and calls[0].topic == expected, [c.topic for c in calls]


def test_topic_is_first_segment_only(env, webhook):
    tok = new_token("seg")
    r = env.get("/events/news/sub/path?x=1", bearer(tok))
    assert r.status == 200, r
    assert [c.topic for c in webhook.calls_for(tok)] == [NEWS]
    assert r.first_event_json()["path"] == "/events/news/sub/path?x=1"


def test_http2_h2c_allowed_and_denied(env, webhook):
    tok = new_token("h2")
    r = env.get("/events/news", bearer(tok), http2=True)
    assert r.http_version == "2"
    assert_allowed(r, sub_of(tok))
    r = env.get("/events/news", http2=True)
    assert r.http_version == "2"
    assert_error(r, 401, "missing_token")


# ----------------------------------------------------------------------------------------------
# what reaches the upstream
# ----------------------------------------------------------------------------------------------
def test_user_header_set_and_client_value_removed(env, upstream):
    tok = new_token("spoof")
    m = marker()
    r = env.get(f"/events/news?{m}", {**bearer(tok), "X-RevenProx-User": "mallory", "x-revenprox-user": "eve"})
    assert_allowed(r, sub_of(tok))
    reqs = upstream.requests_containing(m)
    assert len(reqs) == 1
    assert reqs[0].header_all("x-revenprox-user") == [sub_of(tok)]


def test_denied_request_with_spoofed_user_never_reaches_upstream(env, upstream, webhook):
    m = marker()
    r = env.get(f"/events/news?{m}", {"x-revenprox-user": "mallory"})
    assert_error(r, 401, "missing_token")
    assert_not_forwarded(upstream, m)


def test_non_topic_paths_pass_without_identity_or_token(env, webhook, upstream):
    # topic.other_paths "pass" (the template runs the filter on every route): other paths go on
    # without a webhook call, without any client spelling of the identity header, and without
    # token parameters in the path the upstream and the access log see.
    before = len(webhook.calls)
    r = env.get("/health")
    assert r.status == 200 and r.body == b"ok"
    m = uuid.uuid4().hex
    r = env.get(f"/static/app.js?token=whatever&m={m}", {"x-revenprox-user": "admin", "x.revenprox.user": "admin"})
    assert r.status == 200 and r.text == f"upstream GET /static/app.js?m={m}\n", r
    seen = upstream.requests_containing(m)
    assert [q.path for q in seen] == [f"/static/app.js?m={m}"]
    names = {k.lower().replace("_", "-").replace(".", "-") for k, _ in seen[0].headers}
    assert "x-revenprox-user" not in names, seen[0].headers
    assert len(webhook.calls) == before
    assert "whatever" not in (env.wait_log(m, access=True) or "")


# ----------------------------------------------------------------------------------------------
# strip_from_upstream
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["token", "access_token"])
def test_strip_token_query_param(env, upstream, param):
    tok = new_token("strip")
    m = uuid.uuid4().hex
    r = env.get(f"/events/news?a=1&{param}={tok}&b={m}")
    assert r.status == 200, r
    echo = r.first_event_json()
    assert echo["path"] == f"/events/news?a=1&b={m}", echo["path"]
    reqs = upstream.requests_containing(m)
    assert [q.path for q in reqs] == [f"/events/news?a=1&b={m}"]
    log = env.wait_log(m, access=True)
    assert log is not None, "access log line not written"
    line = [ln for ln in log.splitlines() if m in ln][0]
    assert f"/events/news?a=1&b={m}" in line, line
    assert tok not in log


def test_strip_only_param(env, upstream):
    tok = new_token("strip1")
    r = env.get(f"/events/news?token={tok}")
    assert r.status == 200, r
    path = r.first_event_json()["path"]
    assert tok not in path
    assert path in ("/events/news", "/events/news?"), path


def test_strip_ticket_param(env, webhook, upstream):
    t = new_ticket()
    m = uuid.uuid4().hex
    r = env.get(f"/events/news?ticket={t}&keep={m}")
    assert r.status == 200, r
    assert r.first_event_json()["path"] == f"/events/news?keep={m}"
    assert env.wait_log(m, access=True) is not None
    assert t not in env.access_log()


def test_strip_on_denied_request_keeps_token_out_of_access_log(env, webhook):
    tok = new_token("strip-denied")
    webhook.program(tok, invalid())
    m = uuid.uuid4().hex
    r = env.get(f"/events/news?token={tok}&z={m}")
    assert_error(r, 401, "invalid_token")
    assert env.wait_log(m, access=True) is not None, "access log line not written"
    assert tok not in env.access_log()


def test_no_strip_when_disabled(envoys, upstream):
    alt = envoys.get({"token": {"strip_from_upstream": False}}, name="nostrip", leak_check=False)
    tok = new_token("nostrip")
    m = uuid.uuid4().hex
    r = alt.get(f"/events/news?a=1&token={tok}&b={m}")
    assert r.status == 200, r
    assert r.first_event_json()["path"] == f"/events/news?a=1&token={tok}&b={m}"


def test_custom_user_header(envoys, upstream):
    alt = envoys.get({"user_header": "x-auth-user"}, name="userheader")
    tok = new_token("uh")
    m = marker()
    r = alt.get(f"/events/news?{m}", {**bearer(tok), "X-Auth-User": "mallory"})
    assert r.status == 200, r
    echo = r.first_event_json()
    assert echo["headers"].get("x-auth-user") == sub_of(tok), echo["headers"]
    reqs = upstream.requests_containing(m)
    assert len(reqs) == 1 and reqs[0].header_all("x-auth-user") == [sub_of(tok)]


def test_custom_query_params_order(envoys, webhook):
    alt = envoys.get({"token": {"query_params": ["access_token", "token"]}}, name="qorder")
    a, b = new_token("first"), new_token("second")
    r = alt.get(f"/events/news?token={b}&access_token={a}")
    assert r.status == 200, r
    assert [c.jwt for c in webhook.calls if c.jwt in (a, b)] == [a]


# ----------------------------------------------------------------------------------------------
# 401 / 404 answers
# ----------------------------------------------------------------------------------------------
def test_missing_token(env, webhook, upstream):
    before = len(webhook.calls)
    m = marker()
    r = env.get(f"/events/news?{m}")
    assert_error(r, 401, "missing_token")
    assert_not_forwarded(upstream, m)
    assert len(webhook.calls) == before


@pytest.mark.parametrize("value", ["Basic xyz", "Bearer", "Token abc.def.ghi", "Bearer a b"])
def test_malformed_authorization(env, webhook, upstream, value):
    before = len(webhook.calls)
    m = marker()
    r = env.get(f"/events/news?{m}", {"Authorization": value})
    assert_error(r, 401, "malformed_authorization")
    assert_not_forwarded(upstream, m)
    assert len(webhook.calls) == before


@pytest.mark.parametrize(
    "verdict",
    [
        "valid_false",
        "expires_at_past",
        "user_id_null",
        "user_id_not_string",
        "expires_at_null",
        "valid_missing",
    ],
)
def test_invalid_token_from_webhook(env, webhook, upstream, verdict):
    now = int(time.time())
    v = {
        "valid_false": {"valid": False, "user_id": None, "expires_at": None},
        "expires_at_past": {"valid": True, "user_id": "alice", "expires_at": now - 10},
        "user_id_null": {"valid": True, "user_id": None, "expires_at": now + 600},
        "user_id_not_string": {"valid": True, "user_id": 42, "expires_at": now + 600},
        "expires_at_null": {"valid": True, "user_id": "alice", "expires_at": None},
        "valid_missing": {"user_id": "alice", "expires_at": now + 600},
    }[verdict]
    tok = new_token("inv")
    webhook.program(tok, Behaviour(verdict=v))
    m = marker()
    r = env.get(f"/events/news?{m}", bearer(tok))
    assert r.status != 200
    if verdict == "valid_missing":
        # not a verdict per the contract's schema: a denial or a webhook failure, never a pass
        assert r.status in (401, 503), r
        return
    assert_error(r, 401, "invalid_token")
    assert_not_forwarded(upstream, m)


@pytest.mark.parametrize("path", ["/events/", "/events", "/events/?x=1", "/events?x=1", "/Events/x", "/eventsx"])
def test_no_topic_404(env, webhook, upstream, path):
    tok = new_token("notopic")
    r = env.get(path, bearer(tok))
    assert_error(r, 404, "no_topic")
    assert webhook.calls_for(tok) == []
    assert_not_forwarded(upstream, tok)
    assert upstream.requests_containing(sub_of(tok)) == []


def test_merged_slashes_name_the_topic_after_them(env, webhook, upstream):
    # `merge_slashes: true` in the template: /events//x is /events/x before the filter sees it
    # (an upstream that merges slashes serves x, so x is what must be authorized)
    tok = new_token("slashes")
    m = marker()
    r = env.get(f"/events//x?{m}", bearer(tok))
    assert_allowed(r, sub_of(tok))
    assert [c.topic for c in webhook.calls_for(tok)] == [topic_id("x")]
    assert [q.path for q in upstream.requests_containing(m)] == [f"/events/x?{m}"]


def test_no_topic_404_without_token(env, upstream):
    m = marker()
    r = env.get(f"/events/?{m}")
    assert r.status in (401, 404), r
    assert_not_forwarded(upstream, m)


# ----------------------------------------------------------------------------------------------
# webhook failures -> 503
# ----------------------------------------------------------------------------------------------
FAILING = {"jwt_verifier": {"timeout_ms": 300, "retry_attempts": 0, "circuit_breaker_threshold": 1000}}


@pytest.mark.parametrize(
    "failure",
    [
        "status_500",
        "status_404",
        "malformed_json",
        "json_not_object",
        "too_slow",
        "connection_closed",
    ],
)
def test_webhook_failure_gives_503(envoys, webhook, upstream, failure):
    fenv = envoys.get(FAILING, name="failing")
    tok = new_token("fail")
    beh = {
        "status_500": Behaviour(status=500, body=b'{"error":"boom"}'),
        "status_404": Behaviour(status=404, body=b"not found", content_type="text/plain"),
        "malformed_json": Behaviour(body=b'{"valid": tru'),
        "json_not_object": Behaviour(body=b"[true]"),
        "too_slow": Behaviour(delay=1.5),
        "connection_closed": Behaviour(close=True),
    }[failure]
    webhook.program(tok, beh)
    m = marker()
    s0 = fenv.stats()
    t0 = time.monotonic()
    r = fenv.get(f"/events/news?{m}", bearer(tok), timeout=10)
    elapsed = time.monotonic() - t0
    assert_error(r, 503, "auth_unavailable")
    s1 = fenv.stats()
    assert _counter(s1, "revenprox_webhook_failures") - _counter(s0, "revenprox_webhook_failures") == 1
    assert _counter(s1, "revenprox_denied", "auth_unavailable") - _counter(s0, "revenprox_denied", "auth_unavailable") == 1
    assert_not_forwarded(upstream, m)
    assert len(webhook.calls_for(tok)) == 1, "retry_attempts 0: exactly one webhook call"
    if failure == "too_slow":
        assert 0.25 <= elapsed < 1.3, f"timeout_ms 300 but answered after {elapsed:.2f}s"


def test_webhook_unreachable_gives_503(envoys, upstream):
    uenv = envoys.get(FAILING, webhook_port=closed_port(), name="unreachable")
    tok = new_token("unreach")
    m = marker()
    r = uenv.get(f"/events/news?{m}", bearer(tok), timeout=10)
    assert_error(r, 503, "auth_unavailable")
    assert_not_forwarded(upstream, m)


def test_webhook_failure_is_not_cached(envoys, webhook):
    fenv = envoys.get(FAILING, name="failing")
    tok = new_token("fail-then-ok")
    webhook.program(tok, Behaviour(status=500), valid("recovered"))
    assert_error(fenv.get("/events/news", bearer(tok)), 503, "auth_unavailable")
    assert_allowed(fenv.get("/events/news", bearer(tok)), "recovered")
    assert len(webhook.calls_for(tok)) == 2


RETRY = {"jwt_verifier": {"retry_attempts": 2, "timeout_ms": 500, "circuit_breaker_threshold": 1000}}


def test_retries_with_backoff(envoys, webhook):
    renv = envoys.get(RETRY, name="retry")
    tok = new_token("retry")
    webhook.program(tok, Behaviour(status=500), Behaviour(body=b"garbage"), valid("third-time"))
    r = renv.get("/events/news", bearer(tok), timeout=10)
    assert_allowed(r, "third-time")
    calls = webhook.calls_for(tok)
    assert len(calls) == 3
    gaps = [calls[1].time - calls[0].time, calls[2].time - calls[1].time]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, f"backoff 100 ms x attempt expected, gaps {gaps}"


def test_retries_exhausted_gives_503(envoys, webhook):
    renv = envoys.get(RETRY, name="retry")
    tok = new_token("retry-fail")
    webhook.program(tok, Behaviour(status=502))
    r = renv.get("/events/news", bearer(tok), timeout=10)
    assert_error(r, 503, "auth_unavailable")
    assert len(webhook.calls_for(tok)) == 3  # 1 + retry_attempts


# ----------------------------------------------------------------------------------------------
# circuit breaker and rate limit
# ----------------------------------------------------------------------------------------------
def test_circuit_breaker_opens_and_probes(envoys, webhook):
    benv = envoys.get({"jwt_verifier": {"retry_attempts": 0, "timeout_ms": 300, "circuit_breaker_threshold": 2,
                                        "circuit_breaker_timeout_sec": 2}}, name="breaker")
    def circuit_gauges():
        st = benv.stats()
        return {n: st.get(n) for n in st.names() if "circuit" in n and st.types.get(n) == "gauge"}

    closed = circuit_gauges()
    assert closed, f"no revenprox_ gauge about the circuit state: {benv.stats().names()}"
    good = new_token("cb-good")
    assert_allowed(benv.get("/events/news", bearer(good)), sub_of(good))  # cached before the failures
    for i in range(2):
        # Failures of two client addresses: the Envoy-wide circuit opens.
        bad = new_token(f"cb-bad{i}")
        webhook.program(bad, Behaviour(status=500))
        assert_error(benv.get("/events/news", bearer(bad), source=f"127.0.0.{10 + i}"), 503, "auth_unavailable")
    # open: a verification that needs the webhook fails at once, without calling it
    fresh = new_token("cb-fresh")
    t0 = time.monotonic()
    assert_error(benv.get("/events/news", bearer(fresh)), 503, "auth_unavailable")
    assert time.monotonic() - t0 < 0.25
    assert webhook.calls_for(fresh) == []
    assert circuit_gauges() != closed, "circuit state gauge did not move when the circuit opened"
    # cache hits are still served while open
    assert_allowed(benv.get("/events/news", bearer(good)), sub_of(good))
    # after circuit_breaker_timeout_sec one probe decides: success closes it
    time.sleep(2.3)
    assert_allowed(benv.get("/events/news", bearer(fresh)), sub_of(fresh))
    assert len(webhook.calls_for(fresh)) == 1
    other = new_token("cb-after")
    assert_allowed(benv.get("/events/news", bearer(other)), sub_of(other))
    assert circuit_gauges() == closed, "circuit state gauge did not return to closed"


def test_rate_limit_429(envoys, webhook):
    lenv = envoys.get({"jwt_verifier": {"rate_limit_per_sec": 3}}, name="ratelimit")
    cached = new_token("rl-cached")
    assert _counter(lenv.stats(), "revenprox_denied", "rate_limited") == 0
    time.sleep(1.05)  # fresh second window
    assert lenv.get("/events/news", bearer(cached)).status == 200
    statuses = []
    for i in range(6):
        statuses.append(lenv.get("/events/news", bearer(new_token(f"rl{i}"))))
    codes = [r.status for r in statuses]
    assert codes.count(200) <= 3 and 429 in codes, codes
    assert_error(next(r for r in statuses if r.status == 429), 429, "rate_limited")
    st = lenv.stats()
    assert _counter(st, "revenprox_denied", "rate_limited") == codes.count(429), st.names()
    # cache hits never count against the limit
    for _ in range(3):
        assert lenv.get("/events/news", bearer(cached)).status == 200


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------
def test_cache_hit_on_second_request(env, webhook):
    tok = new_token("cache")
    assert_allowed(env.get("/events/news", bearer(tok)), sub_of(tok))
    assert_allowed(env.get("/events/news", bearer(tok)), sub_of(tok))
    assert len(webhook.calls_for(tok)) == 1


def test_cache_key_includes_topic(env, webhook):
    tok = new_token("cache-topic")
    webhook.program(tok, Behaviour(verdict=lambda jwt, topic: (
        {"valid": True, "user_id": "alice", "expires_at": int(time.time()) + 600} if topic == NEWS
        else {"valid": False, "user_id": None, "expires_at": None})))
    assert_allowed(env.get("/events/news", bearer(tok)), "alice")
    r = env.get("/events/sports", bearer(tok))
    assert_error(r, 401, "invalid_token")
    assert [c.topic for c in webhook.calls_for(tok)] == [NEWS, topic_id("sports")]


def test_denial_is_not_cached(env, webhook):
    tok = new_token("deny")
    webhook.program(tok, invalid())
    assert_error(env.get("/events/news", bearer(tok)), 401, "invalid_token")
    assert_error(env.get("/events/news", bearer(tok)), 401, "invalid_token")
    assert len(webhook.calls_for(tok)) == 2


def test_cache_ttl_bounded_by_expires_at(env, webhook):
    tok = new_token("ttl-exp")
    webhook.program(tok, valid("short", expires_at=int(time.time()) + 2), valid("later"))
    assert_allowed(env.get("/events/news", bearer(tok)), "short")
    assert_allowed(env.get("/events/news", bearer(tok)), "short")
    assert len(webhook.calls_for(tok)) == 1
    time.sleep(2.2)
    assert_allowed(env.get("/events/news", bearer(tok)), "later")
    assert len(webhook.calls_for(tok)) == 2


def test_cache_ttl_sec(envoys, webhook):
    tenv = envoys.get({"jwt_verifier": {"cache_ttl_sec": 1}}, name="ttl1")
    tok = new_token("ttl1")
    assert_allowed(tenv.get("/events/news", bearer(tok)), sub_of(tok))
    assert_allowed(tenv.get("/events/news", bearer(tok)), sub_of(tok))
    assert len(webhook.calls_for(tok)) == 1
    time.sleep(1.3)
    assert_allowed(tenv.get("/events/news", bearer(tok)), sub_of(tok))
    assert len(webhook.calls_for(tok)) == 2


def _worker_cx(env):
    text = env.admin("/stats?filter=worker_[0-9]+.downstream_cx_total")
    out = {}
    for line in text.splitlines():
        m = re.match(rf"listener\.127\.0\.0\.1_{env.port}\.(worker_\d+)\.downstream_cx_total: (\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def test_cache_shared_across_workers(env, webhook):
    tok = new_token("shared")
    before = _worker_cx(env)
    for _ in range(20):  # every request on a fresh connection
        assert env.get("/events/news", bearer(tok)).status == 200
    after = _worker_cx(env)
    used = [w for w in after if after[w] > before.get(w, 0)]
    assert len(used) >= 2, f"connections did not spread over both workers: {before} -> {after}"
    assert len(webhook.calls_for(tok)) == 1


def test_single_flight_concurrent_misses(env, webhook):
    tok = new_token("flight")
    webhook.program(tok, Behaviour(delay=0.5, verdict=lambda j, t: {
        "valid": True, "user_id": "flight", "expires_at": int(time.time()) + 600}))
    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        rs = list(ex.map(lambda _: env.get("/events/news", bearer(tok), timeout=10), range(10)))
    assert [r.status for r in rs] == [200] * 10
    n = len(webhook.calls_for(tok))
    assert 1 <= n <= 2, f"{n} webhook calls for 10 concurrent identical misses (2 workers)"


# ----------------------------------------------------------------------------------------------
# precheck
# ----------------------------------------------------------------------------------------------
def _seg(obj):
    return b64url(json.dumps(obj).encode())


PRECHECK_BAD = {
    "not_a_jwt": lambda: "abc",
    "two_segments": lambda: _seg({"alg": "HS256"}) + "." + _seg({"sub": "x"}),
    "header_not_json": lambda: b64url(b"not json") + "." + _seg({"sub": "x"}) + ".sig",
    "payload_not_object": lambda: _seg({"alg": "HS256"}) + "." + b64url(b"[1,2]") + ".sig",
    "bad_base64": lambda: "@@@." + _seg({"sub": "x"}) + ".sig",
    "expired": lambda: make_jwt(sub="old", exp=int(time.time()) - 60),
}


@pytest.mark.parametrize("kind", sorted(PRECHECK_BAD))
@pytest.mark.parametrize("channel", ["header", "query"])
def test_precheck_refuses_without_webhook(env, webhook, upstream, kind, channel):
    tok = PRECHECK_BAD[kind]()
    before = len(webhook.calls)
    m = marker()
    if channel == "header":
        r = env.get(f"/events/news?{m}", bearer(tok))
    else:
        r = env.get(f"/events/news?{m}&token={tok}")
    assert_error(r, 401, "invalid_token")
    assert len(webhook.calls) == before, "the webhook must never see a token refused by the precheck"
    assert_not_forwarded(upstream, m)


def test_precheck_accepts_jwt_without_exp(env, webhook):
    tok = make_jwt(sub="noexp-" + uuid.uuid4().hex[:8], exp=False)
    r = env.get("/events/news", bearer(tok))
    assert r.status == 200, r
    assert len(webhook.calls_for(tok)) == 1


def test_precheck_disabled(envoys, webhook):
    penv = envoys.get({"jwt_verifier": {"precheck": False}}, name="noprecheck")
    opaque = "opaque-" + uuid.uuid4().hex
    webhook.program(opaque, valid("opaque-user"))
    assert_allowed(penv.get("/events/news", bearer(opaque)), "opaque-user")
    assert len(webhook.calls_for(opaque)) == 1
    expired = make_jwt(sub="exp-" + uuid.uuid4().hex[:8], exp=int(time.time()) - 60)
    webhook.program(expired, invalid())
    assert_error(penv.get("/events/news", bearer(expired)), 401, "invalid_token")
    assert len(webhook.calls_for(expired)) == 1


# ----------------------------------------------------------------------------------------------
# tickets
# ----------------------------------------------------------------------------------------------
def test_ticket_not_prechecked_and_never_cached(env, webhook):
    t = new_ticket()
    webhook.program(t, valid("t-user"))
    assert_allowed(env.get(f"/events/news?ticket={t}"), "t-user")
    assert_allowed(env.get(f"/events/news?ticket={t}"), "t-user")
    calls = webhook.calls_for(t)
    assert len(calls) == 2
    assert all(c.body == ('{"jwt":"%s","topic":"%s","kind":"ticket"}' % (t, NEWS)).encode() for c in calls)


def test_ticket_replay_refused(env, webhook, upstream):
    t = new_ticket()
    webhook.program(t, valid("once"), invalid())  # the webhook consumes the ticket on first use
    assert_allowed(env.get(f"/events/news?ticket={t}"), "once")
    m = marker()
    r = env.get(f"/events/news?ticket={t}&{m}")
    assert_error(r, 401, "invalid_token")
    assert len(webhook.calls_for(t)) == 2
    assert_not_forwarded(upstream, m)


def test_expired_jwt_as_ticket_goes_to_webhook(env, webhook):
    # tickets are opaque: not prechecked even if they look like an expired JWT
    t = make_jwt(sub="tick-" + uuid.uuid4().hex[:8], exp=int(time.time()) - 60)
    webhook.program(t, valid("jwt-ticket"))
    assert_allowed(env.get(f"/events/news?ticket={t}"), "jwt-ticket")
    assert len(webhook.calls_for(t)) == 1


# ----------------------------------------------------------------------------------------------
# development mode
# ----------------------------------------------------------------------------------------------
DEV = {"jwt_verifier": {"webhook_url": "", "require_authentication": False}}


def test_development_mode(envoys, webhook, upstream):
    denv = envoys.get(raw=DEV, name="devmode")
    before = len(webhook.calls)
    m = marker()
    r = denv.get(f"/events/news?{m}", {"x-revenprox-user": "mallory"})
    assert r.status == 200, r
    reqs = upstream.requests_containing(m)
    assert len(reqs) == 1
    assert "mallory" not in reqs[0].header_all("x-revenprox-user"), "client-supplied user header must be removed"
    assert len(webhook.calls) == before
    log = denv.wait_log(re.compile(r"\[(warn|warning)\]\[wasm\].*DEVELOPMENT MODE"))
    assert log is not None, "development mode must log a warning at start:\n" + denv.log_tail()


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
def _counter(stats, base, reason=None):
    """Value of a revenprox counter; tolerates `_total` and a `reason` label or name suffix."""
    if reason is None:
        names = [base, base + "_total"]
        for n in names:
            if stats.has(n):
                return stats.get(n)
        raise AssertionError(f"metric {base} not found; revenprox metrics: {stats.names()}")
    for n in (base, base + "_total"):
        if stats.has(n) and any(lbl.get("reason") for nn, lbl, _ in stats.parsed if nn == n):
            return stats.get(n, reason=reason)
    for n in (f"{base}_{reason}", f"{base}_{reason}_total", f"{base}_reason_{reason}"):
        if stats.has(n):
            return stats.get(n)
    raise AssertionError(f"metric {base} reason={reason} not found; revenprox metrics: {stats.names()}")


def test_metrics_move(env, webhook):
    s0 = env.stats()
    ok = new_token("metrics-ok")
    assert env.get("/events/news", bearer(ok)).status == 200  # miss + webhook call + allowed
    assert env.get("/events/news", bearer(ok)).status == 200  # hit + allowed
    assert env.get("/events/news").status == 401  # missing_token
    bad = new_token("metrics-bad")
    webhook.program(bad, invalid())
    assert env.get("/events/news", bearer(bad)).status == 401  # miss + webhook call + invalid_token
    s1 = env.stats()  # counters are read live by the admin endpoint
    d = lambda base, reason=None: _counter(s1, base, reason) - _counter(s0, base, reason)  # noqa: E731
    assert d("revenprox_requests") == 4
    assert d("revenprox_allowed") == 2
    assert d("revenprox_denied", "missing_token") == 1
    assert d("revenprox_denied", "invalid_token") == 1
    assert d("revenprox_cache_hits") == 1
    assert d("revenprox_cache_misses") == 2
    assert d("revenprox_webhook_calls") == 2


def test_metric_names_present(env):
    names = env.stats().names()
    missing = []
    # the contract's list: requests, allowed, denied (by reason), cache hits and misses, webhook
    # calls, failures and latency, circuit state, rate-limited, challenges sent,
    # re-authorizations, streams expired, open streams
    for fragment in ["requests", "allowed", "denied", "cache_hit", "cache_miss", "webhook_call",
                     "webhook_fail", "webhook_latency", "circuit", "rate_limited", "challenge",
                     "reauth", "expired", "open_streams"]:
        if not any(fragment in n for n in names):
            missing.append(fragment)
    assert not missing, f"no revenprox_ metric about {missing}; present: {names}"


# ----------------------------------------------------------------------------------------------
# dot segments: Envoy's normalization (shipped) and the filter's own refusal (raw path)
# ----------------------------------------------------------------------------------------------
def raw_path_envoy(envoys):
    """The template with Envoy's own path handling off (NORMALIZE_PATH=false,
    ESCAPED_SLASHES_ACTION=KEEP_UNCHANGED): the filter gets the path as sent, so its own refusal is
    what a test sees. A test configuration only (the shipped one normalizes)."""
    return envoys.get(name="raw-path", normalize_path=False, escaped_slashes_action="KEEP_UNCHANGED")


def only_on(*topics):
    """A webhook verdict that allows the token on these topic ids only."""
    return Behaviour(verdict=lambda token, topic: (
        {"valid": True, "user_id": "only-" + topics[0][:8], "expires_at": int(time.time()) + 600}
        if topic in topics else {"valid": False, "user_id": None, "expires_at": None}))


# path -> what the shipped template (normalize_path, path_with_escaped_slashes_action:
# REJECT_REQUEST) makes of it before the filter runs: the topic segment Envoy resolved it to, or
# "rejected" (400 from Envoy).
DOT_PATHS_SHIPPED = {"/events/news/../secret": "secret", "/events/news/%2e%2e/secret": "secret",
                     "/events/news/..%2fsecret": "rejected"}


@pytest.mark.parametrize("shipped", [True, False], ids=["shipped", "filter-only"])
@pytest.mark.parametrize("path", list(DOT_PATHS_SHIPPED))
def test_dot_segments_are_not_authorized_as_the_first_topic(envoys, env, webhook, upstream, path, shipped):
    # An upstream that normalizes the path would serve /events/secret: the request must never be
    # authorized as `news`, the topic before the dots.
    tok = new_token("dots")
    webhook.program(tok, only_on(NEWS))  # this token may read `news` and nothing else
    m = marker()
    if not shipped:
        # the filter's own refusal: a path with a dot segment names no topic
        r = raw_path_envoy(envoys).get(f"{path}?{m}", bearer(tok))
        assert_error(r, 404, "no_topic")
        assert webhook.calls_for(tok) == []
        assert_not_forwarded(upstream, m)
        return
    r = env.get(f"{path}?{m}", bearer(tok))
    if DOT_PATHS_SHIPPED[path] == "rejected":
        # path_with_escaped_slashes_action: REJECT_REQUEST, before routing and filters
        assert r.status == 400 and r.body == b"", r
        assert webhook.calls_for(tok) == []
        assert_not_forwarded(upstream, m)
        return
    # normalize_path resolved the dots: the filter sees /events/secret and asks about `secret`
    seg = DOT_PATHS_SHIPPED[path]
    assert_error(r, 401, "invalid_token")
    assert [c.topic for c in webhook.calls_for(tok)] == [topic_id(seg)]
    assert_not_forwarded(upstream, m)
    # a token allowed on `secret` gets exactly /events/secret, the topic it was checked for
    other = new_token("dots-secret")
    webhook.program(other, only_on(topic_id(seg)))
    m2 = marker()
    r = env.get(f"{path}?{m2}", bearer(other))
    assert r.status == 200, r
    assert r.first_event_json()["path"] == f"/events/{seg}?{m2}"
    assert [q.path for q in upstream.requests_containing(m2)] == [f"/events/{seg}?{m2}"]
    assert [c.topic for c in webhook.calls_for(other)] == [topic_id(seg)]
