"""Second independent attack run: findings in the engine's shared state, one test each, against
the real Envoy and template (SECURITY.md, "Findings", 22 and later). Each failed on the build
before its fix.

Two workers (`--concurrency 2`): a test that needs a request on a given worker opens keep-alive
connections until one lands there (Envoy's per-worker `downstream_cx_total` tells which).
"""
import http.client
import threading
import time
import uuid

from helpers import SENT_TOKENS, new_token
from servers import jwtutil
from servers.webhook import Behaviour, invalid, valid
from test_core import _worker_cx, bearer


def connection_on_worker(env, avoid=None, tries=40):
    """A connected keep-alive HTTP/1.1 connection and the Envoy worker that accepted it."""
    for _ in range(tries):
        before = _worker_cx(env)
        c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
        c.connect()
        grown = []
        for _ in range(100):
            after = _worker_cx(env)
            grown = [w for w in after if after[w] > before.get(w, 0)]
            if grown:
                break
            time.sleep(0.02)
        assert len(grown) == 1, (before, after)
        if grown[0] != avoid:
            return c, grown[0]
        c.close()
    raise AssertionError("no connection landed on another worker")


def request(conn, method, path, headers, body=None):
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def jwt_for(sub):
    tok = jwtutil.make_jwt(sub=sub, ttl=600, secret=b"test-secret", extra={"jti": uuid.uuid4().hex})
    SENT_TOKENS.append(tok)
    return tok


# ----------------------------------------------------------------------------------------------
# 22. An allow decided before a revocation landed after it and was cached
# ----------------------------------------------------------------------------------------------
RACE = {"jwt_verifier": {"cache_ttl_sec": 300}, "sse": {"heartbeat_interval_sec": 1, "reverify_interval_sec": 2}}


def test_an_allow_in_flight_during_a_revocation_is_never_served_again(envoys, webhook):
    env = envoys.get(RACE, name="trust2-race")
    conn_a, w_a = connection_on_worker(env)
    conn_b, _ = connection_on_worker(env, avoid=w_a)
    j = new_token("revoked")
    ok = valid("revoked-user", ttl=600)
    # call 1 (worker A: an allow decided now, delivered in 3 s), call 2 (worker B's stream), then
    # refused for good (B's re-verification, and anything after).
    webhook.program(j, Behaviour(verdict=ok.verdict, delay=3.0), ok, invalid())
    result = {}

    def slow_get():
        result["a"] = request(conn_a, "GET", "/events/news", {**bearer(j), "x-upstream-mode": "end"})

    th = threading.Thread(target=slow_get)
    th.start()
    try:
        time.sleep(0.3)
        conn_b.request("GET", "/events/news", headers={**bearer(j), "x-upstream-mode": "silent"})
        rb = conn_b.getresponse()
        assert rb.status == 200
        body, deadline = b"", time.monotonic() + 6
        conn_b.sock.settimeout(6)
        while b'"reason":"revoked"' not in body and time.monotonic() < deadline:
            chunk = rb.read1(65536)
            if not chunk:
                break
            body += chunk
        assert b'{"reason":"revoked"}' in body, body[-300:]
    finally:
        th.join(10)
        conn_b.close()
    # Worker A's verdict came back after the revocation: asked again, and refused.
    assert result["a"][0] == 401, result["a"]
    conn_a.close()
    calls = len(webhook.calls_for(j))
    statuses = [env.get("/events/news", bearer(j)).status for _ in range(3)]
    assert statuses == [401, 401, 401], statuses
    assert len(webhook.calls_for(j)) == calls + 3, "a revoked credential was served from a cache"
