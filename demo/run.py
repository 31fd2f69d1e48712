#!/usr/bin/env python3
"""RevenProx demo: webhook (HS256) + SSE topic server + Envoy with revenprox.wasm, one command.

    make wasm envoy && python3 demo/run.py            # or: make demo
    python3 demo/run.py --check                       # start, prove it works, stop (exit 0/1)

Ports (override with environment variables):
    REVENPROX_DEMO_PORT=8080  REVENPROX_DEMO_ADMIN_PORT=9901
    REVENPROX_DEMO_WEBHOOK_PORT=9001  REVENPROX_DEMO_UPSTREAM_PORT=9002
Other environment: REVENPROX_DEMO_SECRET (HS256 secret; random by default),
    REVENPROX_WASM, REVENPROX_ENVOY (paths), REVENPROX_DEMO_DIR (work dir, default .build/demo).

Users and topics (the demo webhook's table): alice -> news, sports; bob -> news.
Everything listens on 127.0.0.1. Ctrl-C / SIGTERM stops every child (by PID).
"""
import argparse
import json
import os
import random
import secrets
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "e2e" / "servers"))
import jwtutil  # noqa: E402

TEMPLATE = REPO / "envoy" / "revenprox.yaml.tmpl"


def env_int(name, default):
    return int(os.environ.get(name, default))


class Demo:
    def __init__(self):
        self.port = env_int("REVENPROX_DEMO_PORT", 8080)
        self.admin_port = env_int("REVENPROX_DEMO_ADMIN_PORT", 9901)
        self.webhook_port = env_int("REVENPROX_DEMO_WEBHOOK_PORT", 9001)
        self.upstream_port = env_int("REVENPROX_DEMO_UPSTREAM_PORT", 9002)
        self.secret = os.environ.get("REVENPROX_DEMO_SECRET") or secrets.token_urlsafe(32)
        self.wasm = Path(os.environ.get("REVENPROX_WASM", REPO / "target/wasm32-wasip1/release/revenprox.wasm"))
        self.envoy = Path(os.environ.get("REVENPROX_ENVOY", REPO / ".venv/bin/envoy"))
        self.dir = Path(os.environ.get("REVENPROX_DEMO_DIR", REPO / ".build" / "demo"))
        self.children = []  # (name, Popen)
        self.logs = []

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, name, cmd, extra_env=None):
        log = open(self.dir / f"{name}.log", "wb")
        self.logs.append(log)
        env = dict(os.environ, **(extra_env or {}))
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.children.append((name, p))
        return p

    def stop(self):
        for name, p in reversed(self.children):
            if p.poll() is None:
                p.terminate()
        for name, p in reversed(self.children):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.children.clear()
        for f in self.logs:
            f.close()
        self.logs.clear()

    def check_children(self):
        for name, p in self.children:
            if p.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"demo: {name} exited with code {p.returncode}\n--- {name}.log ---\n{tail}")

    def wait_port(self, port, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port} after {timeout}s")

    def wait_envoy_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        self.wait_port(self.port, timeout=5)
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("demo: Envoy not ready; see " + str(self.dir / "envoy.log"))

    # -- setup -----------------------------------------------------------------------------------
    def preflight(self):
        missing = []
        if not self.wasm.is_file():
            missing.append(f"{self.wasm} (run `make wasm`)")
        if not self.envoy.is_file():
            missing.append(f"{self.envoy} (run `make envoy`)")
        if missing:
            raise SystemExit("demo: missing " + " and ".join(missing))
        for port in (self.port, self.admin_port, self.webhook_port, self.upstream_port):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do (TIME_WAIT is fine)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(f"demo: port {port} is busy (override with REVENPROX_DEMO_*_PORT)")
            finally:
                s.close()
        self.dir.mkdir(parents=True, exist_ok=True)

    def render(self):
        cfg = {
            "jwt_verifier": {"webhook_url": "http://auth.demo/verify", "webhook_cluster": "auth_webhook",
                             "timeout_ms": 2000, "retry_attempts": 1},
            "sse": {"heartbeat_interval_sec": 15},
        }
        text = string.Template(TEMPLATE.read_text()).substitute(
            LISTEN_PORT=self.port, ADMIN_PORT=self.admin_port, UPSTREAM_PORT=self.upstream_port,
            WEBHOOK_PORT=self.webhook_port, WASM_PATH=str(self.wasm),
            PLUGIN_CONFIG_JSON_STRING=json.dumps(json.dumps(cfg)),
            ACCESS_LOG_PATH=str(self.dir / "access.log"))
        path = self.dir / "envoy.yaml"
        path.write_text(text)
        return path

    def start(self):
        self.preflight()
        py = sys.executable
        servers = REPO / "e2e" / "servers"
        self.spawn("webhook", [py, str(servers / "webhook.py"), "--demo", "--port", str(self.webhook_port)],
                   {"REVENPROX_DEMO_SECRET": self.secret})
        self.spawn("sse_upstream", [py, str(servers / "sse_upstream.py"), "--demo", "--port", str(self.upstream_port),
                                    "--static-dir", str(REPO / "demo" / "static")])
        self.wait_port(self.webhook_port)
        self.wait_port(self.upstream_port)
        yaml_path = self.render()
        self.spawn("envoy", [str(self.envoy), "-c", str(yaml_path), "--concurrency", "2",
                             "--base-id", str(random.randint(100_000, 4_000_000)), "--log-level", "info",
                             "--file-flush-interval-msec", "500"])
        self.wait_envoy_ready()

    # -- tokens ----------------------------------------------------------------------------------
    def token(self, user, secret=None, ttl=3600):
        return jwtutil.make_jwt(sub=user, secret=(secret or self.secret), ttl=ttl)

    def examples(self):
        url = f"http://127.0.0.1:{self.port}"
        good = self.token("alice")
        bad = self.token("alice", secret="not-the-demo-secret")
        bob = self.token("bob")
        return url, good, bad, bob


def curl(args, timeout):
    p = subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout + 10)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def run_check(demo):
    url, good, bad, bob = demo.examples()
    failures = []
    # 1. alice on news: events arrive (stream is cut by curl --max-time: rc 28 is expected)
    rc, out, err = curl(["-N", "--max-time", "3.5", "-H", f"Authorization: Bearer {good}",
                         "-w", "\n__status=%{http_code}\n", f"{url}/events/news"], 3.5)
    events = [ln for ln in out.splitlines() if ln.startswith("data:")]
    print(f"check: alice /events/news -> {len(events)} events, curl rc={rc}")
    if "__status=200" not in out or len(events) < 2:
        failures.append(f"alice/news: expected >=2 events with 200, got rc={rc} out={out[:500]!r} err={err[:300]!r}")
    elif '"user": "alice"' not in out:
        failures.append(f"alice/news: events do not carry the verified user: {out[:300]!r}")
    # 2. token signed with the wrong secret: 401
    rc, out, err = curl(["--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
                         "-H", f"Authorization: Bearer {bad}", f"{url}/events/news"], 5)
    print(f"check: wrong-secret token -> {out}")
    if out.strip() != "401":
        failures.append(f"wrong secret: expected 401, got {out!r} rc={rc} {err[:300]!r}")
    # 3. bob is not allowed on sports: 401
    rc, out, err = curl(["--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
                         "-H", f"Authorization: Bearer {bob}", f"{url}/events/sports"], 5)
    print(f"check: bob /events/sports -> {out}")
    if out.strip() != "401":
        failures.append(f"bob/sports: expected 401, got {out!r}")
    # 4. the demo page is served without a token (filter disabled on that route)
    rc, out, err = curl(["--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/"], 5)
    print(f"check: GET / -> {out}")
    if out.strip() != "200":
        failures.append(f"demo page: expected 200, got {out!r}")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="start, verify events flow and a bad token gets 401, stop")
    args = ap.parse_args()

    demo = Demo()
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        demo.start()
        if args.check:
            failures = run_check(demo)
            if failures:
                print("demo check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
                print(f"logs in {demo.dir}", file=sys.stderr)
                return 1
            print("demo check OK")
            return 0
        url, good, bad, bob = demo.examples()
        print(f"""
RevenProx demo is running (logs and rendered config in {demo.dir})
  Envoy      {url}            admin http://127.0.0.1:{demo.admin_port}/stats/prometheus
  webhook    http://127.0.0.1:{demo.webhook_port}/verify   (HS256; alice -> news, sports; bob -> news)
  topics     http://127.0.0.1:{demo.upstream_port}/events/<topic>   (one event per second)
  web page   {url}/

Stream as alice (token valid 1 h):
  curl -N -H {shlex.quote('Authorization: Bearer ' + good)} {url}/events/news

Refused (token signed with the wrong secret -> 401):
  curl -i -H {shlex.quote('Authorization: Bearer ' + bad)} {url}/events/news

Refused (bob may not read sports -> 401):
  curl -i -H {shlex.quote('Authorization: Bearer ' + bob)} {url}/events/sports

Same token in the query string (stripped before the upstream and the access log):
  curl -N '{url}/events/sports?token={good}'

Ctrl-C to stop.
""", flush=True)
        while not stopping["flag"]:
            demo.check_children()
            time.sleep(0.5)
        print("\nstopping demo...", flush=True)
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
