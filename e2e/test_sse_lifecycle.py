"""SSE session lifecycle details against a real Envoy (--concurrency 2): re-authorization reaching
streams on every worker, the refusals of a challenge response, Last-Event-ID resume, the upstream
being released at expiry, and the whole lifecycle over HTTP/2.
"""
import concurrent.futures
import json
import re
import subprocess
import time
import uuid

import pytest

from helpers import CURL, SENT_TOKENS, Stream, new_token
from servers import jwtutil
from servers.webhook import invalid, valid
from test_core import _worker_cx, assert_error
from test_sse import CHALLENGE_DATA, HEARTBEAT, event_named, open_stream

CFG = {"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 2, "max_connection_sec": 3600}}
RESPONSE = "application/x-challenge-response"


@pytest.fixture(scope="module")
def lenv(envoys):
    return envoys.get(CFG, name="lifecycle")


def challenge_response(env, tok, http2=False, path="/events/news"):
    headers = {"content-type": RESPONSE}
    if tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    return env.get(path, headers, method="POST", body=b"", http2=http2)


def test_reauthorization_reaches_streams_on_both_workers(lenv, webhook):
    user = "both-" + uuid.uuid4().hex[:8]
    old, new = new_token("both-old"), new_token("both-new")
    webhook.program(old, valid(user, expires_at=int(time.time()) + 4))
    webhook.program(new, valid(user, ttl=600))
    streams = []
    try:
        before = _worker_cx(lenv)
        # Open streams (each its own connection) until both workers hold at least one.
        for _ in range(12):
            streams.append(open_stream(lenv, old, "stream", x_upstream_interval=0.5))
            after = _worker_cx(lenv)
            if len(streams) >= 2 and sum(after[w] > before.get(w, 0) for w in after) >= 2:
                break
        after = _worker_cx(lenv)
        assert sum(after[w] > before.get(w, 0) for w in after) >= 2, f"streams on one worker only: {after}"
        r = challenge_response(lenv, new)
        assert r.status == 204, r
        assert r.body == b""
        # Read every stream at once (a Stream is read in one go: a timed-out socket cannot be read again).
        with concurrent.futures.ThreadPoolExecutor(len(streams)) as ex:
            list(ex.map(lambda st: st.read_for(6.0), streams))
        for s in streams:
            assert not event_named(s.text, "expired"), f"a stream expired despite the refresh: {s.text[-200:]!r}"
            assert not s.ended, (s.end_reason, s.text[-300:])
            # 0.5 s ticks: 9 or more means the stream lived well past the old expiry (+4 s).
            assert s.text.count("data: tick") >= 9, s.text[-300:]
    finally:
        for s in streams:
            s.close()


def test_refused_challenge_responses_keep_the_old_expiry(lenv, webhook):
    owner = "owner-" + uuid.uuid4().hex[:8]
    old, other, bad = new_token("keep-old"), new_token("keep-other"), new_token("keep-bad")
    webhook.program(old, valid(owner, expires_at=int(time.time()) + 4))
    webhook.program(other, valid("other-" + uuid.uuid4().hex[:8], ttl=600))
    webhook.program(bad, invalid())
    with open_stream(lenv, old, "stream", x_upstream_interval=0.5) as s:
        assert_error(challenge_response(lenv, other), 403, "user_mismatch")
        assert_error(challenge_response(lenv, bad), 401, "invalid_token")
        assert_error(challenge_response(lenv, None), 401, "missing_token")
        assert_error(challenge_response(lenv, "not-a-jwt"), 401, "invalid_token")
        s.read_until(lambda t: event_named(t, "expired"), timeout=8)
        assert event_named(s.text, "expired"), s.text[-300:]
        assert json.loads(event_named(s.text, "expired")[0].split("data: ", 1)[1]) == {"reason": "token_expired"}


def test_challenge_is_exact_and_once(lenv, webhook):
    tok = new_token("exact")
    webhook.program(tok, valid("exact-user", expires_at=int(time.time()) + 4))
    with open_stream(lenv, tok, "silent") as s:
        s.read_until(lambda t: event_named(t, "expired"), timeout=8)
    blocks = event_named(s.text, "challenge")
    assert len(blocks) == 1, s.text
    assert blocks[0] == "event: challenge\ndata: " + json.dumps(CHALLENGE_DATA, separators=(",", ":"))


def test_last_event_id_reaches_upstream_and_ids_are_untouched(lenv):
    tok = new_token("resume")
    with Stream(lenv.port, "/events/news", {"Authorization": f"Bearer {tok}", "Last-Event-ID": "1712.5",
                                            "x-upstream-mode": "stream", "x-upstream-interval": "0.3"}) as s:
        assert s.status == 200
        s.read_until(lambda t: t.count("data: tick") >= 3, timeout=5)
    echo = json.loads(s.text.split("\n", 1)[0][len("data: "):])
    assert echo["headers"].get("last-event-id") == "1712.5"
    ids = re.findall(r"^id: (.*)$", s.text, re.M)
    assert len(ids) >= 3 and all(re.fullmatch(r"\d+\.\d{6}", i) for i in ids), ids
    ticks = [int(n) for n in re.findall(r"^data: tick (\d+)$", s.text, re.M)]
    assert ticks == list(range(1, len(ticks) + 1)), "upstream events lost or reordered"


def test_expiry_releases_the_upstream_request(lenv, webhook):
    tok = new_token("release")
    webhook.program(tok, valid("release-user", expires_at=int(time.time()) + 2))

    def active():
        text = lenv.admin("/stats?filter=cluster.sse_upstream.upstream_rq_active")
        return int(re.search(r"upstream_rq_active: (\d+)", text).group(1))

    base = active()
    with open_stream(lenv, tok, "silent") as s:
        assert active() == base + 1
        s.read_until(lambda t: event_named(t, "expired"), timeout=6)
        assert event_named(s.text, "expired")
        deadline = time.monotonic() + 3
        while active() != base and time.monotonic() < deadline:
            time.sleep(0.05)
        assert active() == base, "the upstream request was not released at expiry"


def curl_stream_h2(env, tok, seconds, headers=()):
    cmd = [CURL, "-sS", "-N", "--http2-prior-knowledge", "--max-time", str(seconds),
           "-H", f"Authorization: Bearer {tok}"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(f"http://127.0.0.1:{env.port}/events/news")
    p = subprocess.run(cmd, capture_output=True, timeout=seconds + 5)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def test_http2_heartbeat_challenge_and_expiry(lenv, webhook):
    tok = new_token("h2-expire")
    webhook.program(tok, valid("h2-user", expires_at=int(time.time()) + 4))
    rc, out = curl_stream_h2(lenv, tok, 8, ["x-upstream-mode: silent"])
    assert HEARTBEAT in out, out
    assert event_named(out, "challenge"), out
    assert event_named(out, "expired"), out
    assert rc != 28, "the stream was still open when curl gave up: expiry did not end it"


def test_http2_reauthorization_extends(lenv, webhook):
    user = "h2-reauth-" + uuid.uuid4().hex[:6]
    old, new = new_token("h2-old"), new_token("h2-new")
    webhook.program(old, valid(user, expires_at=int(time.time()) + 3))
    webhook.program(new, valid(user, ttl=600))
    proc = subprocess.Popen(
        [CURL, "-sS", "-N", "--http2-prior-knowledge", "--max-time", "7", "-H", f"Authorization: Bearer {old}",
         "-H", "x-upstream-mode: stream", "-H", "x-upstream-interval: 0.5", f"http://127.0.0.1:{lenv.port}/events/news"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        r = challenge_response(lenv, new, http2=True)
        assert r.status == 204, r
        out, _ = proc.communicate(timeout=12)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 28, f"curl should have run to its --max-time (rc {proc.returncode})"
    assert not event_named(text, "expired"), text[-300:]
    assert text.count("data: tick") >= 10, text[-300:]


def test_a_misrouted_challenge_response_costs_no_webhook_call_once_user_ids_are_subs(envoys, webhook):
    """`sse.early_refresh_refusal: true`, one worker (--concurrency 1), the default webhook
    (user_id = the JWT's sub). Before the
    worker saw ten verdicts whose user_id is the token's sub, a challenge response of a user with
    no stream here is verified (one call, 403 user_mismatch); after, it is refused the same way
    with no call. A user with a stream here is verified as ever (204)."""
    env = envoys.get({"sse": {**CFG["sse"], "early_refresh_refusal": True}}, name="subjects", concurrency=1)
    early = new_token("stray-early")
    assert_error(challenge_response(env, early), 403, "user_mismatch")
    assert len(webhook.calls_for(early)) == 1
    owner = new_token("owner")
    with open_stream(env, owner, "stream", x_upstream_interval=0.5) as s:
        s.read_until(lambda t: "data: tick" in t, timeout=5)
        for i in range(10):
            tok = new_token(f"learn{i}")
            r = env.get("/events/news", {"Authorization": f"Bearer {tok}", "x-upstream-mode": "end"})
            assert r.status == 200, r
        late = new_token("stray-late")
        assert_error(challenge_response(env, late), 403, "user_mismatch")
        assert webhook.calls_for(late) == [], "a misrouted challenge response reached the webhook"
        # The owner's own refresh: same sub as the stream (a fresh token of that user).
        sub = jwtutil.decode_unverified(owner)["sub"]
        fresh = jwtutil.make_jwt(sub=sub, ttl=900, secret=b"test-secret", extra={"jti": uuid.uuid4().hex})
        SENT_TOKENS.append(fresh)
        r = challenge_response(env, fresh)
        assert r.status == 204, r
        assert len(webhook.calls_for(fresh)) == 1
    text = env.envoy_log()
    assert 'refresh refused: claimed user "stray-late-' in text, text[-2000:]
