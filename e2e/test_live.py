"""Live streams follow the webhook (issue 13) against a real Envoy (--concurrency 2):
re-verification of open streams every `sse.reverify_interval_sec` (revocation, another user,
fail-static on webhook failure, coalesced calls), the per-user stream limit
`sse.max_streams_per_user` across both workers, slot bookkeeping over 1,000 streams ended in every
way, and the validation of both keys.

Timing (contract, "SSE session"): a stream verified at t is verified again in
[t + 0.9 * interval, t + interval] (+ the timer's granularity); with an interval of 2 s that is
1.8-2.0 s after the stream opened or after the last answer. The server-side refresh runs half the
challenge window before the expiry (here challenge_before_expiry_sec 2 -> 1 s before): the tests
that count webhook calls give their tokens an expiry far outside the counting window, or count it.
"""
import concurrent.futures
import json
import re
import socket
import struct
import threading
import time
import uuid

import pytest

from helpers import Stream, marker, new_token, plugin_config, silent_stream_request, wait_until
from servers.jwtutil import topic_id
from servers.webhook import Behaviour, invalid, valid
from test_core import _worker_cx, assert_error, bearer
from test_sse import event_named, events_of

INTERVAL = 2
LIVE_CFG = {"sse": {"reverify_interval_sec": INTERVAL, "heartbeat_interval_sec": 1,
                    "challenge_before_expiry_sec": 2}}
LIMIT_CFG = {"sse": {"max_streams_per_user": 2, "heartbeat_interval_sec": 1}}
RESPONSE = "application/x-challenge-response"


@pytest.fixture(scope="module")
def lenv(envoys):
    return envoys.get(LIVE_CFG, name="live")


@pytest.fixture(scope="module")
def limenv(envoys):
    return envoys.get(LIMIT_CFG, name="limit")


def uid(tag):
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def metric(env, name):
    return env.stats().get(name)


def wait_metric(env, name, want, timeout=3.0):
    """Waits (bounded) until metric `name` is `want`; returns its last value."""
    wait_until(lambda: metric(env, name) == want, timeout=timeout, interval=0.05)
    return metric(env, name)


def open_stream(env, tok, topic="news", mode="silent", **hdrs):
    headers = {**bearer(tok), "x-upstream-mode": mode, **{k.replace("_", "-"): str(v) for k, v in hdrs.items()}}
    s = Stream(env.port, f"/events/{topic}", headers, timeout=10)
    assert s.status == 200, (s.status, s.read_for(0.5))
    return s


def open_tracked(env, tok, topic="news", mode="silent"):
    """A stream on a fresh connection, and the worker that accepted that connection (from the
    listener's per-worker connection counters; nothing else connects while a test runs)."""
    before = _worker_cx(env)
    s = Stream(env.port, f"/events/{topic}", {**bearer(tok), "x-upstream-mode": mode}, timeout=10)
    after = _worker_cx(env)
    grown = [w for w in after if after[w] > before.get(w, 0)]
    assert len(grown) == 1, f"could not tell the worker: {before} -> {after}"
    return s, grown[0]


def arrival(s, needle):
    """Monotonic time of the chunk that completed the first `needle` in the stream's text."""
    acc = b""
    for t, c in s.chunks:
        acc += c
        if needle.encode() in acc:
            return t
    raise AssertionError(f"{needle!r} never arrived: {s.text[-300:]!r}")


def expired_reason(text):
    blocks = event_named(text, "expired")
    assert len(blocks) == 1, f"expected one `event: expired`, got {len(blocks)}: {text[-400:]!r}"
    data = [ln[5:].lstrip() for ln in blocks[0].splitlines() if ln.startswith("data:")]
    return json.loads("\n".join(data))


def ticks_intact(text):
    """Every upstream tick event arrived whole (injections only between events)."""
    return all(re.fullmatch(r"id: [\d.]+\ndata: tick \d+", b) for b in events_of(text) if "tick" in b)


def on_both_workers(env, request, least=6, most=24):
    """Calls `request()` (one request on a fresh connection) until it ran at least `least` times
    and both workers took some (at most `most` times); returns the results."""
    before, out = _worker_cx(env), []
    while len(out) < most:
        out.append(request())
        after = _worker_cx(env)
        if len(out) >= least and sum(after[w] > before.get(w, 0) for w in after) >= 2:
            return out
    raise AssertionError(f"{most} connections, all on one worker: {before} -> {_worker_cx(env)}")


def wait_not_forwarded(upstream, needle, settle=0.3):
    time.sleep(settle)
    got = upstream.requests_containing(needle)
    assert got == [], f"request reached the upstream: {[(r.method, r.path) for r in got]}"


# ----------------------------------------------------------------------------------------------
# re-verification
# ----------------------------------------------------------------------------------------------
def test_revocation_reaches_the_stream_within_the_interval(lenv, webhook):
    tok, user = new_token("revoke"), uid("revoke")
    webhook.program(tok, valid(user))
    revoked0 = metric(lenv, "revenprox_streams_revoked")
    with open_stream(lenv, tok, mode="stream", x_upstream_interval=0.3) as s:
        # (a Stream's socket cannot be read again after a timeout: every read but the last ends on data)
        assert s.read_until(lambda t: "data: tick 2" in t, timeout=3), s.text
        webhook.program(tok, invalid())
        t_switch = time.monotonic()
        s.read_until(lambda t: event_named(t, "expired"), timeout=INTERVAL + 2)
        assert event_named(s.text, "expired"), f"no `event: expired` {time.monotonic() - t_switch:.1f}s " \
                                               f"after the webhook started refusing: {s.text[-300:]!r}"
        seen = arrival(s, "event: expired") - t_switch
        assert seen <= INTERVAL + 1, f"revocation seen {seen:.2f}s after the switch (interval {INTERVAL}s)"
        assert expired_reason(s.text) == {"reason": "revoked"}
        s.read_until(None, timeout=2)
        assert s.ended, "the stream must end after `event: expired`"
        assert ticks_intact(s.text), f"an injection split an upstream event: {s.text!r}"
        assert "tick" not in s.text.split("event: expired", 1)[1], "upstream bytes after `event: expired`"
    assert wait_metric(lenv, "revenprox_streams_revoked", revoked0 + 1) == revoked0 + 1
    # The refused credential is never served from the cache again, on either worker.
    calls0 = len(webhook.calls_for(tok))
    answers = on_both_workers(lenv, lambda: lenv.get("/events/news", bearer(tok)))
    for r in answers:
        assert_error(r, 401, "invalid_token")
    assert len(webhook.calls_for(tok)) == calls0 + len(answers), "a revoked credential was answered without the webhook"


def test_valid_stream_is_reverified_once_per_interval(lenv, webhook):
    """1 + 3 calls in 6.8 s, 1.7-2.25 s apart; the reverification's expires_at applies (the opening
    verdict's 6 s expiry would have brought a challenge at ~3-4 s and a server-side refresh)."""
    tok, user = new_token("periodic"), uid("periodic")
    webhook.program(tok, valid(user, expires_at=int(time.time()) + 6), valid(user, ttl=600))
    rev0 = metric(lenv, "revenprox_reverifications")
    with open_stream(lenv, tok) as s:
        s.read_for(6.8)
        assert not s.ended, (s.end_reason, s.text[-300:])
    time.sleep(0.3)  # a call in flight at the close would still be recorded
    calls = webhook.calls_for(tok)
    times = [c.time for c in calls]
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:])]
    assert len(calls) == 4, f"expected 1 + 3 calls in 6.8 s (interval {INTERVAL}s), got {len(calls)}; gaps {gaps}"
    assert all(1.7 <= g <= 2.25 for g in gaps), f"re-verifications not once per {INTERVAL}s interval: gaps {gaps}"
    assert all(c.jwt == tok and c.topic == topic_id("news") for c in calls)
    assert not event_named(s.text, "expired"), s.text[-300:]
    assert not event_named(s.text, "challenge"), \
        "challenge for the opening verdict's expiry: the re-verification's expires_at did not apply"
    assert s.text.count(": heartbeat") >= 5, s.text[-300:]
    assert wait_metric(lenv, "revenprox_reverifications", rev0 + 3) == rev0 + 3


def test_reverification_with_an_earlier_expiry_shortens_the_stream(lenv, webhook):
    tok, user = new_token("shorten"), uid("shorten")
    webhook.program(tok, valid(user, ttl=600), valid(user, expires_at=int(time.time()) + 4))
    with open_stream(lenv, tok) as s:
        s.read_until(None, timeout=8)
    assert event_named(s.text, "expired"), f"the re-verification's expiry did not apply: {s.text[-300:]!r}"
    assert expired_reason(s.text) == {"reason": "token_expired"}
    assert s.ended


def test_streams_of_one_worker_share_a_reverification(lenv, webhook):
    tok, user = new_token("share"), uid("share")
    webhook.program(tok, valid(user))
    first, w1 = open_tracked(lenv, tok)
    streams, second = [first], None
    try:
        assert first.status == 200
        # A second stream of the same token on the same worker (others are closed at once, long
        # before their first re-verification at 1.8 s).
        for _ in range(16):
            s, w = open_tracked(lenv, tok)
            assert s.status == 200
            if w == w1:
                second = s
                break
            s.close()
        assert second is not None, "16 connections never landed on the first stream's worker"
        streams.append(second)
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda st: st.read_for(6.8 - (time.monotonic() - first.t0)), streams))
        for s in streams:
            assert not s.ended and not event_named(s.text, "expired"), s.text[-300:]
    finally:
        for s in streams:
            s.close()
    time.sleep(0.3)
    reverifications = webhook.calls_for(tok)[1:]  # the first call opened the first stream
    assert len(reverifications) == 3, (
        f"two streams with one credential on one worker: expected one call per interval (3), got "
        f"{len(reverifications)} at {[round(c.time - reverifications[0].time, 2) for c in reverifications]}")


def test_another_user_id_revokes(lenv, webhook):
    tok, owner = new_token("other-user"), uid("owner")
    # open: the owner; re-verification: someone else; afterwards the webhook refuses the token.
    webhook.program(tok, valid(owner), valid(uid("someone-else")), invalid())
    revoked0 = metric(lenv, "revenprox_streams_revoked")
    # Both workers know the owner's verdict (one webhook call, then cache hits).
    for r in on_both_workers(lenv, lambda: lenv.get("/events/news", bearer(tok)), least=4):
        assert r.status == 200 and r.first_event_json()["headers"].get("x-revenprox-user") == owner, r
    assert len(webhook.calls_for(tok)) == 1
    with open_stream(lenv, tok, mode="stream", x_upstream_interval=0.3) as s:
        t0 = time.monotonic()
        s.read_until(lambda t: event_named(t, "expired"), timeout=INTERVAL + 2)
        assert event_named(s.text, "expired"), f"another user_id did not end the stream: {s.text[-300:]!r}"
        assert arrival(s, "event: expired") - t0 <= INTERVAL + 1
        assert expired_reason(s.text) == {"reason": "revoked"}
        s.read_until(None, timeout=2)
        assert s.ended
        assert ticks_intact(s.text), s.text
    assert wait_metric(lenv, "revenprox_streams_revoked", revoked0 + 1) == revoked0 + 1
    assert len(webhook.calls_for(tok)) == 2
    # The credential is not served from the cache (as the other user) again: every request asks the
    # webhook, which now refuses it.
    statuses = on_both_workers(lenv, lambda: lenv.get("/events/news", bearer(tok)))
    served = [r.first_event_json()["headers"].get("x-revenprox-user") for r in statuses if r.status == 200]
    served = [("owner" if u == owner else "other user" if u.startswith("someone-else") else u) for u in served]
    assert not served, (f"after the revocation the credential was served from the cache: {len(served)} of "
                        f"{len(statuses)} requests "
                        f"allowed, as {served}, with {len(webhook.calls_for(tok)) - 2} webhook calls")
    for r in statuses:
        assert_error(r, 401, "invalid_token")
    assert len(webhook.calls_for(tok)) == 2 + len(statuses)


def test_webhook_failure_keeps_the_stream_until_its_expiry(lenv, webhook):
    tok, user = new_token("failstatic"), uid("failstatic")
    exp = int(time.time()) + 8
    webhook.program(tok, valid(user, expires_at=exp), Behaviour(status=503))
    failures0 = metric(lenv, "revenprox_reverify_failures")
    with open_stream(lenv, tok) as s:
        s.read_until(lambda t: event_named(t, "expired"), timeout=12)
        s.read_until(None, timeout=2)
    assert event_named(s.text, "expired"), s.text[-300:]
    assert expired_reason(s.text) == {"reason": "token_expired"}, "a failed re-verification is not a revocation"
    assert s.ended
    t_expired = time.time() - (time.monotonic() - arrival(s, "event: expired"))
    assert exp - 0.3 <= t_expired <= exp + 1.5, f"ended {t_expired - exp:+.2f}s from the token's expiry"
    before_expiry = s.text.split("event: expired", 1)[0]
    assert before_expiry.count(": heartbeat") >= 5, "heartbeats stopped while the webhook failed"
    # A round every ~2.5 s (the interval after the last answer, which comes after 0.6 s of retries),
    # and the server-side refresh 1 s before the expiry: at least 3 rounds before the end.
    wait_until(lambda: metric(lenv, "revenprox_reverify_failures") >= failures0 + 3, timeout=3, interval=0.05)
    failures = metric(lenv, "revenprox_reverify_failures")
    assert failures - failures0 >= 3, f"reverify_failures +{failures - failures0}"
    # Each round is 1 + 3 tries (retry_attempts 3, 0.1/0.2/0.3 s apart); the rounds spread over the stream's life.
    failed = [c.time for c in webhook.calls_for(tok)[1:]]
    assert len(failed) >= 12 and failed[-1] - failed[0] >= 3.0, \
        f"the next interval did not try again: failed calls at {[round(t - failed[0], 2) for t in failed]}"


# ----------------------------------------------------------------------------------------------
# max_streams_per_user
# ----------------------------------------------------------------------------------------------
def assert_too_many(r):
    """429 too_many_streams with Retry-After and the JSON error body (test_core.assert_error)."""
    return assert_error(r, 429, "too_many_streams")


def test_stream_limit_per_user(limenv, webhook, upstream):
    user, other = uid("limited"), uid("unlimited")
    t1, t2, t3, t4 = (new_token(f"lim{i}") for i in range(4))
    tv = new_token("lim-other")
    for t in (t1, t2, t3, t4):
        webhook.program(t, valid(user))
    webhook.program(tv, valid(other))
    denied0 = metric(limenv, "revenprox_denied_too_many_streams")
    s1 = open_stream(limenv, t1, "news")
    s2 = open_stream(limenv, t2, "sports")
    opened = [s1, s2]
    try:
        m = marker()
        r = limenv.get(f"/events/weather?{m}", bearer(t3))
        assert_too_many(r)
        assert r.header("retry-after"), r.headers
        wait_not_forwarded(upstream, m)
        assert wait_metric(limenv, "revenprox_denied_too_many_streams", denied0 + 1) == denied0 + 1
        # Another user is not affected.
        sv = open_stream(limenv, tv, "weather")
        opened.append(sv)
        # A challenge response of the limited user is answered (it is not a stream, never counts).
        for _ in range(3):
            m = marker()
            r = limenv.get(f"/events/news?{m}", {**bearer(t4), "content-type": RESPONSE}, method="POST", body=b"")
            assert r.status == 204, r
            wait_not_forwarded(upstream, m, settle=0.05)
        assert_too_many(limenv.get("/events/weather", bearer(t3)))
        # One of the user's streams ends (the client goes away): a new one is accepted within 1 s.
        s1.close()
        t_close = time.monotonic()
        third = None
        while third is None and time.monotonic() - t_close < 1.5:
            s = Stream(limenv.port, f"/events/weather?{marker()}", {**bearer(t3), "x-upstream-mode": "silent"},
                       timeout=10)
            if s.status == 200:
                third = s
            else:
                assert s.status == 429, (s.status, s.read_for(0.3))
                s.close()
                time.sleep(0.05)
        took = time.monotonic() - t_close
        assert third is not None and took <= 1.0, f"a freed slot was not given back within 1 s (took {took:.2f}s)"
        opened.append(third)
        assert_too_many(limenv.get("/events/news", bearer(t1)))
    finally:
        for s in opened:
            s.close()


def test_stream_limit_counts_both_workers(limenv, webhook, upstream):
    """max_streams_per_user 2, one stream on each worker: the third is refused on either worker."""
    user = uid("spread")
    tokens = [new_token(f"spread{i}") for i in range(12)]
    for t in tokens:
        webhook.program(t, valid(user))
    opened, workers = [], []
    try:
        s, w = open_tracked(limenv, tokens[0], "news")
        assert s.status == 200
        opened.append(s)
        workers.append(w)
        # The second stream on the other worker: a stream on the same one is closed and tried again
        # (its slot comes back within 1 s).
        deadline = time.monotonic() + 15
        while len(opened) < 2 and time.monotonic() < deadline:
            s, w = open_tracked(limenv, tokens[1], "sports")
            if s.status == 200 and w != workers[0]:
                opened.append(s)
                workers.append(w)
                break
            assert s.status in (200, 429), s.status
            s.close()
            time.sleep(0.05 if s.status == 429 else 0.2)
        assert len(set(workers)) == 2, f"could not open the user's two streams on both workers: {workers}"
        # Requests of the user (other topics, other tokens) on fresh connections until both workers
        # took some: every one is refused and none is forwarded.
        n = iter(range(100))

        def third():
            i = next(n)
            m = marker()
            r = limenv.get(f"/events/topic{i}?{m}", bearer(tokens[2 + i % 10]))
            assert_too_many(r)
            wait_not_forwarded(upstream, m, settle=0.05)
            return r

        on_both_workers(limenv, third)
    finally:
        for s in opened:
            s.close()


# ----------------------------------------------------------------------------------------------
# no slot leaks: 1,000 streams of one user ended in every way
# ----------------------------------------------------------------------------------------------
CHURN_LIMIT = 3
CHURN_CFG = {"jwt_verifier": {"rate_limit_per_sec": 100000},
             "sse": {"max_streams_per_user": CHURN_LIMIT, "reverify_interval_sec": INTERVAL,
                     "heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 1, "max_connection_sec": 3}}
SLOW_WAYS = {"token_expired": 4, "revoked": 4, "max_duration": 4}
FAST_WAYS = ["close", "reset", "end", "abort", "h2_cancel"]


def _linger_reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _h2_cancel(port, path, headers, timeout=10.0):
    """HTTP/2: opens a stream, reads its headers (and the first event when allowed), cancels it
    with RST_STREAM, waits for a PING round trip (Envoy processed the reset), then closes.
    Returns the status."""
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1"),
                              (":path", path)] + list(headers.items()), end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body, ended, acked = None, b"", False, False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ended:
            if status is not None and (status != 200 or b"\n\n" in body):
                break
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"HTTP/2 connection closed (status {status})")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise AssertionError(f"HTTP/2 stream ended by {ev!r}")
            sock.sendall(conn.data_to_send())
        assert status is not None, "no HTTP/2 response"
        if not ended:
            conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        conn.ping(b"revenpx!")
        sock.sendall(conn.data_to_send())
        while time.monotonic() < deadline and not acked:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                acked = acked or isinstance(ev, h2.events.PingAckReceived)
        return status
    finally:
        sock.close()


class Churn:
    """One user's streams opened and ended one after another by CHURN_LIMIT threads. A 429 (a slot
    whose release has not landed yet) is retried; a slot must come back within 1 s."""

    def __init__(self, env, webhook, user, token):
        self.env, self.webhook, self.user, self.token = env, webhook, user, token
        self.lock = threading.Lock()
        self.done = {}
        self.retries = 0
        self.max_wait = 0.0
        self.reasons = {}

    def _open(self, tok, mode, topic):
        t0 = time.monotonic()
        while True:
            s = Stream(self.env.port, f"/events/{topic}", {**bearer(tok), "x-upstream-mode": mode}, timeout=10)
            if s.status == 200:
                with self.lock:
                    self.max_wait = max(self.max_wait, time.monotonic() - t0)
                return s
            body = s.resp.read()
            s.close()
            assert s.status == 429 and b"too_many_streams" in body, (s.status, body[:200])
            waited = time.monotonic() - t0
            assert waited <= 1.0, f"no slot came back within 1 s ({waited:.2f}s, at {sum(self.done.values())} streams)"
            with self.lock:
                self.retries += 1
            time.sleep(0.02)

    def _slot_free(self, t0):
        """Waits until a request of the user would not be refused (for the ways that cannot see
        their own 429)."""
        while True:
            r = self.env.get("/events/probe", {**bearer(self.token), "x-upstream-mode": "end"}, timeout=10)
            if r.status == 200:
                return
            assert r.status == 429, r
            assert time.monotonic() - t0 <= 1.0, "no slot came back within 1 s"
            with self.lock:
                self.retries += 1
            time.sleep(0.02)

    def one(self, way, i):
        topic = f"t{i % 7}"
        if way == "close":
            s = self._open(self.token, "silent", topic)
            s.read_until(lambda t: "\n\n" in t, timeout=5)
            s.close()
        elif way == "reset":
            s = self._open(self.token, "silent", topic)
            s.read_until(lambda t: "\n\n" in t, timeout=5)
            _linger_reset(s.conn.sock)
            s.close()
        elif way == "end":
            s = self._open(self.token, "end", topic)
            s.read_until(None, timeout=5)
            assert s.ended, "the upstream's end did not reach the client"
            s.close()
        elif way == "abort":
            # The client is gone before (or while) the response starts: any state must give the slot back.
            self._slot_free(time.monotonic())
            sock = socket.create_connection(("127.0.0.1", self.env.port), timeout=5)
            sock.sendall(silent_stream_request(self.token, topic))
            _linger_reset(sock)
            sock.close()
        elif way == "h2_cancel":
            t0 = time.monotonic()
            while True:
                status = _h2_cancel(self.env.port, f"/events/{topic}", {**bearer(self.token), "x-upstream-mode": "silent"})
                if status == 200:
                    break
                assert status == 429, status
                assert time.monotonic() - t0 <= 1.0, "no slot came back within 1 s (HTTP/2)"
                with self.lock:
                    self.retries += 1
                time.sleep(0.02)
        else:  # a slow way: the filter ends the stream
            tok = new_token(f"churn-{way}", register=False)
            if way == "token_expired":
                self.webhook.program(tok, valid(self.user, expires_at=int(time.time()) + 2))
            elif way == "revoked":
                self.webhook.program(tok, valid(self.user), invalid())
            else:
                self.webhook.program(tok, valid(self.user))
            s = self._open(tok, "silent", topic)
            s.read_until(None, timeout=6)
            assert s.ended, f"{way}: the stream did not end: {s.text[-200:]!r}"
            reason = expired_reason(s.text)["reason"]
            s.close()
            with self.lock:
                self.reasons.setdefault(way, []).append(reason)
        with self.lock:
            self.done[way] = self.done.get(way, 0) + 1

    def run(self, plan):
        def lane(items):
            for i, way in items:
                self.one(way, i)

        lanes = [plan[k::CHURN_LIMIT] for k in range(CHURN_LIMIT)]
        with concurrent.futures.ThreadPoolExecutor(CHURN_LIMIT) as ex:
            for f in [ex.submit(lane, items) for items in lanes]:
                f.result()


def test_no_slot_leaks_after_1000_streams(envoys, webhook):
    env = envoys.get(CHURN_CFG, name="churn")
    user, tok = uid("churn"), new_token("churn")
    webhook.program(tok, valid(user))
    slow = [w for w, n in SLOW_WAYS.items() for _ in range(n)]
    total = 1000
    ways = slow + [FAST_WAYS[i % len(FAST_WAYS)] for i in range(total - len(slow))]
    # Spread the slow ones over the run (and over the three lanes).
    step = len(ways) // len(slow)
    fast = iter(ways[len(slow):])
    slow_at = {k * step + 1: w for k, w in enumerate(slow)}
    plan = [(i, slow_at.get(i) or next(fast)) for i in range(total)]
    churn = Churn(env, webhook, user, tok)
    t0 = time.monotonic()
    churn.run(plan)
    took = time.monotonic() - t0
    assert sum(churn.done.values()) == total, churn.done
    for way in SLOW_WAYS:
        assert churn.reasons.get(way) == [way] * SLOW_WAYS[way], f"{way}: streams ended with {churn.reasons.get(way)}"
    assert wait_metric(env, "revenprox_open_streams", 0, timeout=5) == 0, "open_streams did not return to 0"
    # The user still has all of its slots, and no more.
    opened = []
    try:
        for i in range(CHURN_LIMIT):
            opened.append(churn._open(tok, "silent", f"after{i}"))
        assert_too_many(env.get("/events/after-extra", bearer(tok)))
    finally:
        for s in opened:
            s.close()
    assert wait_metric(env, "revenprox_open_streams", 0, timeout=5) == 0
    print(f"\n1,000 streams in {took:.1f}s ({churn.done}); 429 retries {churn.retries}, "
          f"longest wait for a slot {churn.max_wait:.2f}s")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
BAD = [
    ("reverify_too_large", {"reverify_interval_sec": 86401}, "sse.reverify_interval_sec"),
    ("reverify_negative", {"reverify_interval_sec": -1}, "sse.reverify_interval_sec"),
    ("reverify_string", {"reverify_interval_sec": "5"}, "sse.reverify_interval_sec"),
    ("max_streams_negative", {"max_streams_per_user": -1}, "sse.max_streams_per_user"),
    ("max_streams_fraction", {"max_streams_per_user": 1.5}, "sse.max_streams_per_user"),
    ("max_streams_string", {"max_streams_per_user": "2"}, "sse.max_streams_per_user"),
]


@pytest.mark.parametrize("sse,key", [(c, k) for _, c, k in BAD], ids=[i for i, _, _ in BAD])
def test_bad_live_config_refuses_envoy(envoys, sse, key):
    rc, log = envoys.expect_exit(plugin_config({"sse": sse}), name="badlive")
    assert rc is not None, "Envoy kept running with a bad plugin configuration"
    assert rc != 0, f"Envoy exited 0 with a bad configuration; log:\n{log[-3000:]}"
    naming = [ln for ln in log.splitlines() if "wasm log revenprox" in ln and key in ln]
    assert naming, f"no plugin log line names {key!r}; log:\n{log[-3000:]}"
    assert any(re.search(r"\[(error|critical|warning)\]", ln) for ln in naming), naming


@pytest.mark.parametrize("sse", [{"reverify_interval_sec": 0, "max_streams_per_user": 0},
                                 {"reverify_interval_sec": 86400, "max_streams_per_user": 1}],
                         ids=["zero", "upper_bounds"])
def test_live_config_bounds_accepted(envoys, sse):
    env = envoys.get({"sse": sse}, name="livebounds")
    assert env.alive
    assert env.get("/events/news").status == 401
