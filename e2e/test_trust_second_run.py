"""Second independent attack run: findings in the engine's shared state, one test each, against
the real Envoy and template (SECURITY.md, "Findings", 25 and later). Each failed on the build
before its fix.

Two workers (`--concurrency 2`): a test that needs a request on a given worker opens keep-alive
connections until one lands there (Envoy's per-worker `downstream_cx_total` tells which).
"""
import concurrent.futures
import hashlib
import http.client
import struct
import threading
import time
import uuid

from helpers import SENT_TOKENS, Stream, new_token
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
        if len(grown) == 1 and grown[0] != avoid:
            return c, grown[0]
        c.close()  # another connection landed meanwhile (which one is ours?), or the wrong worker
    raise AssertionError("no connection landed on another worker")


def request(conn, method, path, headers, body=None):
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def stream_until_revoked(conn, token, path="/events/news", timeout=8.0):
    """Opens a silent stream with `token` on keep-alive `conn` and reads until the filter sends
    `event: expired` {"reason":"revoked"} (asserted)."""
    conn.request("GET", path, headers={**bearer(token), "x-upstream-mode": "silent"})
    resp = conn.getresponse()
    assert resp.status == 200
    body, deadline = b"", time.monotonic() + timeout
    conn.sock.settimeout(timeout)
    while b'"reason":"revoked"' not in body and time.monotonic() < deadline:
        chunk = resp.read1(65536)
        if not chunk:
            break
        body += chunk
    assert b'{"reason":"revoked"}' in body, body[-300:]


def jwt_for(sub):
    tok = jwtutil.make_jwt(sub=sub, ttl=600, secret=b"test-secret", extra={"jti": uuid.uuid4().hex})
    SENT_TOKENS.append(tok)
    return tok


# ----------------------------------------------------------------------------------------------
# 25. An allow decided before a revocation landed after it and was cached
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
        stream_until_revoked(conn_b, j, timeout=6)
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


# ----------------------------------------------------------------------------------------------
# 26. "User ids are JWT subs" learned per worker refused the refresh of a user whose id is not
#     the sub (or who opened the stream with a ticket) on the other worker
# ----------------------------------------------------------------------------------------------
LEARN = {"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 2, "reverify_interval_sec": 0,
                 "early_refresh_refusal": True}}
CR = "application/x-challenge-response"


def open_victim_stream(env, conn, webhook, opening, uid, ticket):
    path = f"/events/news?ticket={opening}" if ticket else "/events/news"
    headers = {"x-upstream-mode": "silent"} if ticket else {**bearer(opening), "x-upstream-mode": "silent"}
    webhook.program(opening, valid(uid, ttl=600))
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(65536)  # the echo event: the stream is open


def test_a_user_whose_id_is_not_the_sub_keeps_its_refresh_on_every_worker(envoys, webhook):
    for ticket in (False, True):
        env = envoys.get(LEARN, name=f"trust2-subjects-{'ticket' if ticket else 'jwt'}")
        stream_conn, w_stream = connection_on_worker(env)
        other_conn, w_other = connection_on_worker(env, avoid=w_stream)
        try:
            # Ordinary traffic on the other worker: ten users whose user_id is their sub.
            for i in range(10):
                st, _ = request(other_conn, "GET", "/events/news",
                                {**bearer(new_token(f"ordinary{i}")), "x-upstream-mode": "end"})
                assert st == 200
            # The victim: the IdP's sub "Victim.Smith-…", the webhook's user id lower-cased (or a
            # stream opened with a one-time ticket, which names no sub at all).
            sub = "Victim.Smith-" + uuid.uuid4().hex[:6]
            uid = sub.lower()
            opening = ("tkt_" + uuid.uuid4().hex) if ticket else jwt_for(sub)
            if ticket:
                SENT_TOKENS.append(opening)
            open_victim_stream(env, stream_conn, webhook, opening, uid, ticket)
            refresh = jwt_for(sub)
            webhook.program(refresh, valid(uid, ttl=3600))
            deadline = time.monotonic() + 3
            while True:  # the stream is registered Envoy-wide at its worker's next tick
                st, body = request(other_conn, "POST", "/events/news", {**bearer(refresh), "content-type": CR}, b"")
                if st == 204 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert st == 204, (ticket, w_stream, w_other, st, body, len(webhook.calls_for(refresh)))
        finally:
            stream_conn.close()
            other_conn.close()


# ----------------------------------------------------------------------------------------------
# 27. A key's presence buckets were a public function of (user, topic): an authenticated client
#     filled another key's two buckets with 16 streams (uncounted victim, refused refresh, no
#     stream limit)
# ----------------------------------------------------------------------------------------------
BUCKETS = 16_384


def _presence_key(*parts):
    """The presence key as core/src/sse/presence.rs computes it (public: SHA-256 of the parts)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack(">Q", len(p)))
        h.update(p)
    return h.digest()[:16]


def unsalted_buckets(key):
    """Where the key's records lived before the Envoy's salt: its first two words."""
    return [struct.unpack(">I", key[0:4])[0] % BUCKETS, struct.unpack(">I", key[4:8])[0] % BUCKETS]


def topics_into(user, bucket, n):
    """n topic names whose (user, topic) key had `bucket` as its first bucket."""
    out, i = [], 0
    while len(out) < n:
        name = f"t{i}"
        if unsalted_buckets(_presence_key(b"stream", user.encode(), jwtutil.topic_id(name).encode()))[0] == bucket:
            out.append(name)
        i += 1
    return out


def open_silent(port, tok, topic):
    s = Stream(port, f"/events/{topic}", {**bearer(tok), "x-upstream-mode": "silent"}, timeout=15)
    assert s.status == 200, s.status
    s.read_until(lambda t: "\n\n" in t, timeout=3)
    return s


def presence_full(env):
    return env.stats().get("revenprox_presence_full") or 0


def test_streams_on_chosen_topics_cannot_crowd_out_another_users_presence(envoys, webhook):
    env = envoys.get({"sse": {"heartbeat_interval_sec": 5, "challenge_before_expiry_sec": 2,
                              "reverify_interval_sec": 0}}, name="trust2-presence-victim")
    victim = "victim-" + uuid.uuid4().hex[:8]
    attacker = new_token("mallory")  # the default webhook: user_id = sub, any topic
    att = jwtutil.decode_unverified(attacker)["sub"]
    a, b = unsalted_buckets(_presence_key(b"stream", victim.encode(), jwtutil.topic_id("news").encode()))
    names = topics_into(att, a, 8) + topics_into(att, b, 8)
    streams = []
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            streams = list(ex.map(lambda n: open_silent(env.port, attacker, n), names))
        opening, refresh = jwt_for(victim), jwt_for(victim)
        webhook.program(opening, valid(victim, ttl=600))
        webhook.program(refresh, valid(victim, ttl=3600))
        sconn, w_stream = connection_on_worker(env)
        oconn, _ = connection_on_worker(env, avoid=w_stream)
        try:
            sconn.request("GET", "/events/news", headers={**bearer(opening), "x-upstream-mode": "silent"})
            resp = sconn.getresponse()
            assert resp.status == 200
            resp.read1(65536)
            deadline = time.monotonic() + 3
            while True:  # the victim's stream is registered Envoy-wide at its worker's next tick
                st, body = request(oconn, "POST", "/events/news", {**bearer(refresh), "content-type": CR}, b"")
                if st == 204 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert st == 204, f"the victim's refresh on the other worker: {st} {body!r}"
            assert presence_full(env) == 0
        finally:
            sconn.close()
            oconn.close()
    finally:
        for s in streams:
            s.close()


def test_streams_on_chosen_topics_cannot_lift_a_users_stream_limit(envoys, webhook):
    env = envoys.get({"sse": {"heartbeat_interval_sec": 5, "reverify_interval_sec": 0, "max_streams_per_user": 1}},
                     name="trust2-presence-limit")
    mallory = new_token("limited")
    m = jwtutil.decode_unverified(mallory)["sub"]
    a, b = unsalted_buckets(_presence_key(b"user", m.encode()))
    accomplices = []
    for i in range(16):  # one stream each, within their own limit, on topics aimed at mallory's buckets
        tok = new_token(f"accomplice{i}")
        uid = jwtutil.decode_unverified(tok)["sub"]
        (name,) = topics_into(uid, a if i < 8 else b, 1)
        accomplices.append((tok, name))
    streams, mine = [], []
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            streams = list(ex.map(lambda tn: open_silent(env.port, tn[0], tn[1]), accomplices))
        statuses = []
        for _ in range(5):
            s = Stream(env.port, "/events/news", {**bearer(mallory), "x-upstream-mode": "silent"}, timeout=10)
            statuses.append(s.status)
            mine.append(s)
        assert statuses == [200, 429, 429, 429, 429], statuses
        assert presence_full(env) == 0
    finally:
        for s in streams + mine:
            s.close()
