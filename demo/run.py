#!/usr/bin/env python3
"""RevenProx demo: webhook (HS256) + SSE topic server + Envoy with revenprox.wasm, one command.

    make wasm envoy && python3 demo/run.py            # or: make demo
    python3 demo/run.py --check                       # start, prove it works, stop (exit 0/1)

Ports (override with environment variables):
    REVENPROX_DEMO_PORT=8080  REVENPROX_DEMO_ADMIN_PORT=9901
    REVENPROX_DEMO_WEBHOOK_PORT=9001  REVENPROX_DEMO_UPSTREAM_PORT=9002
Other environment: REVENPROX_DEMO_SECRET (HS256 secret; random by default),
    REVENPROX_WASM, REVENPROX_ENVOY (paths), REVENPROX_DEMO_DIR (work dir, default .build/demo).
    The demo app alone (--serve-app) also reads REVENPROX_DEMO_WEBHOOK_URL and
    REVENPROX_DEMO_ADMIN_URL (default: 127.0.0.1 and the ports above); docker-compose.yml sets them.
Session timing (browser page; e2e/test_browser.py makes them short):
    REVENPROX_DEMO_HEARTBEAT_SEC=5   REVENPROX_DEMO_CHALLENGE_SEC=10   (plugin sse.* settings)
    REVENPROX_DEMO_TOKEN_TTL_SEC=30  lifetime of the tokens the page gets from POST /demo/token
    REVENPROX_DEMO_EVENT_INTERVAL_SEC=1  default pace of the topic streams (a page may ask ?every=N)

Users and topics (the demo webhook's table): alice -> news, sports; bob -> news.
Everything listens on 127.0.0.1. Ctrl-C / SIGTERM stops every child (by PID).

The SSE upstream (cluster sse_upstream) is this file's demo app (`run.py --serve-app`): topic
streams, the browser page from demo/static/, the filter's counters for the page (GET
/demo/metrics, read from Envoy's admin) and POST /demo/token, which mints a demo token (demo only:
it hands out tokens to anyone who can reach it) and reports it to the webhook, whose sessions
(e2e/servers/webhook.py: SessionStore, WebhookServer.demo_sessions) then know it. docker-compose.yml runs the same processes.

While it runs, the terminal shows the demo's live activity, one line per webhook decision, token
issued, stream opened or closed, challenge, refresh and expiry (class Activity); never a token.
"""
import argparse
import calendar
import json
import mimetypes
import os
import random
import re
import secrets
import select
import shlex
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "e2e" / "servers"))
import jwtutil  # noqa: E402
from httpbase import start_event_stream  # noqa: E402
from webhook import DEMO_TOPICS as DEMO_USERS  # noqa: E402  (alice -> news, sports; bob -> news)
from webhook import activity_line, clock  # noqa: E402

TEMPLATE = REPO / "envoy" / "revenprox.yaml.tmpl"
STATIC_DIR = REPO / "demo" / "static"


def env_int(name, default):
    return int(os.environ.get(name, default))


# Default ports (REVENPROX_DEMO_*PORT override them); docker-compose.yml uses the same ones.
DEFAULT_PORTS = {"PORT": 8080, "ADMIN_PORT": 9901, "WEBHOOK_PORT": 9001, "UPSTREAM_PORT": 9002}
# The filter's own metrics at Envoy's admin (Prometheus names without Envoy's `wasmcustom.`).
METRICS_PATH = "/stats/prometheus?filter=wasmcustom.revenprox_"
SID = re.compile(r"[A-Za-z0-9_-]{1,64}")
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


def port_of(name):
    return env_int(f"REVENPROX_DEMO_{name}", DEFAULT_PORTS[name])


def demo_settings(env=None):
    """Session timing of the demo from `env` (default os.environ; {} gives the defaults)."""
    env = os.environ if env is None else env
    return {
        "heartbeat_interval_sec": int(env.get("REVENPROX_DEMO_HEARTBEAT_SEC", 5)),
        "challenge_before_expiry_sec": int(env.get("REVENPROX_DEMO_CHALLENGE_SEC", 10)),
        "token_ttl_sec": int(env.get("REVENPROX_DEMO_TOKEN_TTL_SEC", 30)),
        "event_interval_sec": float(env.get("REVENPROX_DEMO_EVENT_INTERVAL_SEC", "1")),
    }


def plugin_config(settings=None):
    """The plugin configuration of the demo (also rendered into deploy/compose/envoy.yaml)."""
    settings = settings or demo_settings()
    return {
        "jwt_verifier": {"webhook_url": "http://auth.demo/verify", "webhook_cluster": "auth_webhook",
                         "timeout_ms": 2000, "retry_attempts": 1},
        # RevenProx runs on every route: the page and its scripts pass, without an identity.
        "topic": {"other_paths": "pass"},
        "sse": {"heartbeat_interval_sec": settings["heartbeat_interval_sec"],
                "challenge_before_expiry_sec": settings["challenge_before_expiry_sec"]},
    }


# ------------------------------------------------------------------------------------------------
# The demo app: the SSE upstream behind Envoy (topic streams, the page, tokens for the page)
# ------------------------------------------------------------------------------------------------
class _AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "revenprox-demo-app"
    sys_version = ""

    def log_message(self, fmt, *args):
        sys.stderr.write("app: " + (fmt % args) + "\n")

    def _reply(self, status, body, ctype="application/json", extra=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.send_header("cache-control", "no-store")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _client_gone(self, wait):
        try:
            r, _, x = select.select([self.connection], [], [self.connection], wait)
            if x:
                return True
            if r:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return True
                time.sleep(wait)
        except OSError:
            return True
        return False

    def do_GET(self):
        app = self.server.app
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/events/"):
            return self._stream(url)
        if url.path == "/health":
            return self._reply(200, b"ok\n", "text/plain")
        if url.path == "/demo/settings":
            return self._reply(200, dict(app.settings, users=DEMO_USERS, admin_port=app.admin_port,
                                         metrics_path=METRICS_PATH))
        if url.path == "/demo/metrics":
            return self._metrics()
        if url.path == "/favicon.ico":
            return self._reply(204, b"", "image/x-icon")
        if url.path == "/demo/token":
            return self._reply(405, {"error": "method_not_allowed", "message": "POST {\"user\": \"alice\"}"},
                               extra=[("allow", "POST")])
        rel = "index.html" if url.path in ("", "/") else urllib.parse.unquote(url.path.lstrip("/"))
        full = (app.static_dir / rel).resolve()
        if full.is_file() and app.static_dir in full.parents:
            ctype = mimetypes.guess_type(str(full))[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            return self._reply(200, full.read_bytes(), ctype)
        return self._reply(404, b"not found\n", "text/plain")

    do_HEAD = do_GET

    def _metrics(self):
        """The filter's counters and gauges, read from Envoy's admin: {name: value}."""
        try:
            with urllib.request.urlopen(self.server.app.admin_url + METRICS_PATH, timeout=2) as r:
                text = r.read().decode()
        except OSError as e:
            return self._reply(502, {"error": "admin_unreachable", "message": str(e)})
        return self._reply(200, plain_metrics(text))

    def do_POST(self):
        """POST /demo/token: a token for `user`, from a JSON body {"user", "ttl_sec", "sid"} or the
        same query parameters (`?user=alice&ttl_sec=15&format=text` answers the bare token)."""
        app = self.server.app
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/demo/token":
            return self._reply(404, b"not found\n", "text/plain")
        req = dict(urllib.parse.parse_qsl(url.query))
        if body.strip().startswith(b"{"):
            try:
                req.update(json.loads(body))
            except ValueError:
                return self._reply(400, {"error": "bad_json", "message": "the body is not JSON"})
        user, ttl, sid = req.get("user"), req.get("ttl_sec", app.settings["token_ttl_sec"]), req.get("sid")
        if not isinstance(user, str) or user not in DEMO_USERS:
            return self._reply(400, {"error": "unknown_user", "message": f"user must be one of {sorted(DEMO_USERS)}"})
        try:
            ttl = int(ttl)
        except (TypeError, ValueError):
            ttl = 0
        if not 1 <= ttl <= 86400:
            return self._reply(400, {"error": "bad_ttl", "message": "ttl_sec: a whole number of seconds, 1 to 86400"})
        if sid is not None and not (isinstance(sid, str) and SID.fullmatch(sid)):
            return self._reply(400, {"error": "bad_sid", "message": "sid: 1 to 64 of A-Z a-z 0-9 _ -"})
        extra = {"jti": secrets.token_hex(8), **({"sid": sid} if sid else {})}
        token = jwtutil.make_jwt(sub=user, secret=app.secret, ttl=ttl, extra=extra)
        exp = jwtutil.decode_unverified(token)["exp"]
        reported = app.report_issued(token)
        activity(f"token    issued for {user}{f' (session {sid})' if sid else ''}, valid until {clock(exp)}"
                 + ("" if reported else " (the webhook did not take it: its session does not know it)"))
        if req.get("format") == "text":
            return self._reply(200, token.encode() + b"\n", "text/plain")
        self._reply(200, {"token": token, "user": user, "expires_at": exp, "ttl_sec": ttl, "sid": sid})

    def _stream(self, url):
        """The demo topic stream: an event every `every` seconds (query, default from settings)."""
        app = self.server.app
        topic = urllib.parse.unquote(url.path[len("/events/"):].split("/", 1)[0])
        try:
            every = float(urllib.parse.parse_qs(url.query).get("every", [app.settings["event_interval_sec"]])[0])
        except ValueError:
            every = app.settings["event_interval_sec"]
        every = min(max(every, 0.2), 60.0)
        if not start_event_stream(self):
            return
        user = self.headers.get("x-revenprox-user") or ""
        who = f"{user or '(no user)'} on {topic}"
        activity(f"stream   {who}: opened")
        seq, t0 = 0, time.monotonic()
        try:
            while True:
                data = {"topic": topic, "seq": seq, "user": user, "time": time.strftime("%H:%M:%S")}
                chunk = f"id: {seq}\nevent: message\ndata: {json.dumps(data)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                seq += 1
                if self._client_gone(every):
                    break
        except OSError:
            pass
        activity(f"stream   {who}: closed after {time.monotonic() - t0:.1f} s, {seq} event{'s' * (seq != 1)} sent")
        self.close_connection = True


class _AppServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 256

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def plain_metrics(text):
    """{name: value} of the unlabelled series in Envoy's Prometheus text (`name{} value`): the
    filter's counters and gauges, without the histogram's buckets, sum and count."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            name = parts[0][:-2] if parts[0].endswith("{}") else parts[0]
            if "{" not in name and not name.endswith(("_sum", "_count")):
                values[name] = float(parts[1])
    return values


def activity(text):
    """One line of live activity (the demo app's stdout; `make demo` shows it in its terminal)."""
    print(activity_line(JWT_LIKE.sub("<token>", text)), flush=True)


class DemoApp:
    def __init__(self, host, port, secret, static_dir=STATIC_DIR, settings=None, webhook_url=None, admin_url=None):
        self.secret = secret
        self.static_dir = Path(static_dir).resolve()
        self.settings = settings or demo_settings()
        # where the demo webhook (its sessions learn of every token issued here) and Envoy's
        # admin (the filter's counters for the page) are; docker-compose.yml sets both
        self.webhook_url = (webhook_url or os.environ.get("REVENPROX_DEMO_WEBHOOK_URL")
                            or f"http://127.0.0.1:{port_of('WEBHOOK_PORT')}")
        self.admin_url = (admin_url or os.environ.get("REVENPROX_DEMO_ADMIN_URL")
                          or f"http://127.0.0.1:{port_of('ADMIN_PORT')}")
        self.admin_port = port_of("ADMIN_PORT")  # published on the browser's host (the page links it)
        self.httpd = _AppServer((host, port), _AppHandler)
        self.httpd.app = self

    @property
    def port(self):
        return self.httpd.server_address[1]

    def report_issued(self, token):
        """Tells the webhook's sessions about a token issued here; False when it did not take it."""
        req = urllib.request.Request(self.webhook_url + "/demo/issued", data=json.dumps({"jwt": token}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 204
        except OSError:
            return False


def serve_app(host, port):
    """`run.py --serve-app`: run the demo app alone (make demo and docker compose start it)."""
    secret = os.environ.get("REVENPROX_DEMO_SECRET")
    if not secret:
        raise SystemExit("demo app: REVENPROX_DEMO_SECRET is not set")
    app = DemoApp(host, port, secret)
    print(f"demo app listening on http://{host}:{app.port}/ (topics, page, POST /demo/token) "
          f"settings={json.dumps(app.settings)}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=app.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    while not stop.wait(0.5):
        pass
    app.httpd.shutdown()
    app.httpd.server_close()
    return 0


class Demo:
    def __init__(self):
        self.port = env_int("REVENPROX_DEMO_PORT", DEFAULT_PORTS["PORT"])
        self.admin_port = env_int("REVENPROX_DEMO_ADMIN_PORT", DEFAULT_PORTS["ADMIN_PORT"])
        self.webhook_port = env_int("REVENPROX_DEMO_WEBHOOK_PORT", DEFAULT_PORTS["WEBHOOK_PORT"])
        self.upstream_port = env_int("REVENPROX_DEMO_UPSTREAM_PORT", DEFAULT_PORTS["UPSTREAM_PORT"])
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
        cfg = plugin_config()
        text = string.Template(TEMPLATE.read_text()).substitute(
            LISTEN_PORT=self.port, ADMIN_PORT=self.admin_port, UPSTREAM_PORT=self.upstream_port,
            WEBHOOK_PORT=self.webhook_port, WASM_PATH=str(self.wasm),
            PLUGIN_CONFIG_JSON_STRING=json.dumps(json.dumps(cfg)),
            ACCESS_LOG_PATH=str(self.dir / "access.log"), NORMALIZE_PATH="true",
            ESCAPED_SLASHES_ACTION="REJECT_REQUEST", XFF_NUM_TRUSTED_HOPS=0)
        path = self.dir / "envoy.yaml"
        path.write_text(text)
        return path

    def start(self):
        self.preflight()
        py = sys.executable
        servers = REPO / "e2e" / "servers"
        self.spawn("webhook", [py, str(servers / "webhook.py"), "--demo", "--port", str(self.webhook_port)],
                   {"REVENPROX_DEMO_SECRET": self.secret})
        self.spawn("sse_upstream", [py, str(Path(__file__).resolve()), "--serve-app", "--port", str(self.upstream_port)],
                   {"REVENPROX_DEMO_SECRET": self.secret,
                    "REVENPROX_DEMO_WEBHOOK_URL": f"http://127.0.0.1:{self.webhook_port}",
                    "REVENPROX_DEMO_ADMIN_URL": f"http://127.0.0.1:{self.admin_port}",
                    "REVENPROX_DEMO_ADMIN_PORT": str(self.admin_port)})
        self.wait_port(self.webhook_port)
        self.wait_port(self.upstream_port)
        yaml_path = self.render()
        # wasm:debug: the filter's own debug lines (stream opened, challenge sent, ...) reach the
        # log, and Activity shows them
        self.spawn("envoy", [str(self.envoy), "-c", str(yaml_path), "--concurrency", "2",
                             "--base-id", str(random.randint(100_000, 4_000_000)), "--log-level", "info",
                             "--component-log-level", "wasm:debug", "--file-flush-interval-msec", "500"])
        self.wait_envoy_ready()

    # -- tokens ----------------------------------------------------------------------------------
    def token(self, user, secret=None, ttl=3600):
        # a session of their own (sid): an hour-long token must not lengthen alice's other
        # sessions at the webhook (the page's, the lifecycle one-liner's)
        return jwtutil.make_jwt(sub=user, secret=(secret or self.secret), ttl=ttl, extra={"sid": "banner"})

    def examples(self):
        url = f"http://127.0.0.1:{self.port}"
        good = self.token("alice")
        bad = self.token("alice", secret="not-the-demo-secret")
        bob = self.token("bob")
        return url, good, bad, bob

    def lifecycle_ttl(self):
        """The one-liner's token lifetime: its first challenge comes 2 s after the first heartbeat."""
        s = demo_settings()
        return s["challenge_before_expiry_sec"] + s["heartbeat_interval_sec"] + 2

    def lifecycle_command(self):
        """A shell one-liner that shows a whole session from the terminal: two short-lived tokens
        from the demo's token endpoint; heartbeats on a quiet topic; the first challenge answered
        (refresh POST -> 204), the second not; event: expired; the reset (curl: (18))."""
        url = f"http://127.0.0.1:{self.port}"
        return (f"H={url}; a=; tok() {{ curl -s -X POST \"$H/demo/token?user=alice&ttl_sec={self.lifecycle_ttl()}&format=text\"; }}; "
                'curl -sSN -H "Authorization: Bearer $(tok)" "$H/events/news?every=60" | '
                'while IFS= read -r l; do echo "$l"; case "$l" in *x-challenge-response*) [ -z "$a" ] && a=1 && '
                'curl -s -o /dev/null -w ">>> refresh POST: %{http_code}\\n" -X POST '
                '-H "content-type: application/x-challenge-response" -H "Authorization: Bearer $(tok)" "$H/events/news";; '
                'esac; done')

    def banner(self):
        url, good, bad, bob = self.examples()
        s = demo_settings()
        ttl = self.lifecycle_ttl()
        total = ttl + ttl - s["challenge_before_expiry_sec"]
        return f"""
RevenProx demo is running (logs and rendered config in {self.dir})
  Envoy      {url}            admin http://127.0.0.1:{self.admin_port}/
  metrics    http://127.0.0.1:{self.admin_port}{METRICS_PATH}
  webhook    http://127.0.0.1:{self.webhook_port}/verify   (HS256; alice -> news, sports; bob -> news)
  web page   {url}/   (browser demo: log in as alice or bob, three ways to stream, challenges)
  topics     {url}/events/<topic>   (only through Envoy: the demo app behind it checks no token)

A whole session in about {total} s ({ttl} s tokens: heartbeats every {s['heartbeat_interval_sec']} s of silence, event: challenge
{s['challenge_before_expiry_sec']} s before expiry, answered once with a refresh POST -> 204, then event: expired and the reset, curl: (18)):
  {self.lifecycle_command()}

Stream as alice (token valid 1 h):
  curl -N -H {shlex.quote('Authorization: Bearer ' + good)} {url}/events/news

Refused (token signed with the wrong secret -> 401):
  curl -i -H {shlex.quote('Authorization: Bearer ' + bad)} {url}/events/news

Refused (bob may not read sports -> 401):
  curl -i -H {shlex.quote('Authorization: Bearer ' + bob)} {url}/events/sports

Same token in the query string (stripped before the upstream and the access log):
  curl -N '{url}/events/sports?token={good}'

Client recipes (curl, Node, Python): docs/clients.md. Ctrl-C to stop.

Live activity (one line per webhook decision, token issued, stream opened or closed, challenge,
refresh and expiry; never a token):"""


class Activity:
    """`make demo`'s live activity: one terminal line per

    - webhook decision and token issued, stream opened or closed: the `activity:` lines the webhook
      and the demo app print (webhook.log, sse_upstream.log);
    - refresh (the POST that answers a challenge) and refused stream: Envoy's access log;
    - challenge sent, stream expired, re-authorized: the filter's own lines (`revenprox: ...` in
      Envoy's log, at any level: Envoy runs with wasm:debug), every one but the heartbeats.

    Never a token: the filter strips them from the paths the access log records, the other
    sources print none, and anything that looks like a JWT is masked anyway. Lines read in one
    poll are printed in the order they happened."""

    OWN = re.compile(r"^activity: (\d\d:\d\d:\d\d\.\d{3}) (.*)$")
    ACCESS = re.compile(r'^\[(\S+)\] access "(\S+) (\S+) [^"]*" (\d{3}) (\S+) (\S*) bytes=\d+ dur=(\d+)ms')
    # `wasm log <plugin> <root id>[ <vm id>]: revenprox: ...` (a stream's lines carry one name more)
    FILTER_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\].*wasm log [^:]*: (revenprox: .*)$")
    def __init__(self, demo, out=None):
        self.demo = demo
        self.out = out or sys.stdout
        self.offsets = {}
        self.partial = {}

    @staticmethod
    def stamp(ts):
        return f"{clock(ts)}.{int(ts * 1000) % 1000:03d}"

    def new_lines(self, name):
        try:
            with open(self.demo.dir / name, "rb") as f:
                f.seek(self.offsets.get(name, 0))
                data = f.read(1 << 20)
                self.offsets[name] = f.tell()
        except FileNotFoundError:
            return []
        lines = (self.partial.pop(name, "") + data.decode("utf-8", "replace")).split("\n")
        if lines[-1]:
            self.partial[name] = lines[-1]
        return lines[:-1]

    def from_logs(self):
        """[(HH:MM:SS.mmm, text)] of the new log lines worth a line."""
        found = []
        for name in ("webhook.log", "sse_upstream.log"):
            found += [m.groups() for m in map(self.OWN.match, self.new_lines(name)) if m]
        for line in self.new_lines("access.log"):
            m = self.ACCESS.match(line)
            if not m or not m.group(3).startswith("/events"):
                continue
            start, method, path, status, details = m.group(1), m.group(2), m.group(3).split("?", 1)[0], m.group(4), m.group(6)
            try:
                ts = calendar.timegm(time.strptime(start[:19], "%Y-%m-%dT%H:%M:%S")) \
                    + float("0" + start[19:].rstrip("Z")) + int(m.group(7)) / 1000  # its end
            except ValueError:
                ts = time.time()
            if method == "POST":
                what = "the stream goes on with the new expiry" if status == "204" else "refused"
                found.append((self.stamp(ts), f"refresh  POST {path} -> {status} ({what})"))
            elif status != "200":
                found.append((self.stamp(ts), f"refused  {method} {path} -> {status} {details.strip('-')}".rstrip()))
        for line in self.new_lines("envoy.log"):
            m = self.FILTER_LINE.match(line)
            if m and " heartbeat sent " not in m.group(2) + " ":  # one per stream every few seconds
                found.append((m.group(1)[11:], f"filter   {m.group(2)}"))
        return found

    def say(self, found):
        for stamp, text in sorted(found, key=lambda f: f[0]):
            self.out.write(f"{stamp[:8]}  {JWT_LIKE.sub('<token>', text)}\n")
        self.out.flush()

    def run(self, stop):
        """Until `stop` is set: the logs every 0.25 s."""
        while not stop.wait(0.25):
            self.say(self.from_logs())
        self.say(self.from_logs())


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
    # 5. the page's token endpoint (through Envoy, filter disabled on that route): bob gets a
    #    token that opens news
    rc, out, err = curl(["--max-time", "5", "-X", "POST", "-H", "content-type: application/json",
                         "--data", '{"user":"bob"}', f"{url}/demo/token"], 5)
    try:
        page_token = json.loads(out)["token"]
    except (ValueError, KeyError, TypeError):
        page_token = None
        failures.append(f"POST /demo/token: expected a token, got rc={rc} {out[:300]!r} {err[:300]!r}")
    if page_token:
        rc, out, err = curl(["-N", "--max-time", "1.5", "-H", f"Authorization: Bearer {page_token}",
                             "-w", "\n__status=%{http_code}\n", f"{url}/events/news"], 1.5)
        print(f"check: page token for bob /events/news -> {'200' if '__status=200' in out else out[-40:]!r}")
        if "__status=200" not in out or '"user": "bob"' not in out:
            failures.append(f"page token: expected bob's events, got rc={rc} {out[:300]!r}")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="start, verify events flow and a bad token gets 401, stop")
    ap.add_argument("--serve-app", action="store_true",
                    help="run only the demo app (SSE upstream + page + POST /demo/token); needs REVENPROX_DEMO_SECRET")
    ap.add_argument("--host", default="127.0.0.1", help="--serve-app: address to listen on")
    ap.add_argument("--port", type=int, default=None, help="--serve-app: port (default REVENPROX_DEMO_UPSTREAM_PORT or 9002)")
    args = ap.parse_args()
    if args.serve_app:
        return serve_app(args.host, args.port if args.port is not None
                         else env_int("REVENPROX_DEMO_UPSTREAM_PORT", DEFAULT_PORTS["UPSTREAM_PORT"]))

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
        print(demo.banner(), flush=True)
        feed = Activity(demo)
        stop_feed = threading.Event()
        feeder = threading.Thread(target=feed.run, args=(stop_feed,), daemon=True)
        feeder.start()
        try:
            while not stopping["flag"]:
                demo.check_children()
                time.sleep(0.5)
        finally:
            stop_feed.set()
            feeder.join(timeout=5)
        print("\nstopping demo...", flush=True)
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
