"""Auth webhook for RevenProx tests and the demo: a real HTTP/1.1 server on 127.0.0.1.

Test mode (default, programmable):
    hook = WebhookServer(); hook.start()
    hook.program(token, Behaviour(verdict={...}))          # per-token override
    hook.program(token, Behaviour(...), Behaviour(...))     # a sequence: one per call, last one sticks
    hook.default = Behaviour(status=500)                    # default for every other token
    hook.calls / hook.calls_for(token)                      # every call received, in order

    Without an override the answer is a valid verdict whose user_id is the JWT's `sub`
    (or "ticket-user" for a non-JWT credential) and expires_at = now + 600.

Demo mode (standalone):
    python3 e2e/servers/webhook.py --demo --port 9001 --secret s3cret
    verifies the HS256 signature, the token's session (DemoSessions below) and the topic for the
    user (alice -> news, sports; bob -> news) using the contract's topic ids. POST /demo/issued
    {"jwt": ...} is how the demo's token endpoint reports a token it issued (204). Prints one
    `activity:` line per decision (user, topic, verdict; never a token) for `make demo`'s terminal.
"""
import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Optional, Union

try:  # imported as servers.webhook
    from . import jwtutil
    from .httpbase import QuietServer, serve_until_signalled
except ImportError:  # run as a script
    import jwtutil  # type: ignore
    from httpbase import QuietServer, serve_until_signalled  # type: ignore

DEMO_TOPICS = {"alice": ["news", "sports"], "bob": ["news"]}
_DEMO_TOPIC_NAMES = {jwtutil.topic_id(t): t for topics in DEMO_TOPICS.values() for t in topics}


def topic_label(topic_id: str) -> str:
    """A demo topic's name for its id, else the id's first 8 hex digits."""
    return _DEMO_TOPIC_NAMES.get(topic_id) or (topic_id[:8] + "…" if topic_id else "?")


def clock(ts) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def activity_line(text, ts=None) -> str:
    """A line of the demo's live activity: `activity: HH:MM:SS.mmm text` (demo/run.py shows them)."""
    ts = time.time() if ts is None else ts
    return f"activity: {clock(ts)}.{int(ts * 1000) % 1000:03d} {text}"


class DemoSessions:
    """The demo webhook's sessions (demo mode only).

    A session is the `sid` claim of the tokens that carry one, else their user (`sub`). Its expiry
    is the latest `exp` of any token of that session that the demo's token endpoint issued (it
    reports each one: POST /demo/issued) or that this webhook verified as valid. A correctly signed
    token whose session still has time left is valid until the SESSION's expiry, even when its own
    `exp` is earlier or already past: refreshing a session extends every token of it, as a refresh
    token would in a real login. So a stream that reconnects with the token it started with (a
    native EventSource with ?token= or a cookie does) gets the session's current expiry, and a
    challenge answered with any fresh token of the session moves it. A session whose latest expiry
    has passed is over: its tokens are refused."""

    def __init__(self):
        self._latest = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(claims: dict) -> str:
        sid = claims.get("sid")
        return f"sid:{sid}" if isinstance(sid, str) and sid else f"user:{claims.get('sub')}"

    def record(self, claims: dict):
        """A token of this session is good until its exp: the session lasts at least as long."""
        with self._lock:
            k = self.key(claims)
            self._latest[k] = max(self._latest.get(k, 0), int(claims["exp"]))

    def expiry(self, claims: dict):
        """The session's latest expiry (epoch seconds), or None when it never had a valid token."""
        with self._lock:
            return self._latest.get(self.key(claims))


_UNSET = object()


@dataclass
class Behaviour:
    """How the webhook answers one call.

    verdict: dict (sent as JSON) or callable(token, topic) -> dict; None = default verdict.
    status:  HTTP status code.
    body:    raw bytes sent as-is instead of a JSON verdict (e.g. malformed JSON).
    delay:   seconds to sleep before answering (timeouts).
    close:   read the request then close the connection without answering.
    """

    verdict: Union[None, dict, Callable[[str, str], dict]] = None
    status: int = 200
    body: Optional[bytes] = None
    delay: float = 0.0
    close: bool = False
    content_type: str = "application/json"


def valid(user_id, ttl=600, expires_at=_UNSET) -> Behaviour:
    exp = int(time.time()) + ttl if expires_at is _UNSET else expires_at
    return Behaviour(verdict={"valid": True, "user_id": user_id, "expires_at": exp})


def invalid() -> Behaviour:
    return Behaviour(verdict={"valid": False, "user_id": None, "expires_at": None})


@dataclass
class Call:
    method: str
    path: str
    headers: list  # [(name, value)] as received
    body: bytes
    time: float
    json: Any = None

    def header(self, name: str):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def jwt(self):
        return self.json.get("jwt") if isinstance(self.json, dict) else None

    @property
    def topic(self):
        return self.json.get("topic") if isinstance(self.json, dict) else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "revenprox-test-webhook"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet; calls are recorded instead
        if self.server.owner.verbose:
            sys.stderr.write("webhook: " + (fmt % args) + "\n")

    def _read_body(self) -> bytes:
        te = (self.headers.get("transfer-encoding") or "").lower()
        if "chunked" in te:
            out = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self):
        body = self._read_body()
        owner: WebhookServer = self.server.owner
        if owner.demo_secret is not None and urllib.parse.urlsplit(self.path).path == "/demo/issued":
            return self._issued(owner, body)
        try:
            parsed = json.loads(body) if body else None
        except Exception:
            parsed = None
        call = Call(self.command, self.path, list(self.headers.items()), body, time.time(), parsed)
        owner._record(call)
        beh = owner._behaviour_for(call)
        if beh.delay:
            time.sleep(beh.delay)
        if beh.close:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if beh.body is not None:
            payload = beh.body
        else:
            verdict = beh.verdict
            if callable(verdict):
                verdict = verdict(call.jwt or "", call.topic or "")
            if verdict is None:
                verdict = owner.default_verdict(call)
            payload = json.dumps(verdict).encode()
        try:
            self.send_response(beh.status)
            self.send_header("content-type", beh.content_type)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _issued(self, owner, body):
        """POST /demo/issued {"jwt": ...}: the demo's token endpoint issued this token (demo mode)."""
        try:
            token = json.loads(body).get("jwt")
        except (ValueError, AttributeError):
            token = None
        claims = jwtutil.verify_hs256(token, owner.demo_secret) if isinstance(token, str) else None
        if claims:
            owner.sessions.record(claims)
        self.send_response(204 if claims else 400)
        self.send_header("content-length", "0")
        self.end_headers()

    do_POST = _handle
    do_GET = _handle
    do_PUT = _handle


_Server = QuietServer


class WebhookServer:
    def __init__(self, host="127.0.0.1", port=0, demo_secret=None, topics=None, verbose=False, activity=None):
        self.host = host
        self.requested_port = port
        self.demo_secret = demo_secret  # not None -> demo mode
        self.topics = topics if topics is not None else DEMO_TOPICS
        self.verbose = verbose
        self.sessions = DemoSessions()  # demo mode only
        self.activity = activity or (lambda text: None)  # demo mode: one line per decision
        self.default = Behaviour()
        self._lock = threading.Lock()
        self._calls = []
        self._overrides = {}
        self._httpd = None
        self._thread = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self):
        self._httpd = _Server((self.host, self.requested_port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def stop(self):
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- programming -----------------------------------------------------------------------
    def program(self, token: str, *behaviours: Behaviour):
        """Answers for `token`: one behaviour per call in order, the last one repeats."""
        assert behaviours
        with self._lock:
            self._overrides[token] = list(behaviours)

    def reset(self):
        with self._lock:
            self._calls.clear()
            self._overrides.clear()
            self.default = Behaviour()

    def _behaviour_for(self, call: Call) -> Behaviour:
        with self._lock:
            seq = self._overrides.get(call.jwt)
            if seq:
                return seq.pop(0) if len(seq) > 1 else seq[0]
            return self.default

    # -- records -----------------------------------------------------------------------------
    def _record(self, call: Call):
        with self._lock:
            self._calls.append(call)

    @property
    def calls(self):
        with self._lock:
            return list(self._calls)

    def calls_for(self, token: str):
        return [c for c in self.calls if c.jwt == token]

    def wait_calls(self, token: str, n: int, timeout=3.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.calls_for(token)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        return self.calls_for(token)

    # -- verdicts ---------------------------------------------------------------------------
    def default_verdict(self, call: Call) -> dict:
        token, topic = call.jwt or "", call.topic or ""
        if self.demo_secret is not None:
            return self.demo_verdict(token, topic)
        payload = jwtutil.decode_unverified(token)
        user = payload.get("sub") if payload and isinstance(payload.get("sub"), str) else "ticket-user"
        return {"valid": True, "user_id": user, "expires_at": int(time.time()) + 600}

    def demo_verdict(self, token: str, topic: str) -> dict:
        """HS256 signature, then the user's topics, then the token's session (DemoSessions)."""
        refused = {"valid": False, "user_id": None, "expires_at": None}
        now = time.time()
        claims = jwtutil.verify_hs256(token, self.demo_secret, now=now, check_exp=False)
        if not claims or not isinstance(claims.get("sub"), str):
            self.activity(f"webhook  ? on {topic_label(topic)}: refused (not signed with the demo secret)")
            return refused
        user = claims["sub"]
        allowed = {jwtutil.topic_id(name) for name in self.topics.get(user, [])}
        if topic not in allowed:
            self.activity(f"webhook  {user} on {topic_label(topic)}: refused ({user} may not read it)")
            return refused
        if claims["exp"] > now:
            self.sessions.record(claims)
        session_exp = self.sessions.expiry(claims)
        if session_exp is None or session_exp <= now:
            self.activity(f"webhook  {user} on {topic_label(topic)}: refused (token and session expired)")
            return refused
        note = "" if session_exp == int(claims["exp"]) else f" (its session's; the token's own exp is {clock(claims['exp'])})"
        self.activity(f"webhook  {user} on {topic_label(topic)}: valid until {clock(session_exp)}{note}")
        return {"valid": True, "user_id": user, "expires_at": session_exp}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("WEBHOOK_PORT", "9001")))
    ap.add_argument("--demo", action="store_true", help="verify HS256 JWTs and authorize topics per user")
    ap.add_argument("--secret", default=os.environ.get("REVENPROX_DEMO_SECRET"), help="HS256 secret (demo mode)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.demo and not args.secret:
        ap.error("--demo needs --secret or REVENPROX_DEMO_SECRET")
    srv = WebhookServer(args.host, args.port, demo_secret=args.secret if args.demo else None, verbose=args.verbose,
                        activity=lambda text: print(activity_line(text), flush=True))
    srv.start()
    mode = "demo (HS256, topics: %s)" % json.dumps(DEMO_TOPICS) if args.demo else "test (accept all)"
    print(f"webhook listening on http://{args.host}:{srv.port}/verify mode={mode}", flush=True)
    serve_until_signalled(srv)


if __name__ == "__main__":
    main()
