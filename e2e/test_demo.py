"""`make demo` works:

- `demo/run.py --check` on free ports: events arrive for alice, a token signed with the wrong
  secret gets 401, bob is refused on a topic he may not read, the page and its token endpoint;
- the demo webhook's sessions (e2e/servers/webhook.py: DemoSessions) and the demo app's token
  endpoint, in this process.
"""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import ENVOY_BIN, REPO, WASM, free_port
from servers import jwtutil
from servers.webhook import WebhookServer

sys.path.insert(0, str(REPO / "demo"))
import run as demo_run  # noqa: E402

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
    srv = WebhookServer(demo_secret=SECRET).start()
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


def test_demo_token_endpoint_feeds_the_sessions(demo_webhook):
    app = demo_run.DemoApp("127.0.0.1", 0, SECRET, settings=demo_run.demo_settings({}),
                           webhook_url=f"http://127.0.0.1:{demo_webhook.port}")
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
    finally:
        app.httpd.shutdown()
        app.httpd.server_close()
