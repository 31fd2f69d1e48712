"""Soak (bounded, `make soak`, a few minutes): streams opening and closing with distinct and
repeated tokens, challenges, re-authorizations and expiries under load, round after round.

Asserts that nothing grows with traffic once warmed up: Envoy's RSS stops growing (the verdict
cache and the stream registry live in a fixed set of shared-data slots), open-stream bookkeeping
returns to zero after every round (per-stream state is freed), and the VM never fails.

Not part of `make test` (it runs for minutes); run it with `make soak`. SOAK_ROUNDS sets the
number of rounds (default 25, about two minutes).
"""
import concurrent.futures
import os
import time
import uuid

import pytest

from helpers import Stream, new_token, wait_until
from servers.webhook import valid
from test_core import bearer
from test_faults import VM_FAILURE_MARKS
from test_sse import event_named

ROUNDS = int(os.environ.get("SOAK_ROUNDS", "25"))
WARMUP = 3
CFG = {"jwt_verifier": {"cache_max_size": 500, "rate_limit_per_sec": 100000},
       "sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 1, "max_connection_sec": 3600}}


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def short_stream(env, tok, topic):
    r = env.get(f"/events/{topic}", bearer(tok), timeout=10)
    assert r.status == 200, r
    return 1


def expiring_stream(env, webhook, reauthorize):
    user = "soak-" + uuid.uuid4().hex[:10]
    old = new_token("soak-exp", register=False)
    webhook.program(old, valid(user, expires_at=int(time.time()) + 2))
    with Stream(env.port, "/events/news", {**bearer(old), "x-upstream-mode": "stream",
                                            "x-upstream-interval": "0.3"}, timeout=10) as s:
        assert s.status == 200
        assert s.read_until(lambda t: event_named(t, "challenge"), timeout=4), s.text[-200:]
        if reauthorize:
            new = new_token("soak-new", register=False)
            webhook.program(new, valid(user, ttl=3))
            r = env.get("/events/news", {**bearer(new), "content-type": "application/x-challenge-response"},
                        method="POST", body=b"")
            assert r.status == 204, r
            s.read_until(None, timeout=2.5)
            assert not event_named(s.text, "expired"), "re-authorized stream expired"
            return "extended"
        s.read_until(lambda t: event_named(t, "expired"), timeout=4)
        assert event_named(s.text, "expired"), s.text[-200:]
        return "expired"


def test_soak(envoys, webhook):
    env = envoys.get(CFG, name="soak", leak_check=False)
    repeated = [new_token(f"soak-rep{i}", register=False) for i in range(20)]
    rss = []
    total = 0
    for rnd in range(ROUNDS):
        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            jobs = [ex.submit(short_stream, env, new_token(f"soak-d{rnd}", register=False), "news")
                    for _ in range(600)]
            jobs += [ex.submit(short_stream, env, repeated[i % 20], "sports") for i in range(300)]
            lives = [ex.submit(expiring_stream, env, webhook, i % 2 == 0) for i in range(24)]
            total += sum(j.result() for j in jobs)
            outcomes = [j.result() for j in lives]
        assert outcomes.count("extended") == 12 and outcomes.count("expired") == 12, outcomes
        assert wait_until(lambda: env.stats().get("revenprox_open_streams") == 0, timeout=5), \
            "open-stream bookkeeping did not return to zero"
        rss.append(rss_kb(env.proc.pid))
        print(f"round {rnd + 1}/{ROUNDS}: {total} short streams so far, RSS {rss[-1] / 1024:.1f} MB", flush=True)
    log = env.envoy_log()
    assert not [m for m in VM_FAILURE_MARKS if m in log], "the wasm VM failed during the soak"
    stats = env.stats()
    assert stats.get("revenprox_reauthorizations") >= 12 * ROUNDS
    assert stats.get("revenprox_streams_expired") >= 12 * ROUNDS
    # After warm-up RSS stays flat: allow 5 % (or 4 MB) of allocator noise over the warm-up peak.
    warm = max(rss[:WARMUP])
    later = max(rss[WARMUP:])
    allowed = max(warm * 0.05, 4096)
    assert later - warm <= allowed, f"RSS kept growing after warm-up: {[r // 1024 for r in rss]} MB"
