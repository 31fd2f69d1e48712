"""The client recipes of docs/clients.md against a real Envoy: real Node with the npm package
`eventsource` 4.1.1 (.build/clients-node, `make client-deps`), real Python with httpx-sse 0.4.3
(.venv), and curl.

Short sessions so that each client sees the whole lifecycle in seconds: tokens live 5 s (7 s for
the bare httpx-sse loop, so that a heartbeat surely follows an event with an `id:`), a challenge
2 s before expiry, a heartbeat after 1 s of silence, an upstream event every 2 s. Every client runs
at once (a module fixture, each a subprocess stopped by PID at its deadline); the tests then check
what each one saw against what the doc says:

- Node recipe (header via custom fetch): events, challenges, a 204 answer that carries the stream
  past the first token, `expired`, and no error or reconnection after it (it closes);
- bare Node EventSource with ?token=: `expired`, then `error` "terminated" (the reset), then a
  reconnection 3 s later with the same token, refused 401, and EventSource gives up;
- Python recipe: no empty heartbeat messages reach the app, the answer carries the stream past the
  first token, it returns the reason at `expired` without an exception;
- bare httpx-sse loop: `: heartbeat` surfaces as an empty `message` (florimondmanca/httpx-sse#35),
  `expired` arrives, then httpx.RemoteProtocolError;
- curl: `event: expired` is the last thing read, then exit 18 (HTTP/1.1) or 92 (HTTP/2).
"""
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler

import pytest

from helpers import CURL, REPO, Envoy, new_token, plugin_config, stop_process
from servers import jwtutil
from servers.httpbase import QuietServer
from servers.sse_upstream import SseUpstream
from servers.webhook import valid

CFG = {"sse": {"heartbeat_interval_sec": 1, "challenge_before_expiry_sec": 2}}
TTL = 5
DOC = REPO / "docs" / "clients.md"
CLIENTS = REPO / "e2e" / "clients"
NODE_DIR = REPO / ".build" / "clients-node"
RUN_TIMEOUT = 30.0


class TokenService:
    """GET /token?user=U[&ttl=S]: a fresh JWT for user U (exp = now + S, default TTL), programmed
    at the test webhook with expires_at = its exp. What a client's refresh endpoint would be."""

    def __init__(self, webhook):
        self.webhook = webhook
        self.issued = {}  # user -> [(token, exp)]
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                body = service.mint(q["user"], int(q.get("ttl", TTL))).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def mint(self, user, ttl=TTL):
        tok = new_token(f"client-{user}", ttl=ttl)
        exp = jwtutil.decode_unverified(tok)["exp"]
        self.webhook.program(tok, valid(user, expires_at=exp))
        with self.lock:
            self.issued.setdefault(user, []).append((tok, exp))
        return tok

    def url(self, user, ttl=TTL):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token?user={user}&ttl={ttl}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ticking():
    srv = SseUpstream(default_mode="stream", interval=2.0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cenv(webhook, ticking):
    env = Envoy(plugin_config(CFG), webhook_port=webhook.port, upstream_port=ticking.port, name="clients")
    env.start()
    yield env
    env.stop()


@pytest.fixture(scope="module")
def tokens(webhook):
    svc = TokenService(webhook)
    yield svc
    svc.stop()


class Run:
    def __init__(self, name, user, proc, started):
        self.name, self.user, self.proc, self.started = name, user, proc, started
        self.rc, self.out, self.err = None, "", ""

    @property
    def lines(self):
        return [json.loads(ln) for ln in self.out.splitlines() if ln.startswith("{")]

    def kinds(self):
        return [ln["kind"] for ln in self.lines]

    def __repr__(self):
        return f"{self.name} rc={self.rc}\nstdout:\n{self.out[-3000:]}\nstderr:\n{self.err[-2000:]}"


@pytest.fixture(scope="module")
def runs(cenv, tokens):
    node = shutil.which("node")
    assert node, "node not found: Node.js 20 or later is needed (docs/clients.md)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"eventsource 4 needs Node.js 20 or later, not {version}"
    pkg = NODE_DIR / "node_modules" / "eventsource" / "package.json"
    assert pkg.is_file(), f"{pkg} missing: run `make client-deps` (npm ci of e2e/clients)"
    assert json.loads(pkg.read_text())["version"] == "4.1.1"
    shutil.copy(CLIENTS / "follow.mjs", NODE_DIR / "follow.mjs")  # resolves `eventsource` there
    url = f"http://127.0.0.1:{cenv.port}/events/news"
    tag = uuid.uuid4().hex[:6]

    def user(name):
        return f"{name}-{tag}"

    commands = {
        "node-recipe": ([node, "follow.mjs", "recipe", url, tokens.url(user("node-recipe")), "1"], NODE_DIR),
        "node-plain": ([node, "follow.mjs", "plain", url, tokens.url(user("node-plain"))], NODE_DIR),
        "py-recipe": ([sys.executable, str(CLIENTS / "follow.py"), "recipe", url, tokens.url(user("py-recipe")), "1"],
                      CLIENTS),
        "py-plain": ([sys.executable, str(CLIENTS / "follow.py"), "plain", url, tokens.url(user("py-plain"), ttl=7)],
                     CLIENTS),
    }
    for name, extra in (("curl-h1", []), ("curl-h2", ["--http2-prior-knowledge"])):
        tok = tokens.mint(user(name))
        commands[name] = ([CURL, "-sSN", *extra, "-H", f"Authorization: Bearer {tok}", url], CLIENTS)
    started = {}
    procs = {}
    try:
        for name, (cmd, cwd) in commands.items():
            started[name] = time.time()
            procs[name] = Run(name, user(name), subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                                                 stderr=subprocess.PIPE, text=True), started[name])
        deadline = time.monotonic() + RUN_TIMEOUT
        for run in procs.values():
            try:
                run.out, run.err = run.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(run.proc, timeout=2)
                run.out, run.err = run.proc.communicate()
            run.rc = run.proc.returncode
    finally:
        for run in procs.values():
            stop_process(run.proc, timeout=2)
    return procs


def first_exp(tokens, run):
    return tokens.issued[run.user][0][1]


def upstream_requests(ticking, run):
    return [r for r in ticking.requests if r.header("x-revenprox-user") == run.user]


def recipe(path, start, end):
    text = path.read_text()
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def test_the_doc_shows_the_tested_recipes():
    doc = DOC.read_text()
    for path, start, end in ((CLIENTS / "follow.mjs", "// recipe:start\n", "// recipe:end"),
                             (CLIENTS / "follow.py", "# recipe:start\n", "# recipe:end")):
        code = recipe(path, start, end)
        assert code in doc, f"docs/clients.md does not show {path.name}'s recipe as it is tested"
    assert "eventsource@4.1.1" in doc and "httpx-sse==0.4.3" in doc and "Node.js 20" in doc
    assert "(docs/clients.md)" in (REPO / "README.md").read_text(), "README does not link docs/clients.md"


def test_node_recipe_answers_challenges_and_closes_at_expired(runs, tokens, ticking, webhook):
    run = runs["node-recipe"]
    assert run.rc == 0 and run.err == "", run
    kinds = run.kinds()
    assert kinds.count("open") == 1 and kinds.count("expired") == 1, run
    assert kinds[-1] == "expired" and run.lines[-1]["reason"] == "token_expired", run
    assert kinds.count("challenge") == 2, run  # answered the first, not the second
    assert "error" not in kinds, run  # closed at `expired`: neither the reset nor a reconnection surfaces
    messages = [ln for ln in run.lines if ln["kind"] == "message"]
    assert messages and all(m["data"] for m in messages), "a heartbeat reached onEvent"
    (old, exp1), (new, exp2) = tokens.issued[run.user]
    # the answer's verification, then the filter's server-side refresh of that token 1 s (half the
    # challenge window) before its expiry, which no later answer reached: same expiry, no extension
    assert [c.topic for c in webhook.calls_for(new)] == [jwtutil.topic_id("news")] * 2, "the answer was not verified"
    assert any(m["at"] > exp1 + 0.5 for m in messages), f"no event after the first token's expiry {exp1}: {run}"
    assert run.lines[-1]["at"] >= exp2 - 1.0, run
    assert len(upstream_requests(ticking, run)) == 1, "one connection for the whole session"


def test_node_eventsource_left_open_reconnects_with_the_expired_token_and_gives_up(runs, ticking):
    run = runs["node-plain"]
    assert run.rc == 0, run
    kinds = run.kinds()
    assert kinds.count("expired") == 1 and kinds.count("error") == 2, run
    i = kinds.index("expired")
    expired, reset, refused = run.lines[i], run.lines[i + 1], run.lines[i + 2]
    assert reset["kind"] == "error" and "terminated" in reset["message"] and reset["readyState"] == 0, run
    assert reset["t"] - expired["t"] < 2.0, "the reset follows `expired` within about a second"
    assert refused["kind"] == "error" and refused["code"] == 401 and refused["readyState"] == 2, run
    assert refused["t"] - reset["t"] >= 2.5, "EventSource waits 3 s before it reconnects"
    assert len(upstream_requests(ticking, run)) == 1, "the reconnection with the expired token was forwarded"


def test_python_recipe_skips_heartbeats_and_returns_at_expired(runs, tokens, webhook):
    run = runs["py-recipe"]
    assert run.rc == 0 and run.err == "", run
    lines = run.lines
    assert lines[-1]["kind"] == "expired" and lines[-1]["reason"] == "token_expired", run
    assert "raised" not in run.kinds(), run
    messages = [ln for ln in lines if ln["kind"] == "message"]
    assert messages and all(m["data"] for m in messages), "an empty heartbeat message reached on_event"
    (old, exp1), (new, exp2) = tokens.issued[run.user]
    assert [c.topic for c in webhook.calls_for(new)] == [jwtutil.topic_id("news")] * 2  # answer + server-side refresh
    assert any(m["at"] > exp1 + 0.5 for m in messages), run
    assert lines[-1]["at"] >= exp2 - 1.0, run


def test_httpx_sse_reports_heartbeats_as_empty_messages_and_raises_at_the_reset(runs):
    run = runs["py-plain"]
    assert run.rc == 0, run
    lines = run.lines
    empty = [i for i, ln in enumerate(lines) if ln["kind"] == "message" and ln["data"] == ""]
    assert empty, f"no `: heartbeat` surfaced as an empty message: {run}"
    for i in empty:  # they carry the last id seen: that is why httpx-sse dispatches them
        assert lines[i]["id"] and lines[i]["id"] == lines[i - 1]["id"], run
    kinds = [ln["kind"] for ln in lines]
    assert kinds[-2:] == ["expired", "raised"], run
    assert lines[-1]["type"] == "httpx.RemoteProtocolError", run
    assert "incomplete chunked read" in lines[-1]["message"], run
    assert lines[-1]["t"] - lines[-2]["t"] < 2.0, run


@pytest.mark.parametrize("name,rc,message", [
    ("curl-h1", 18, "curl: (18) transfer closed with outstanding read data remaining"),
    ("curl-h2", 92, "INTERNAL_ERROR"),
])
def test_curl_sees_expired_then_exits_with_the_reset(runs, name, rc, message):
    run = runs[name]
    assert run.rc == rc and message in run.err, run
    assert ": heartbeat" in run.out and "event: challenge" in run.out, run
    assert re.search(r'event: expired\ndata: \{"reason":"token_expired"\}\n\n\Z', run.out), \
        f"`event: expired` is not the last thing curl read: {run}"

