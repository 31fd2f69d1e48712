"""Attack and chaos findings (issue 15), one test each, against the real Envoy and template.

Each test failed on the build before its fix (commit messages and SECURITY.md, "Findings").
Client addresses: Envoy sees 127.0.0.x as distinct clients (the template takes the client
address from the connection's peer, use_remote_address: true), so a test binds its client sockets
to 127.0.0.2, 127.0.0.3, ... to play different clients.
"""
import base64
import concurrent.futures
import json
import random
import re
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler

import pytest

import helpers
from helpers import Stream, h2_get, marker, new_token, sub_of, wait_until
from servers.httpbase import QuietServer
from servers.jwtutil import b64url
from servers.sse_upstream import SseUpstream
from servers.webhook import Behaviour, invalid, valid
from test_core import NEWS, assert_allowed, assert_error, assert_not_forwarded, bearer

IDENTITY = "x-revenprox-user"


def folded(name):
    """A header name as the most folding upstream reads it: lighttpd's CGI/FastCGI/SCGI
    environment maps every character that is not a letter or digit to `_` (CGI/WSGI/Rack/PHP
    fold `-` and `_`): one variable for x-user, X_USER, x.user, x~user, x+user."""
    return re.sub(r"[^a-z0-9]", "-", name.lower())


def identities_seen(echo_headers):
    """Every value an upstream that folds header names would read as the identity header."""
    return [v for k, v in echo_headers.items() if folded(k) == IDENTITY]


def forged_token(i):
    """A self-minted, unsigned JWT: passes the precheck, the webhook refuses it."""
    header = b64url(b'{"alg":"none","typ":"JWT"}')
    payload = b64url(json.dumps({"sub": f"mallory-{i}", "exp": int(time.time()) + 600}).encode())
    return f"{header}.{payload}."


# ----------------------------------------------------------------------------------------------
# 1. Identity header smuggled with underscores (and dots, and case)
# ----------------------------------------------------------------------------------------------
SPELLINGS = ["x_revenprox_user", "X_REVENPROX_USER", "x-revenprox_user", "x.revenprox.user", "X-Revenprox-User",
             # every other character a header name may hold (RFC 9110 tchar) as the separator
             "x~revenprox~user", "x+revenprox+user", "x!revenprox!user", "x*revenprox*user", "x|revenprox|user",
             "x^revenprox^user", "x'revenprox'user", "x`revenprox`user", "x#revenprox#user", "x$revenprox$user",
             "x%revenprox%user", "x&revenprox&user"]


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_no_spelling_of_the_identity_header_reaches_the_upstream(env, webhook, upstream, proto):
    tok = new_token("mallory")
    m = marker()
    headers = [("authorization", f"Bearer {tok}")] + [(name, "admin") for name in SPELLINGS]
    if proto == "h1":
        r = helpers.http1_request(env.port, f"/events/news?{m}", headers)
    else:
        r, _ = h2_get(env.port, f"/events/news?{m}", headers, until_first_event=True)
    assert r.status == 200, r
    echo = r.first_event_json()
    assert identities_seen(echo["headers"]) == [sub_of(tok)], echo["headers"]


def test_optional_authentication_never_passes_a_client_identity(envoys, upstream):
    oenv = envoys.get({"jwt_verifier": {"require_authentication": False}}, name="optional-auth")
    m = marker()
    r = oenv.get(f"/events/news?{m}", [(name, "admin") for name in SPELLINGS])
    assert r.status == 200, r
    assert identities_seen(r.first_event_json()["headers"]) == []


# ----------------------------------------------------------------------------------------------
# 2. The catch-all route forwarded a client's identity header, and NFKC look-alike prefixes
# ----------------------------------------------------------------------------------------------
def test_other_paths_never_carry_a_client_identity(env, webhook, upstream):
    m = marker()
    r = env.get(f"/api/me?{m}", [(IDENTITY, "admin")] + [(name, "root") for name in SPELLINGS])
    assert r.status == 200, r
    (seen,) = upstream.requests_containing(m)
    assert [v for k, v in seen.headers if folded(k) == IDENTITY] == [], seen.headers


@pytest.mark.parametrize("path", ["/%EF%BD%85vents/news", "/%EF%BC%A5VENTS/news", "/\u212a/../events/news",
                                  "/x/%2e%2e/events/news", "/%u0065vents/news", "/Events/news"])
def test_no_spelling_of_a_topic_path_is_served_unguarded(env, webhook, upstream, path):
    m = marker()
    before = len(webhook.calls)
    r = helpers.http1_request(env.port, f"{path}?{m}".replace("\u212a", "%E2%84%AA"))
    assert r.status in (401, 404), r
    assert_not_forwarded(upstream, m)
    assert len(webhook.calls) == before


# ----------------------------------------------------------------------------------------------
# 3. A stream outlived its own token by adopting another stream's refresh
# ----------------------------------------------------------------------------------------------
SHORT = {"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 1, "reverify_interval_sec": 0}}


def test_a_stream_never_takes_a_refresh_posted_before_it_opened(envoys, webhook):
    senv = envoys.get(SHORT, name="trust-refresh")
    alice, refreshed, stolen = new_token("alice"), new_token("alice-refresh"), new_token("alice-stolen")
    webhook.program(alice, valid("alice", ttl=3600))
    webhook.program(refreshed, valid("alice", ttl=3600))
    webhook.program(stolen, valid("alice", ttl=4))
    hdrs = {"x-upstream-mode": "silent"}
    with Stream(senv.port, "/events/news", {**bearer(alice), **hdrs}, timeout=10) as a:
        assert a.status == 200
        a.read_until(lambda t: "\n\n" in t, timeout=3)
        time.sleep(0.3)  # registered Envoy-wide (first tick)
        r = senv.get("/events/news", {**bearer(refreshed), "content-type": "application/x-challenge-response"},
                     method="POST", body=b"")
        assert r.status == 204, r
        # The attacker's stream opens after alice's refresh, with a 4-second alice token.
        b = Stream(senv.port, "/events/news", {**bearer(stolen), **hdrs}, timeout=10)
    try:
        assert b.status == 200
        t0 = time.monotonic()
        assert b.read_until(lambda t: "event: expired" in t, timeout=8), b.text
        assert '{"reason":"token_expired"}' in b.text
        assert time.monotonic() - t0 < 6, "the stolen token's stream outlived its own expiry"
    finally:
        b.close()


# ----------------------------------------------------------------------------------------------
# 4. One client drained the Envoy-wide webhook budget
# ----------------------------------------------------------------------------------------------
def test_one_address_cannot_drain_the_webhook_budget(envoys, webhook):
    benv = envoys.get({"jwt_verifier": {"rate_limit_per_sec": 10}}, name="trust-budget")
    webhook.default = invalid()  # forged tokens: the webhook refuses them (after a call)
    stop = time.monotonic() + 3.0
    flood = {"sent": 0, "verified": 0}

    def flood_loop():
        i = 0
        while time.monotonic() < stop and i < 400:  # ~5x the rate for 3 s, bounded
            r = benv.get("/events/news", bearer(forged_token(i)), source="127.0.0.2", timeout=3)
            flood["sent"] += 1
            flood["verified"] += r.status == 401
            i += 1
            time.sleep(0.02)

    fair = []

    def fair_loop():
        for i in range(10):
            tok = new_token(f"fair{i}")
            webhook.program(tok, valid(f"fair{i}"))
            fair.append(benv.get("/events/news", bearer(tok), source="127.0.0.3", timeout=3).status)
            time.sleep(0.25)

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        futures = [ex.submit(flood_loop), ex.submit(fair_loop)]
        for f in futures:
            f.result(timeout=30)
    assert flood["sent"] >= 100, flood  # the flood really ran at several times the rate
    assert fair.count(200) >= 9, f"fresh valid tokens of another address: {fair}"
    assert flood["verified"] < flood["sent"], "the flood was never limited"


# ----------------------------------------------------------------------------------------------
# 5. One client opened the circuit for everyone; 4xx answers were retried
# ----------------------------------------------------------------------------------------------
def test_one_address_cannot_open_the_circuit_for_everyone(envoys, webhook):
    cenv = envoys.get({"jwt_verifier": {"circuit_breaker_threshold": 5, "circuit_breaker_timeout_sec": 60,
                                        "retry_attempts": 3}}, name="trust-circuit")
    bad = [new_token(f"unknown-kid{i}") for i in range(12)]
    for t in bad:
        webhook.program(t, Behaviour(status=500))
    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        statuses = list(ex.map(lambda t: cenv.get("/events/news", bearer(t), source="127.0.0.4", timeout=10).status,
                               bad))
    assert set(statuses) == {503}, statuses
    # Another address is served: verifications, and refreshes of its stream.
    good = []
    for i in range(10):
        tok = new_token(f"healthy{i}")
        webhook.program(tok, valid(f"healthy{i}"))
        good.append(cenv.get("/events/news", bearer(tok), source="127.0.0.5").status)
    assert good.count(200) >= 9, good
    assert cenv.stats().get("revenprox_circuit_state") == 0
    assert cenv.stats().get("revenprox_client_circuit_opened") >= 1


def test_webhook_4xx_is_not_retried(envoys, webhook):
    renv = envoys.get({"jwt_verifier": {"retry_attempts": 3}}, name="trust-4xx")
    tok = new_token("four-hundred")
    webhook.program(tok, Behaviour(status=400))
    assert_error(renv.get("/events/news", bearer(tok)), 503, "auth_unavailable")
    time.sleep(0.5)  # any retry would come within 100 + 200 + 300 ms
    assert len(webhook.calls_for(tok)) == 1


# ----------------------------------------------------------------------------------------------
# 6. A URL token landed in the access log when Envoy refused an Upgrade
# ----------------------------------------------------------------------------------------------
def test_a_token_in_a_refused_upgrade_is_not_logged(env, webhook, upstream):
    tok = new_token("signalr")
    m = marker().replace("=", "-")
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        s.sendall(f"GET /events/news/{m}?access_token={tok} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                  f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\n\r\n"
                  .encode())
        head = s.recv(4096).decode("latin-1")
    finally:
        s.close()
    assert head.startswith("HTTP/1.1 "), head
    line = env.wait_log(m, access=True, timeout=5)
    assert line is not None, "no access log line for the refused upgrade"
    assert tok not in env.access_log() and tok not in env.envoy_log()
    assert webhook.calls_for(tok) == []


# ----------------------------------------------------------------------------------------------
# 7. Look-alike dots that only Unicode data knows
# ----------------------------------------------------------------------------------------------
LOOKALIKES = ["%E2%80%A5", "%EF%B8%B0", "%EF%B9%92%EF%B9%92", "..%EF%B9%A8x", "..%EF%BC%BCx", "%u002e%u002e",
              "%U002E%U002E", "%E2%80%A4%E2%80%A4"]


@pytest.mark.parametrize("dots", LOOKALIKES)
def test_look_alike_dot_segments_name_no_topic(env, webhook, upstream, dots):
    # bob may read news only; an NFKC-normalizing upstream would serve /events/sports.
    tok = new_token("bob")
    m = marker()
    r = helpers.http1_request(env.port, f"/events/news/{dots}/sports?{m}", bearer(tok))
    assert_error(r, 404, "no_topic")
    assert webhook.calls_for(tok) == []
    assert_not_forwarded(upstream, m)


# ----------------------------------------------------------------------------------------------
# 8. A one-time ticket made reusable by presenting it as a JWT
# ----------------------------------------------------------------------------------------------
def test_a_ticket_aware_webhook_refuses_tickets_presented_as_jwts(env, webhook, upstream):
    # The webhook issued these tickets, JWT-shaped (they pass the precheck): it accepts each once,
    # and only as a ticket.
    issued = {new_token("ticket"): "ticket-owner" for _ in range(2)}
    used = set()

    def ticket_verdict(token, topic, call):
        if token not in issued or token in used or call.json.get("kind") != "ticket":
            return {"valid": False, "user_id": None, "expires_at": None}
        used.add(token)
        return {"valid": True, "user_id": issued[token], "expires_at": int(time.time()) + 600}

    first, second = list(issued)
    for t in issued:
        webhook.program(t, Behaviour(verdict=ticket_verdict))
    assert_allowed(env.get(f"/events/news?ticket={first}"), "ticket-owner")
    assert_error(env.get(f"/events/news?ticket={first}"), 401, "invalid_token")  # consumed
    # The same kind of credential on a JWT channel: the webhook sees no kind and refuses it, so it
    # is never cached and never reusable.
    for _ in range(2):
        assert_error(env.get(f"/events/news?token={second}"), 401, "invalid_token")
    assert [c.json.get("kind") for c in webhook.calls_for(first)] == ["ticket", "ticket"]
    assert [c.json.get("kind") for c in webhook.calls_for(second)] == [None, None]


# ----------------------------------------------------------------------------------------------
# 9. The template hung stream 1,025
# ----------------------------------------------------------------------------------------------
def test_more_than_1024_streams_through_the_template(envoys, webhook, upstream):
    venv = envoys.get({}, name="trust-1100")
    tok = new_token("many")
    n = 1100
    socks, answers = helpers.open_silent_streams(venv.port, [helpers.silent_stream_request(tok)] * n)
    try:
        assert answers == {"HTTP/1.1 200 OK": n}, (dict(answers), helpers.cluster_pressure(venv.stats(), "sse_upstream"))
        assert wait_until(lambda: venv.stats().get("revenprox_open_streams") >= n, timeout=10), (
            f"revenprox_open_streams {venv.stats().get('revenprox_open_streams')} of {n}")
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: venv.stats().get("revenprox_open_streams") == 0, timeout=20), (
        f"revenprox_open_streams still {venv.stats().get('revenprox_open_streams')} 20 s after every client left")


def test_a_reconnect_herd_waits_for_a_backend_slow_to_accept(webhook):
    """A backend that accepts nothing for 1.5 s (restarting, paused) while 48 streams arrive at
    once: its listen queue (32) fills and the kernel drops the other SYNs; Envoy's connect retries
    them after 1 s (dropped again) and 3 s (accepted). The template's 5 s connect timeout lets
    every stream through; the 1 s it had answered the 15 or so that did not fit 503."""
    slow = SseUpstream(backlog=32).start(accepting=False)
    env = helpers.Envoy(helpers.plugin_config(), webhook_port=webhook.port, upstream_port=slow.port, name="trust-slow-accept")
    try:
        env.start()
        tok = new_token("herd")
        n = 48
        slow.accept_after(1.5)
        socks, answers = helpers.open_silent_streams(env.port, [helpers.silent_stream_request(tok)] * n, deadline_s=20)
        try:
            assert answers == {"HTTP/1.1 200 OK": n}, (dict(answers), helpers.cluster_pressure(env.stats(), "sse_upstream"))
        finally:
            for s in socks:
                s.close()
    finally:
        env.stop()
        slow.stop()


# ----------------------------------------------------------------------------------------------
# 10. "One log line per state change" was false under overload
# ----------------------------------------------------------------------------------------------
def test_rate_limiting_is_logged_once_per_overload(envoys, webhook):
    lenv = envoys.get({"jwt_verifier": {"rate_limit_per_sec": 5, "rate_limit_per_client_per_sec": 5}},
                      name="trust-ratelog")
    stop = time.monotonic() + 3.0
    sent = 0
    while time.monotonic() < stop and sent < 200:  # ~25/s, five times the rate, bounded
        lenv.get("/events/news", bearer(new_token(f"over{sent}")))
        sent += 1
        time.sleep(0.04)
    assert lenv.wait_log("rate limiting started", timeout=5)
    time.sleep(1.2)  # a quiet second
    assert lenv.get("/events/news", bearer(new_token("after"))).status == 200
    assert lenv.wait_log("rate limiting ended", timeout=5)
    log = lenv.envoy_log()
    assert (log.count("rate limiting started"), log.count("rate limiting ended")) == (1, 1), log.count("rate limiting")


# ----------------------------------------------------------------------------------------------
# 11. A refresh after the stream closed got 204 for ~28 s
# ----------------------------------------------------------------------------------------------
def test_a_refresh_after_the_last_stream_closed_is_refused_at_once(envoys, webhook):
    renv = envoys.get(SHORT, name="trust-presence")
    tok, again = new_token("gone"), new_token("gone-refresh")
    webhook.program(tok, valid("gone-user"))
    webhook.program(again, valid("gone-user"))
    with Stream(renv.port, "/events/news", {**bearer(tok), "x-upstream-mode": "silent"}, timeout=5) as s:
        assert s.status == 200
        s.read_until(lambda t: "\n\n" in t, timeout=3)
        time.sleep(0.3)  # counted Envoy-wide by the first tick
    assert wait_until(lambda: renv.stats().get("revenprox_open_streams") == 0, timeout=5)
    r = renv.get("/events/news", {**bearer(again), "content-type": "application/x-challenge-response"},
                 method="POST", body=b"")
    assert_error(r, 403, "user_mismatch")


# ----------------------------------------------------------------------------------------------
# The credential stays with the filter (jwt_authn's forward: false), unless asked
# ----------------------------------------------------------------------------------------------
def test_credentials_stay_with_the_filter_unless_forwarded(envoys, env, webhook):
    tok = new_token("keep")
    cookies = {"Cookie": f"theme=dark; revenprox_token={tok}; lang=fr"}
    echo = assert_allowed(env.get("/events/news", {**bearer(tok), **cookies}), sub_of(tok))
    assert "authorization" not in echo["headers"]
    assert echo["headers"].get("cookie") == "theme=dark; lang=fr"
    fenv = envoys.get({"token": {"forward_to_upstream": True}}, name="trust-forward")
    echo = assert_allowed(fenv.get("/events/news", {**bearer(tok), **cookies}), sub_of(tok))
    assert echo["headers"].get("authorization") == f"Bearer {tok}"
    assert f"revenprox_token={tok}" in echo["headers"].get("cookie", "")


# ----------------------------------------------------------------------------------------------
# Operators see how a stream ended
# ----------------------------------------------------------------------------------------------
def test_the_access_log_says_how_a_stream_ended(envoys, webhook):
    aenv = envoys.get(SHORT, name="trust-end")
    tok, short = new_token("ended"), new_token("expiring")
    webhook.program(short, valid("expiring", ttl=2))
    m1, m2 = marker(), marker()
    # The upstream ends the stream; the client reads to its end (a client that leaves first makes
    # it a client disconnect, which the filter never marks).
    with Stream(aenv.port, f"/events/news?{m1}", {**bearer(tok), "x-upstream-mode": "end"}, timeout=6) as s1:
        assert s1.status == 200
        s1.read_until(None, timeout=5)
        assert s1.ended and s1.end_reason == "eof", s1.end_reason
    with Stream(aenv.port, f"/events/news?{m2}", {**bearer(short), "x-upstream-mode": "silent"}, timeout=6) as s:
        assert s.read_until(lambda t: "event: expired" in t, timeout=5), s.text
        s.read_until(None, timeout=2)
    line1 = aenv.wait_log(re.compile(rf"{m1}.* end=upstream_end"), access=True, timeout=5)
    line2 = aenv.wait_log(re.compile(rf"{m2}.* end=token_expired"), access=True, timeout=5)
    assert line1 and line2, aenv.access_log()[-2000:]


# ==============================================================================================
# Second attack run (SECURITY.md, findings 22-24)
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# 22. The token cookie reached the upstream on every path the filter passed without verifying
# ----------------------------------------------------------------------------------------------
def _seen_headers(upstream, m):
    (seen,) = upstream.requests_containing(m)
    return seen, {k.lower(): v for k, v in seen.headers}


def test_the_token_cookie_never_reaches_the_upstream_on_any_path(envoys, env, webhook, upstream):
    # Browsers send the cookie with every request to the origin: pages, API calls, static files.
    tok = new_token("cookie-everywhere")
    before = len(webhook.calls)
    m = marker()
    r = env.get(f"/app/page?{m}&token={tok}", {"Cookie": f"theme=dark; revenprox_token={tok}; lang=fr",
                                               "Authorization": "Bearer app-own-session"})
    assert r.status == 200, r
    seen, headers = _seen_headers(upstream, m)
    assert headers.get("cookie") == "theme=dark; lang=fr", headers
    assert tok not in seen.path
    # Off the topic paths Authorization is the application's own (the filter never read it there).
    assert headers.get("authorization") == "Bearer app-own-session"
    assert len(webhook.calls) == before
    # Optional authentication and development mode pass requests without verifying them: the
    # cookie goes there too, and so does Authorization on a topic path.
    oenv = envoys.get({"jwt_verifier": {"require_authentication": False}}, name="optional-cookie")
    m = marker()
    assert oenv.get(f"/index.html?{m}", {"Cookie": f"revenprox_token={tok}"}).status == 200
    assert "cookie" not in _seen_headers(upstream, m)[1]
    denv = envoys.get(raw={"jwt_verifier": {"webhook_url": "", "require_authentication": False}}, name="dev-cookie")
    m = marker()
    r = denv.get(f"/events/news?{m}", {**bearer(tok), "Cookie": f"revenprox_token={tok}; lang=fr"})
    assert r.status == 200, r
    echo = r.first_event_json()["headers"]
    assert "authorization" not in echo and echo.get("cookie") == "lang=fr", echo
    m = marker()
    assert denv.get(f"/static/app.js?{m}", {"Cookie": f"revenprox_token={tok}", "Authorization": "Basic YXBwOmFwcA=="}).status == 200
    headers = _seen_headers(upstream, m)[1]
    assert "cookie" not in headers and headers.get("authorization") == "Basic YXBwOmFwcA==", headers
    # token.forward_to_upstream: true forwards both, on every path.
    fenv = envoys.get({"token": {"forward_to_upstream": True}}, name="forward-cookie")
    m = marker()
    assert fenv.get(f"/app/page?{m}", {"Cookie": f"revenprox_token={tok}"}).status == 200
    assert _seen_headers(upstream, m)[1].get("cookie") == f"revenprox_token={tok}"


# ----------------------------------------------------------------------------------------------
# 23. Plaintext injections in a gzip-compressed event stream
# ----------------------------------------------------------------------------------------------
class _GzipEvents(BaseHTTPRequestHandler):
    """An upstream that compresses its event stream whatever the request says (gzip, flushed per
    event, as Express's `compression` does), then stays open until the client goes away."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.server.accept_encoding.append(self.headers.get("accept-encoding"))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-encoding", "gzip")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

        def send(event):
            out = z.compress(event) + z.flush(zlib.Z_SYNC_FLUSH)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(out), out))
            self.wfile.flush()
            self.server.sent.append(event)

        try:
            send(b"data: one\n\n")
            time.sleep(1.5)  # a heartbeat falls due (heartbeat_interval_sec 1) and waits for a boundary
            # An event whose compressed bytes contain LF LF: where a plaintext framing sees an end.
            rnd = random.Random(7)
            for _ in range(5000):
                event = b"data: " + base64.b64encode(rnd.randbytes(600)) + b"\n\n"
                c = z.copy()
                if b"\n\n" in c.compress(event) + c.flush(zlib.Z_SYNC_FLUSH):
                    break
            send(event)
            while not self.server.stop.wait(0.5):
                send(b": keep-alive\n\n")
        except (BrokenPipeError, ConnectionError):
            pass


def _gzip_upstream():
    srv = QuietServer(("127.0.0.1", 0), _GzipEvents)
    srv.sent, srv.accept_encoding, srv.stop = [], [], threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_a_compressed_event_stream_is_never_written_into_and_ends_with_its_token(webhook):
    srv = _gzip_upstream()
    env = helpers.Envoy(helpers.plugin_config({"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 2}}),
                        webhook_port=webhook.port, upstream_port=srv.server_address[1], name="gzip-events")
    try:
        env.start()
        tok = new_token("gzip")
        webhook.program(tok, valid("gzip-user", ttl=5))
        m = marker()
        with Stream(env.port, f"/events/news?{m}", {**bearer(tok), "accept-encoding": "gzip"}, timeout=15) as s:
            assert s.status == 200 and s.header("content-encoding") == "gzip"
            t0 = time.monotonic()
            assert s.read_until(None, timeout=12), "the stream outlived its token"
            assert time.monotonic() - t0 < 9, "the stream outlived its token"
            raw = s.body
        # The client asked for gzip; the filter asked the upstream for none (this upstream ignores it).
        assert srv.accept_encoding == [None]
        # Not one byte written into the stream: what arrived is what the upstream sent, and decodes.
        assert b": heartbeat" not in raw and b"event:" not in raw
        text = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw)
        assert text == b"".join(srv.sent)[:len(text)] and text.startswith(b"data: one\n\n")
        assert len(text) > 600, "the event whose compressed bytes hold LF LF arrived whole"
        assert env.stats().get("revenprox_streams_encoded") == 1
        assert env.wait_log("arrived with content-encoding \"gzip\"", timeout=5)
        assert env.wait_log(re.compile(rf"{m}.* end=token_expired"), access=True, timeout=5)
    finally:
        srv.stop.set()
        env.stop()
        srv.shutdown()
        srv.server_close()


COMPRESSOR = """          http_filters:
          - name: envoy.filters.http.compressor
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor
              response_direction_config:
                common_config:
                  content_type_matcher: [{prefix: "text/event-stream"}]
              compressor_library:
                name: gzip
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip
"""


def test_envoys_compressor_before_the_filter_compresses_its_injections_too(webhook, upstream):
    # README's advice, on a real Envoy: the compressor first in http_filters sees the client's
    # Accept-Encoding; the filter removes it, so the upstream sends plain text, the filter writes
    # into that, and on the way back the compressor (after the filter) compresses all of it.
    env = helpers.Envoy(helpers.plugin_config({"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 2}}),
                        webhook_port=webhook.port, upstream_port=upstream.port, name="compressor-first")
    text = env.yaml_path.read_text()
    assert text.count("          http_filters:\n") == 1
    env.yaml_path.write_text(text.replace("          http_filters:\n", COMPRESSOR))
    try:
        env.start()
        tok = new_token("compressed")
        webhook.program(tok, valid("compressed-user", ttl=4))
        with Stream(env.port, "/events/news", {**bearer(tok), "accept-encoding": "gzip",
                                               "x-upstream-mode": "silent"}, timeout=12) as s:
            assert s.status == 200 and s.header("content-encoding") == "gzip", s.headers
            # Each piece decodes as it arrives (the compressor flushes every chunk it compresses).
            d, plain, seen = zlib.decompressobj(16 + zlib.MAX_WBITS), bytearray(), [0]

            def decoded(_):
                plain.extend(d.decompress(s.body[seen[0]:]))
                seen[0] = len(s.body)
                return b"event: expired" in plain

            assert s.read_until(decoded, timeout=10), bytes(plain)
        assert plain.count(b": heartbeat\n\n") >= 1, plain
        assert b"event: challenge\n" in plain and b'event: expired\ndata: {"reason":"token_expired"}\n\n' in plain
        echo = json.loads(plain.split(b"\n\n")[0].split(b"data: ", 1)[1])
        assert "accept-encoding" not in echo["headers"], echo["headers"]
        assert env.stats().get("revenprox_streams_encoded") == 0
    finally:
        env.stop()


# ----------------------------------------------------------------------------------------------
# 24. Two client addresses drained the webhook budget; three opened the circuit with 4xx
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flooders", [2, 4])
def test_several_addresses_cannot_drain_the_webhook_budget(envoys, webhook, flooders):
    # Each address's share defaulted to half the budget: two addresses within their shares took
    # all of it. Now `flooders` addresses at 5x the rate each; a third sends fresh valid tokens.
    benv = envoys.get({"jwt_verifier": {"rate_limit_per_sec": 10}}, name="trust-budget-several")
    webhook.default = invalid()  # forged tokens: the webhook refuses them (after a call)
    base = 20 + 10 * flooders  # addresses of their own for each run
    stop = time.monotonic() + 3.0

    def flood_loop(i):
        sent, verified, t0 = 0, 0, time.monotonic()
        while time.monotonic() < stop and sent < 300:  # 50 requests per second: 5x the rate
            r = benv.get("/events/news", bearer(forged_token(100_000 * flooders + 1_000 * i + sent)),
                         source=f"127.0.0.{base + i}", timeout=3)
            sent, verified = sent + 1, verified + (r.status == 401)
            time.sleep(max(0.0, t0 + sent * 0.02 - time.monotonic()))
        return sent, verified

    fair = []

    def fair_loop():
        time.sleep(0.5)  # the floods have drained the initial budget
        for i in range(10):
            tok = new_token(f"light{flooders}-{i}")
            webhook.program(tok, valid(f"light{i}"))
            fair.append(benv.get("/events/news", bearer(tok), source=f"127.0.0.{base + 9}", timeout=3).status)
            time.sleep(0.2)

    with concurrent.futures.ThreadPoolExecutor(flooders + 1) as ex:
        floods = [ex.submit(flood_loop, i) for i in range(flooders)]
        ex.submit(fair_loop).result(timeout=30)
        floods = [f.result(timeout=30) for f in floods]
    print(f"{flooders} flooding addresses (sent, verified):", floods, "light client:", fair)
    assert all(sent >= 100 for sent, _ in floods), floods  # each really ran at several times the rate
    assert fair.count(200) >= 9, f"fresh valid tokens of a third address: {fair}"
    # The floods together got no more than the rate (10/s for ~3 s, plus the initial bucket).
    assert sum(v for _, v in floods) <= 10 * 4 + 10, floods


def test_webhook_4xx_never_opens_the_circuit_for_everyone(envoys, webhook):
    # Any client can make the webhook answer 400 (a malformed token it rejects as a bad request):
    # three addresses doing so opened the Envoy-wide circuit (min(threshold, 3) addresses).
    cenv = envoys.get({"jwt_verifier": {"circuit_breaker_threshold": 5, "circuit_breaker_timeout_sec": 60,
                                        "retry_attempts": 3}}, name="trust-4xx-circuit")
    bad = [new_token(f"four-hundred{i}") for i in range(18)]
    for t in bad:
        webhook.program(t, Behaviour(status=400))

    def attack(i):
        return cenv.get("/events/news", bearer(bad[i]), source=f"127.0.0.{60 + i % 3}", timeout=10).status

    opened_before = cenv.stats().get("revenprox_client_circuit_opened") or 0
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        statuses = list(ex.map(attack, range(len(bad))))
    assert set(statuses) == {503}, statuses  # each one a failure, not retried
    assert cenv.stats().get("revenprox_circuit_state") == 0
    good = []
    for i in range(5):
        tok = new_token(f"unaffected{i}")
        webhook.program(tok, valid(f"unaffected{i}"))
        good.append(cenv.get("/events/news", bearer(tok), source="127.0.0.64").status)
    assert good == [200] * 5, good
    assert cenv.stats().get("revenprox_circuit_opened") == 0
    # Nor their own circuits (third attack run, finding 31): the next valid token of each is served.
    assert (cenv.stats().get("revenprox_client_circuit_opened") or 0) == opened_before
    for a in range(3):
        tok = new_token(f"same-address{a}")
        webhook.program(tok, valid(f"same-address{a}"))
        assert cenv.get("/events/news", bearer(tok), source=f"127.0.0.{60 + a}").status == 200
