"""RevenProx SSE session behaviour (contract: "SSE session"): heartbeat, challenge,
re-authorization, expiry, max connection time, stream integrity and latency.

Timing: verdict `expires_at` values are whole seconds, so windows below allow +-1 s.
"""
import json
import re
import statistics
import time
import uuid

import pytest

from helpers import Stream, new_token
from servers.webhook import valid

SSE_CFG = {"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 2, "max_connection_sec": 3600}}
CHALLENGE_DATA = {"method": "POST", "headers": {"content-type": "application/x-challenge-response"}}
HEARTBEAT = ": heartbeat\n\n"


@pytest.fixture(scope="module")
def senv(envoys):
    return envoys.get(SSE_CFG, name="sse")


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def events_of(text):
    """Complete SSE blocks of a text (the unfinished tail is dropped)."""
    blocks = re.split(r"\r?\n\r?\n", text)
    return [b for b in blocks[:-1] if b.strip()]


def event_named(text, name):
    return [b for b in events_of(text) if re.search(rf"^event: ?{name}$", b, re.M)]


def strip_injected(text):
    text = text.replace(HEARTBEAT, "")
    return re.sub(r"event: ?challenge\n(?:[^\n]+\n)*\n", "", text)


def open_stream(env, tok, mode, **hdrs):
    headers = {**bearer(tok), "x-upstream-mode": mode, **{k.replace("_", "-"): str(v) for k, v in hdrs.items()}}
    s = Stream(env.port, "/events/news", headers, timeout=10)
    assert s.status == 200, (s.status, s.read_for(0.5))
    return s


def first_event_time(s):
    """Arrival time of the chunk that completed the upstream's first (echo) event."""
    acc = b""
    for t, c in s.chunks:
        acc += c
        if b"\n\n" in acc:
            return t
    raise AssertionError(f"first event never arrived: {s.body[:300]!r}")


# ----------------------------------------------------------------------------------------------
# heartbeat
# ----------------------------------------------------------------------------------------------
def test_heartbeat_when_upstream_is_silent(senv):
    tok = new_token("hb")
    with open_stream(senv, tok, "silent") as s:
        s.read_until(lambda t: t.count(HEARTBEAT) >= 2, timeout=4.5)
        text = s.text
        assert text.count(HEARTBEAT) >= 2, f"expected heartbeats every 1 s of silence, got {text!r}"
        assert text.index(HEARTBEAT) > text.index("\n\n"), "heartbeat before the first upstream event"
        t_first = first_event_time(s)
        acc, t_hb = b"", None
        for t, c in s.chunks:
            acc += c
            if HEARTBEAT.encode() in acc:
                t_hb = t
                break
        assert 0.7 <= t_hb - t_first <= 2.0, f"first heartbeat {t_hb - t_first:.2f}s after the last byte"


def test_no_heartbeat_while_upstream_talks(senv):
    tok = new_token("hb-busy")
    with open_stream(senv, tok, "stream", x_upstream_interval=0.3) as s:
        text = s.read_for(2.6)
        assert text.count("data: tick") >= 5, text
        assert HEARTBEAT not in text, "a heartbeat was sent although bytes went to the client"


def test_heartbeats_and_expiry_reach_a_stream_that_goes_quiet_right_after_a_burst(senv, webhook):
    """The filter holds only the chunks after which something may have to be written (README,
    "Performance"): chunks that end inside an event go on unheld. The last chunk of a burst ends an
    event, so it is held, and the silence after it still gets its heartbeats, the challenge and
    the expiry."""
    tok = new_token("burst")
    webhook.program(tok, valid("burst-user", expires_at=int(time.time()) + 5))
    with open_stream(senv, tok, "burst", x_upstream_burst=40) as s:
        s.read_until(lambda t: "data: burst 40\n\n" in t, timeout=4)
        t_burst = time.monotonic()
        s.read_until(None, timeout=8)
        text = s.text
        assert s.ended, f"the stream must end at the token's expiry: {text[-300:]!r}"
        body = text.split("\n\n", 1)[1]
        assert strip_injected(body.split("event: expired")[0]) == "".join(
            f"data: burst {n}\n\n" for n in range(1, 41)), "burst events changed or split"
        after = body.split("data: burst 40\n\n", 1)[1]
        assert after.count(HEARTBEAT) >= 2, f"no heartbeats in the silence after the burst: {after!r}"
        assert event_named(after, "challenge"), f"no challenge after the burst: {after!r}"
        assert event_named(after, "expired"), f"no `event: expired` after the burst: {after!r}"
        acc, t_hb = b"", None
        for t, c in s.chunks:
            acc += c
            if t >= t_burst and HEARTBEAT.encode() in acc.split(b"data: burst 40\n\n", 1)[-1]:
                t_hb = t
                break
        assert t_hb is not None and t_hb - t_burst <= 2.0, "the first heartbeat came late after the burst"


def test_heartbeat_never_inside_a_split_event(senv):
    tok = new_token("split")
    with open_stream(senv, tok, "split", x_upstream_split_delay=1.6) as s:
        s.read_until(None, timeout=8)
        text = s.text
        assert s.ended, "the upstream ended the response; the client should see the end"
        assert "data: first-half-second-half\n\n" in text, f"event split by an injection: {text!r}"
        assert HEARTBEAT in text.split("data: first-half-")[0], "1.6 s of silence between events: heartbeat expected"
        # upstream bytes unchanged and in order once the injected blocks are removed
        after_echo = text.split("\n\n", 1)[1]
        assert strip_injected(after_echo) == "data: first-half-second-half\n\ndata: after\n\n", after_echo


def test_upstream_events_pass_without_added_latency(senv):
    tok = new_token("latency")
    with open_stream(senv, tok, "stream", x_upstream_interval=0.1) as s:
        s.read_for(2.0)
        # map every tick to its arrival time
        lat, acc = [], b""
        for t_arrival, chunk in s.chunks:
            acc += chunk
            for m in re.finditer(rb"id: (\d+\.\d+)\ndata: tick \d+\n\n", acc):
                lat.append(time.time() - (time.monotonic() - t_arrival) - float(m.group(1)))
            acc = re.sub(rb"(?s)^.*\n\n", b"", acc) if b"\n\n" in acc else acc
        assert len(lat) >= 10, f"only {len(lat)} ticks: {s.body[:300]!r}"
        assert statistics.median(lat) < 0.05 and max(lat) < 0.3, f"latency median {statistics.median(lat):.3f}s max {max(lat):.3f}s"


# ----------------------------------------------------------------------------------------------
# challenge, re-authorization, expiry
# ----------------------------------------------------------------------------------------------
def test_challenge_before_expiry(senv, webhook):
    tok = new_token("chal")
    webhook.program(tok, valid("chal-user", expires_at=int(time.time()) + 5))
    t0 = time.monotonic()
    with open_stream(senv, tok, "stream", x_upstream_interval=0.5) as s:
        assert s.read_until(lambda t: event_named(t, "challenge"), timeout=6), f"no challenge: {s.text[-500:]!r}"
        elapsed = time.monotonic() - t0
        assert 1.5 <= elapsed <= 4.5, f"challenge after {elapsed:.2f}s (expected ~3 s: 2 s before expiry)"
        block = event_named(s.text, "challenge")[0]
        data = "\n".join(ln[5:].lstrip() for ln in block.splitlines() if ln.startswith("data:"))
        assert json.loads(data) == CHALLENGE_DATA
        # injected between events only: every tick block stays intact
        assert all(re.fullmatch(r"id: [\d.]+\ndata: tick \d+", b) for b in events_of(s.text)
                   if "tick" in b), s.text


def test_expired_stream_gets_event_and_ends(senv, webhook):
    tok = new_token("exp")
    webhook.program(tok, valid("exp-user", expires_at=int(time.time()) + 3))
    t0 = time.monotonic()
    with open_stream(senv, tok, "stream", x_upstream_interval=0.5) as s:
        s.read_until(None, timeout=7)
        elapsed = time.monotonic() - t0
        assert event_named(s.text, "expired"), f"no `event: expired`: {s.text[-400:]!r}"
        assert s.ended, "the filter must end the stream at expiry"
        assert 1.5 <= elapsed <= 5.0, f"stream ended after {elapsed:.2f}s (token expired after ~3 s)"
        assert "tick" not in s.text.split("event: expired", 1)[1], "upstream bytes after `event: expired`"


def test_expired_stream_on_silent_upstream(senv, webhook):
    tok = new_token("exp-silent")
    webhook.program(tok, valid("exp-silent-user", expires_at=int(time.time()) + 3))
    with open_stream(senv, tok, "silent") as s:
        s.read_until(None, timeout=7)
        assert event_named(s.text, "expired"), f"no `event: expired`: {s.text[-400:]!r}"
        assert s.ended


def reauth(env, tok, path="/events/news", extra=None):
    return env.get(path, {**bearer(tok), "content-type": "application/x-challenge-response", **(extra or {})},
                   method="POST", body=b"")


def test_reauthorization_extends_open_stream(senv, webhook, upstream):
    user = "reauth-" + uuid.uuid4().hex[:8]
    old, new = new_token("old"), new_token("new")
    webhook.program(old, valid(user, expires_at=int(time.time()) + 3))
    webhook.program(new, valid(user, ttl=600))
    with open_stream(senv, old, "stream", x_upstream_interval=0.5) as s:
        s.read_until(lambda t: event_named(t, "challenge"), timeout=4)
        m = uuid.uuid4().hex
        r = senv.get(f"/events/news?m={m}", {**bearer(new), "content-type": "application/x-challenge-response"},
                     method="POST", body=b"")
        assert r.status == 204, r
        assert upstream.requests_containing(m) == [], "the re-authorization POST was forwarded upstream"
        assert len(webhook.calls_for(new)) == 1
        s.read_for(4.0)  # well past the old expiry
        assert not event_named(s.text, "expired"), "stream expired although it was re-authorized"
        assert not s.ended
        tail = s.text[-200:]
        assert "data: tick" in tail, tail


def test_reauthorization_other_user_refused(senv, webhook, upstream):
    old, other = new_token("mine"), new_token("theirs")
    webhook.program(old, valid("owner-" + uuid.uuid4().hex[:6], expires_at=int(time.time()) + 3))
    webhook.program(other, valid("intruder-" + uuid.uuid4().hex[:6], ttl=600))
    with open_stream(senv, old, "stream", x_upstream_interval=0.5) as s:
        r = reauth(senv, other)
        assert r.status != 204 and 400 <= r.status < 500, r
        s.read_until(None, timeout=6)
        assert event_named(s.text, "expired"), "a refresh by another user must not extend the stream"


def test_reauthorization_without_open_stream_is_not_forwarded(senv, webhook, upstream):
    tok = new_token("lonely")
    m = uuid.uuid4().hex
    r = senv.get(f"/events/news?m={m}", {**bearer(tok), "content-type": "application/x-challenge-response"},
                 method="POST", body=b"")
    # nothing to extend: 204 or a refusal, but the POST is the filter's, never the upstream's
    assert r.status == 204 or 400 <= r.status < 500, r
    assert upstream.requests_containing(m) == []


def test_max_connection_sec(envoys, webhook):
    menv = envoys.get({"sse": {"heartbeat_interval_sec": 1, "max_connection_sec": 2}}, name="maxconn")
    tok = new_token("maxconn")
    t0 = time.monotonic()
    with open_stream(menv, tok, "stream", x_upstream_interval=0.5) as s:
        s.read_until(None, timeout=6)
        elapsed = time.monotonic() - t0
        assert event_named(s.text, "expired"), f"no `event: expired` at max_connection_sec: {s.text[-300:]!r}"
        assert s.ended and 1.5 <= elapsed <= 4.0, f"ended={s.ended} after {elapsed:.2f}s"


def test_open_streams_gauge(senv):
    def gauge():
        st = senv.stats()
        return st.get("revenprox_open_streams")

    assert senv.stats().has("revenprox_open_streams"), senv.stats().names()
    base = gauge()
    tok = new_token("gauge")
    with open_stream(senv, tok, "silent") as s:
        s.read_for(0.3)
        assert gauge() == base + 1
    deadline = time.monotonic() + 3
    while gauge() != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gauge() == base
