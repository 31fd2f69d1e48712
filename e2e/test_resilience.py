"""Webhook resilience against a real Envoy (--concurrency 2): retries, circuit breaker, rate limit,
single flight. Each test programs the webhook's faults and asserts what clients and the webhook see,
and what the metrics and logs say.
"""
import concurrent.futures
import socket
import threading
import time

import pytest

from helpers import closed_port, new_token, sub_of, wait_until
from servers.webhook import Behaviour, valid
from test_core import assert_allowed, assert_error, bearer

RETRIES = 2
RETRYING = {"jwt_verifier": {"retry_attempts": RETRIES, "timeout_ms": 300, "circuit_breaker_threshold": 1000}}

FAULTS = {
    "status_500": Behaviour(status=500),
    "malformed_json": Behaviour(body=b'{"valid":'),
    "timeout": Behaviour(delay=0.8),
}


def counter(stats, name):
    return stats.get(name)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_ends_in_503_after_one_plus_retry_attempts_calls(envoys, webhook, fault):
    env = envoys.get(RETRYING, name="retrying")
    tok = new_token(f"fault-{fault}")
    webhook.program(tok, FAULTS[fault])
    s0 = env.stats()
    r = env.get("/events/news", bearer(tok), timeout=15)
    assert_error(r, 503, "auth_unavailable")
    # Let a slow webhook finish recording the last (timed-out) call.
    calls = webhook.wait_calls(tok, 1 + RETRIES, timeout=3)
    time.sleep(0.3)
    assert len(webhook.calls_for(tok)) == 1 + RETRIES
    s1 = env.stats()
    assert counter(s1, "revenprox_webhook_retries") - counter(s0, "revenprox_webhook_retries") == RETRIES
    kind = {"status_500": "status", "malformed_json": "malformed", "timeout": "timeout"}[fault]
    moved = counter(s1, f"revenprox_webhook_failures_{kind}") - counter(s0, f"revenprox_webhook_failures_{kind}")
    assert moved == 1 + RETRIES, f"revenprox_webhook_failures_{kind} moved by {moved}"
    gaps = [b.time - a.time for a, b in zip(calls, calls[1:])]
    assert all(g >= 0.09 for g in gaps), gaps


def test_dead_webhook_ends_in_503_after_one_plus_retry_attempts_calls(envoys):
    env = envoys.get(RETRYING, webhook_port=closed_port(), name="dead")
    s0 = env.stats()
    r = env.get("/events/news", bearer(new_token("dead")), timeout=15)
    assert_error(r, 503, "auth_unavailable")
    s1 = env.stats()
    assert counter(s1, "revenprox_webhook_calls") - counter(s0, "revenprox_webhook_calls") == 1 + RETRIES
    failures = counter(s1, "revenprox_webhook_failures") - counter(s0, "revenprox_webhook_failures")
    assert failures == 1 + RETRIES


def test_denial_is_an_answer_not_retried(envoys, webhook):
    env = envoys.get(RETRYING, name="retrying")
    tok = new_token("deny-once")
    webhook.program(tok, Behaviour(verdict={"valid": False, "user_id": None, "expires_at": None}))
    assert_error(env.get("/events/news", bearer(tok)), 401, "invalid_token")
    assert len(webhook.calls_for(tok)) == 1


BREAKER = {"jwt_verifier": {"retry_attempts": 0, "timeout_ms": 500, "circuit_breaker_threshold": 3,
                            "circuit_breaker_timeout_sec": 2}}


def _open_circuit(env, webhook, tag):
    # The Envoy-wide circuit opens on failures of several client addresses (one address only
    # opens its own circuit: test_one_client_cannot_open_the_circuit_for_the_others).
    for i in range(3):
        bad = new_token(f"{tag}-bad{i}")
        webhook.program(bad, Behaviour(status=500))
        assert_error(env.get("/events/news", bearer(bad), source=f"127.0.0.{10 + i}"), 503, "auth_unavailable")
    assert wait_until(lambda: env.stats().get("revenprox_circuit_state") == 1, timeout=3), "circuit did not open"


def test_circuit_probe_failure_reopens_and_logs_once(envoys, webhook):
    env = envoys.get(BREAKER, name="breaker-reopen")
    s0 = env.stats()
    _open_circuit(env, webhook, "reopen")
    r = env.get("/events/news", bearer(new_token("while-open")))
    body = assert_error(r, 503, "auth_unavailable")
    assert 1 <= int(r.header("retry-after")) <= 2, r.header("retry-after")
    assert "circuit" in body["message"]
    time.sleep(2.2)
    probe = new_token("probe-fails")
    webhook.program(probe, Behaviour(status=500))
    assert_error(env.get("/events/news", bearer(probe)), 503, "auth_unavailable")
    assert len(webhook.calls_for(probe)) == 1
    # Open again: the next request fails at once without a call.
    fresh = new_token("after-reopen")
    assert_error(env.get("/events/news", bearer(fresh)), 503, "auth_unavailable")
    assert webhook.calls_for(fresh) == []
    s1 = env.stats()
    assert counter(s1, "revenprox_circuit_opened") - counter(s0, "revenprox_circuit_opened") == 2
    assert counter(s1, "revenprox_circuit_rejected") - counter(s0, "revenprox_circuit_rejected") >= 2
    # Each opening is logged once for the whole Envoy (not once per worker).
    assert env.wait_log_count("circuit opened", 2) == 2, env.log_tail()


def test_exactly_one_probe_for_the_whole_envoy(envoys, webhook):
    env = envoys.get(BREAKER, name="breaker-probe")
    _open_circuit(env, webhook, "oneprobe")
    time.sleep(2.2)
    toks = [new_token(f"herd{i}") for i in range(12)]
    slow = valid("probe-user")
    slow.delay = 0.4
    for t in toks:
        webhook.program(t, slow)
    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        rs = list(ex.map(lambda t: env.get("/events/news", bearer(t), timeout=10), toks))
    statuses = sorted(r.status for r in rs)
    calls = sum(len(webhook.calls_for(t)) for t in toks)
    assert calls == 1, f"{calls} webhook calls while half-open (statuses {statuses})"
    assert statuses.count(200) == 1 and statuses.count(503) == 11, statuses
    # The probe succeeded: the circuit is closed again.
    assert wait_until(lambda: env.stats().get("revenprox_circuit_state") == 0, timeout=3)
    assert env.wait_log_count("circuit closed", 1) == 1, env.log_tail()
    other = new_token("closed-again")
    assert_allowed(env.get("/events/news", bearer(other)), sub_of(other))


# A probe that is never answered is given up after (timeout_ms + 1000) x (retry_attempts + 1).
ABANDON = {"jwt_verifier": {"retry_attempts": 0, "timeout_ms": 4000, "circuit_breaker_threshold": 2,
                            "circuit_breaker_timeout_sec": 1}}
ABANDON_PROBE_TIMEOUT = (4000 + 1000) * (0 + 1) / 1000
ABANDON_GIVEN_BACK_WITHIN = 1.5  # seconds after the probe's client left; far below the probe timeout


def test_half_open_probe_is_given_back_when_its_client_leaves(envoys, webhook):
    env = envoys.get(ABANDON, name="breaker-abandon")
    for i in range(2):
        bad = new_token(f"abandon-bad{i}")
        webhook.program(bad, Behaviour(status=500))
        assert_error(env.get("/events/news", bearer(bad), source=f"127.0.0.{10 + i}"), 503, "auth_unavailable")
    assert wait_until(lambda: env.stats().get("revenprox_circuit_state") == 1, timeout=3), "circuit did not open"
    time.sleep(1.2)  # circuit_breaker_timeout_sec: the next verification is the one probe
    # The probe's webhook answer hangs (past the call's own timeout): only its client leaving ends it.
    hang = new_token("abandon-probe")
    webhook.program(hang, Behaviour(delay=ABANDON_PROBE_TIMEOUT + 1))
    leaver = socket.create_connection(("127.0.0.1", env.port))
    try:
        leaver.sendall(f"GET /events/news HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hang}\r\n\r\n".encode())
        assert len(webhook.wait_calls(hang, 1, timeout=3)) == 1, "the probe did not reach the webhook"
        # While it is in flight, every other verification in the Envoy is refused without a call.
        blocked = new_token("abandon-blocked")
        assert_error(env.get("/events/news", bearer(blocked)), 503, "auth_unavailable")
        assert webhook.calls_for(blocked) == []
    finally:
        leaver.close()  # the probe's only waiter leaves while its webhook call is in progress
    left_at = time.monotonic()
    # The next verification (whichever worker it lands on) becomes the new probe. Envoy notices the
    # close asynchronously on the leaver's worker, so a refusal or two right after it are tolerated.
    nxt = new_token("abandon-next")  # the webhook's default answer: valid
    statuses = []
    while True:
        r = env.get("/events/news", bearer(nxt), timeout=5)
        statuses.append(r.status)
        if r.status != 503 or time.monotonic() - left_at > ABANDON_GIVEN_BACK_WITHIN:
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - left_at
    assert r.status == 200, (
        f"still refused {elapsed:.2f}s after the probe's client left (statuses {statuses}); "
        f"the abandoned probe would block every verification for {ABANDON_PROBE_TIMEOUT:.0f}s")
    assert_allowed(r, sub_of(nxt))
    assert elapsed < ABANDON_GIVEN_BACK_WITHIN < ABANDON_PROBE_TIMEOUT
    assert len(webhook.calls_for(nxt)) == 1  # the refusals before it made no call
    assert len(webhook.calls_for(hang)) == 1  # the abandoned probe was not called again
    # The new probe's answer closed the circuit; the late answer of the abandoned one changes nothing.
    assert wait_until(lambda: env.stats().get("revenprox_circuit_state") == 0, timeout=3)
    assert env.wait_log_count("circuit closed", 1) == 1, env.log_tail()
    assert env.wait_log_count("circuit half-open: probing the webhook", 2) == 2, env.log_tail()
    after = new_token("abandon-after")
    assert_allowed(env.get("/events/news", bearer(after)), sub_of(after))


def test_rate_limit_caps_webhook_calls_across_workers(envoys, webhook):
    env = envoys.get({"jwt_verifier": {"rate_limit_per_sec": 5}}, name="ratelimit-cap")
    time.sleep(1.1)  # a full bucket
    toks = [new_token(f"cap{i}") for i in range(30)]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        rs = list(ex.map(lambda t: env.get("/events/news", bearer(t), timeout=10), toks))
    elapsed = time.monotonic() - t0
    calls = sum(len(webhook.calls_for(t)) for t in toks)
    allowed = sum(r.status == 200 for r in rs)
    limited = [r for r in rs if r.status == 429]
    # A full bucket (5) plus what refills while the burst runs (5 per second).
    assert calls <= 5 + int(5 * elapsed) + 1, f"{calls} webhook calls in {elapsed:.2f}s at 5/s"
    assert allowed == calls and len(limited) == 30 - calls
    assert_error(limited[0], 429, "rate_limited")
    assert env.wait_log("rate limiting started") is not None, env.log_tail()


def test_thundering_herd_one_call_per_worker(envoys, webhook):
    env = envoys.get(name="herd")
    tok = new_token("herd")
    slow = valid(sub_of(tok))
    slow.delay = 0.8
    webhook.program(tok, slow)
    s0 = env.stats()
    n = 200
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        rs = list(ex.map(lambda _: env.get("/events/news", bearer(tok), timeout=20), range(n)))
    assert [r.status for r in rs] == [200] * n
    calls = len(webhook.calls_for(tok))
    assert calls <= 2, f"{calls} webhook calls for {n} identical concurrent misses (2 workers)"
    joins = env.stats().get("revenprox_singleflight_joins") - s0.get("revenprox_singleflight_joins")
    hits = env.stats().get("revenprox_cache_hits") - s0.get("revenprox_cache_hits")
    assert joins + hits + calls == n, (joins, hits, calls)


def test_waiters_survive_the_caller_disconnecting(envoys, webhook, upstream):
    env = envoys.get(name="orphan")
    tok = new_token("orphan")
    slow = valid(sub_of(tok))
    slow.delay = 0.6
    webhook.program(tok, slow)
    # Several clients, so that some share a worker with the one that leaves.
    leaver = socket.create_connection(("127.0.0.1", env.port))
    leaver.sendall(f"GET /events/news HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())
    time.sleep(0.1)
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(env.get, "/events/news", bearer(tok), timeout=10) for _ in range(6)]
        time.sleep(0.1)
        leaver.close()
        rs = [f.result() for f in futures]
    assert [r.status for r in rs] == [200] * 6
    assert env.alive
