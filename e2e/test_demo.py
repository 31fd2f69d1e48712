"""`make demo` works and shows a newcomer the whole session:

- `demo/run.py --check` on free ports: events arrive for alice, a token signed with the wrong
  secret gets 401, bob is refused on a topic he may not read, the page and its token endpoint;
- `demo/run.py` itself, with its default timings: the banner's lifecycle one-liner, run as a user
  would paste it, shows a first event, a heartbeat, a challenge, the refresh POST's 204, a second
  challenge, `event: expired` and curl's error 18, in under 30 s; the terminal's live activity
  has a line for each webhook decision, token, stream opened and closed, challenge, refresh and
  expiry, and no token; the banner names no URL of the unguarded demo app;
- the demo webhook's sessions (e2e/servers/webhook.py: SessionStore, WebhookServer.demo_sessions) and the demo app's token
  endpoint, in this process.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import ENVOY_BIN, REPO, WASM, free_port, run_dir, stop_process
from servers import jwtutil
from servers.webhook import WebhookServer

sys.path.insert(0, str(REPO / "demo"))
import run as demo_run  # noqa: E402

JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
NEWS = jwtutil.topic_id("news")
SPORTS = jwtutil.topic_id("sports")


def demo_env(tmp_dir, **extra):
    ports = {k: free_port() for k in ("PORT", "ADMIN_PORT", "WEBHOOK_PORT", "UPSTREAM_PORT")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVENPROX_DEMO_")}
    env.update({f"REVENPROX_DEMO_{k}": str(v) for k, v in ports.items()},
               REVENPROX_DEMO_DIR=str(tmp_dir), REVENPROX_WASM=str(WASM), REVENPROX_ENVOY=str(ENVOY_BIN), **extra)
    return env, ports


def test_demo_check(tmp_path):
    env, _ = demo_env(tmp_path)
    p = subprocess.run([sys.executable, str(REPO / "demo" / "run.py"), "--check"], env=env,
                       capture_output=True, text=True, timeout=90)
    logs = ""
    if p.returncode != 0:
        for name in ("envoy.log", "webhook.log", "sse_upstream.log"):
            f = tmp_path / name
            if f.exists():
                logs += f"\n--- {name} ---\n" + f.read_text(errors="replace")[-2000:]
    assert p.returncode == 0, f"demo --check failed\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}{logs}"
    assert "demo check OK" in p.stdout


def wait_for(path, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if pred(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not there after {timeout}s; {path}:\n{text[-4000:]}")
        time.sleep(0.1)


def test_demo_terminal_shows_a_whole_session_and_its_activity():
    out_dir = run_dir() / "demo-terminal"
    out_dir.mkdir(parents=True, exist_ok=True)
    env, ports = demo_env(out_dir / "demo")  # the default session timings
    out_path = out_dir / "terminal.txt"
    out = open(out_path, "wb")
    proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "run.py")], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        banner = wait_for(out_path, lambda t: "Live activity" in t or proc.poll() is not None, 40, "the banner")
        assert proc.poll() is None, banner
        # the banner names no URL of the demo app behind Envoy (it checks no token)
        assert f":{ports['UPSTREAM_PORT']}" not in banner, banner
        one_liner = [ln.strip() for ln in banner.splitlines() if ln.strip().startswith("H=")]
        assert len(one_liner) == 1, banner
        # ... pasted into a shell as it is
        t0 = time.monotonic()
        shell = subprocess.run(["bash", "-c", one_liner[0]], capture_output=True, text=True, timeout=40,
                               cwd=out_dir)
        took = time.monotonic() - t0
        seen = shell.stdout + shell.stderr
        (out_dir / "one-liner.txt").write_text(f"$ {one_liner[0]}\n{seen}\n(took {took:.1f} s)\n")
        assert took < 30, f"the lifecycle took {took:.1f} s:\n{seen}"
        steps = ['data: {"topic": "news"', ": heartbeat", "event: challenge", ">>> refresh POST: 204",
                 ": heartbeat", "event: challenge", "event: expired", 'data: {"reason":"token_expired"}',
                 "curl: (18) transfer closed with outstanding read data remaining"]
        pos = 0
        for step in steps:
            at = seen.find(step, pos)
            assert at >= 0, f"{step!r} missing (in this order: {steps}):\n{seen}"
            pos = at + len(step)
        # the terminal's live activity, one line each (the counters are polled every second)
        needed = [r"webhook  alice on news: valid until", r"token    issued for alice", r"stream   alice on news: opened",
                  r"filter   revenprox: challenge sent user=alice", r"refresh  POST /events/news -> 204",
                  r"filter   revenprox: stream expired \(token_expired\) user=alice",
                  r"stream   alice on news: closed after"]
        text = wait_for(out_path, lambda t: all(re.search(n, t) for n in needed), 10, f"activity lines {needed}")
        activity = text.split("Live activity", 1)[1]
        # open, refresh, and the filter's server-side refresh of the stream's own token half the
        # challenge window (5 s) before the second expiry, which no refresh reached
        assert len(re.findall(r"webhook  alice on news: valid until", activity)) == 3, activity
        assert len(re.findall(r"token    issued for alice", activity)) == 2, activity
        # the filter's own debug lines (Envoy runs with wasm:debug), so no counter-based line
        assert len(re.findall(r"challenge sent user=alice", activity)) == 2, activity
        assert "challenge sent to" not in activity and "heartbeat sent" not in activity, activity
        assert not JWT.search(activity), f"a token in the activity lines:\n{activity}"
        assert all(re.match(r"\d\d:\d\d:\d\d  \S", ln) for ln in activity.splitlines()[2:] if ln.strip()), activity
    finally:
        stop_process(proc, timeout=20)
        out.close()
    assert "stopping demo" in out_path.read_text()


# ----------------------------------------------------------------------------------------------
# the demo webhook's sessions and the demo app's token endpoint, in this process
# ----------------------------------------------------------------------------------------------
SECRET = "demo-test-secret"


def post(url, body, timeout=5):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else b"",
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


@pytest.fixture
def demo_webhook():
    lines = []
    srv = WebhookServer(demo_secret=SECRET, activity=lines.append).start()
    srv.activity_lines = lines
    yield srv
    srv.stop()


def verify(hook, token, topic=NEWS):
    status, _, body = post(f"http://127.0.0.1:{hook.port}/verify", {"jwt": token, "topic": topic})
    assert status == 200
    return json.loads(body)


def tok(sub="alice", exp=None, sid=None, secret=SECRET, ttl=60):
    return jwtutil.make_jwt(sub=sub, secret=secret, exp=exp, ttl=ttl, extra={"sid": sid} if sid else None)


def test_demo_webhook_sessions_carry_the_latest_expiry(demo_webhook):
    now = int(time.time())
    first = tok(exp=now + 5, sid="s1")
    assert verify(demo_webhook, first) == {"valid": True, "user_id": "alice", "expires_at": now + 5}
    # the token endpoint issued a later token of the same session: the older one now lasts as long
    later = tok(exp=now + 50, sid="s1")
    status, _, _ = post(f"http://127.0.0.1:{demo_webhook.port}/demo/issued", {"jwt": later})
    assert status == 204
    assert verify(demo_webhook, first)["expires_at"] == now + 50
    # a correctly signed token of the session whose own exp has passed: the session's expiry
    assert verify(demo_webhook, tok(exp=now - 10, sid="s1")) == {"valid": True, "user_id": "alice",
                                                                  "expires_at": now + 50}
    # other sessions are not extended: no sid = the user's own session, another sid its own
    assert verify(demo_webhook, tok(exp=now + 7))["expires_at"] == now + 7
    assert verify(demo_webhook, tok(exp=now + 8, sid="s2"))["expires_at"] == now + 8
    # refused: a session that never had a live token, a wrong signature, a topic not allowed,
    # and a report of a token not signed with the demo secret
    refused = {"valid": False, "user_id": None, "expires_at": None}
    assert verify(demo_webhook, tok(exp=now - 10, sid="s3")) == refused
    assert verify(demo_webhook, tok(exp=now - 10, sub="bob")) == refused
    assert verify(demo_webhook, tok(exp=now + 60, sid="s1", secret="not-the-demo-secret")) == refused
    assert verify(demo_webhook, tok(sub="bob", exp=now + 60), topic=SPORTS) == refused
    assert post(f"http://127.0.0.1:{demo_webhook.port}/demo/issued",
                {"jwt": tok(exp=now + 500, sid="s1", secret="x")})[0] == 400
    assert verify(demo_webhook, first)["expires_at"] == now + 50
    # one activity line per decision, none with a token
    lines = demo_webhook.activity_lines
    assert len(lines) == 10 and not any(JWT.search(ln) for ln in lines), lines
    assert "valid until" in lines[0] and "(its session's; the token's own exp is" in lines[1], lines
    assert "refused (not signed with the demo secret)" in lines[7], lines
    assert "bob may not read it" in lines[8], lines


def test_demo_token_endpoint_feeds_the_sessions(demo_webhook):
    app = demo_run.DemoApp("127.0.0.1", 0, SECRET, settings=demo_run.demo_settings({}),
                           webhook_url=f"http://127.0.0.1:{demo_webhook.port}", admin_url="http://127.0.0.1:9")
    threading.Thread(target=app.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    base = f"http://127.0.0.1:{app.port}/demo/token"
    try:
        # JSON: the page's way (a session id per login)
        status, ctype, body = post(base, {"user": "alice", "sid": "page-1", "ttl_sec": 5})
        assert status == 200 and ctype.startswith("application/json"), body
        first = json.loads(body)
        claims = jwtutil.decode_unverified(first["token"])
        assert claims["sid"] == "page-1" and claims["exp"] - claims["iat"] == 5 and first["ttl_sec"] == 5
        # query parameters and a bare token: the terminal one-liner's way
        status, ctype, body = post(f"{base}?user=alice&ttl_sec=40&format=text", None)
        assert status == 200 and ctype.startswith("text/plain"), body
        bare = body.decode().strip()
        assert jwtutil.verify_hs256(bare, SECRET)["sub"] == "alice" and "sid" not in jwtutil.decode_unverified(bare)
        # the webhook knows the issued tokens: a later one of session page-1 extends the first
        status, _, body = post(base, {"user": "alice", "sid": "page-1", "ttl_sec": 90})
        latest = json.loads(body)["expires_at"]
        assert verify(demo_webhook, first["token"])["expires_at"] == latest
        for bad in ({"user": "mallory"}, {"user": "alice", "ttl_sec": 0}, {"user": "alice", "ttl_sec": "x"},
                    {"user": "alice", "sid": "has space"}):
            assert post(base, bad)[0] == 400, bad
        # the page's counters: Envoy's admin is not there, and the page is told so
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{app.port}/demo/metrics", timeout=5)
        assert e.value.code == 502
    finally:
        app.httpd.shutdown()
        app.httpd.server_close()
