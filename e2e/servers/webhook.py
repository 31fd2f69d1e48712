"""Auth webhook for RevenProx tests and the demo: a real HTTP/1.1 server on 127.0.0.1.

Test mode (default, programmable):
    hook = WebhookServer(); hook.start()
    hook.program(token, Behaviour(verdict={...}))          # per-token override
    hook.program(token, Behaviour(...), Behaviour(...))     # a sequence: one per call, last one sticks
    hook.default = Behaviour(status=500)                    # default for every other token
    hook.calls / hook.calls_for(token)                      # every call received, in order

    Without an override the answer is a valid verdict whose user_id is the JWT's `sub`
    (or "ticket-user" for a non-JWT credential) and expires_at = now + 600.

Session tracking (off by default; a test switches it on, conftest switches it off after it):
    store = hook.sessions = SessionStore(b"test-secret")   # or: webhook.py --sessions
    store.register(user="alice", expires_at=exp)           # the token issuer tells the store
    A session is the token's `sid` claim when it has one, else its `sub`. The webhook records the
    latest `exp` of every valid token it verifies (and every expiry registered directly), and
    answers a token whose signature is valid with expires_at = its session's latest expiry as
    long as that is in the future, even when the token's own `exp` is earlier or already past.
    This is the webhook the filter's server-side refresh relies on (issue 14): a stream whose
    refresh POST reached another replica asks again with its own, older token and learns the
    session's newest expiry. Per-token programs and a custom `default` still take precedence.

Demo mode (standalone):
    python3 e2e/servers/webhook.py --demo --port 9001 --secret s3cret
    verifies the HS256 signature, the topic for the user (alice -> news, sports; bob -> news)
    using the contract's topic ids, and the token's session (a SessionStore, always on in demo
    mode). POST /demo/issued {"jwt": ...} is how the demo's token endpoint reports a token it
    issued (204). Prints one `activity:` line per decision (user, topic, verdict; never a token)
    for `make demo`'s terminal.
"""
import argparse
import inspect
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


_UNSET = object()


@dataclass
class Behaviour:
    """How the webhook answers one call.

    verdict: dict (sent as JSON) or callable(token, topic) -> dict, or callable(token, topic, call)
             -> dict to see the whole call (its JSON body: `kind`); None = default verdict.
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


class SessionStore:
    """Session-tracking verification (see the module docstring). Thread-safe."""

    REFUSED = {"valid": False, "user_id": None, "expires_at": None}

    def __init__(self, secret):
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self._lock = threading.Lock()
        self._latest = {}  # ("sid", id) or ("sub", user) -> latest expiry (Unix seconds)

    @staticmethod
    def key_of(claims: dict):
        sid = claims.get("sid")
        return ("sid", sid) if isinstance(sid, str) else ("sub", claims.get("sub"))

    def register(self, *, expires_at: int, user: Optional[str] = None, sid: Optional[str] = None):
        """The token issuer's word: session `sid` (or, without one, user `user`) lasts until
        `expires_at`. Only ever extends a session."""
        assert (user is None) != (sid is None), "a session is a sid or a user"
        key = ("sid", sid) if sid is not None else ("sub", user)
        with self._lock:
            self._latest[key] = max(self._latest.get(key, 0), int(expires_at))

    def latest(self, *, user: Optional[str] = None, sid: Optional[str] = None):
        key = ("sid", sid) if sid is not None else ("sub", user)
        with self._lock:
            return self._latest.get(key)

    def record(self, claims: dict, now=None):
        """A token of this session, good until its `exp` (when that is still ahead): the session
        lasts at least as long."""
        exp, now = claims.get("exp"), time.time() if now is None else now
        if isinstance(exp, (int, float)) and exp > now:
            key = self.key_of(claims)
            with self._lock:
                self._latest[key] = max(self._latest.get(key, 0), int(exp))

    def expiry(self, claims: dict):
        """The session's latest expiry (Unix seconds), or None when it never had a valid token."""
        with self._lock:
            return self._latest.get(self.key_of(claims))

    def verdict(self, token: str) -> dict:
        claims = jwtutil.verify_hs256(token, self.secret, check_exp=False)
        if not claims or not isinstance(claims.get("sub"), str):
            return dict(self.REFUSED)
        now = time.time()
        self.record(claims, now)
        latest = self.expiry(claims)
        if latest is None or latest <= now:
            return dict(self.REFUSED)
        return {"valid": True, "user_id": claims["sub"], "expires_at": latest}


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
                takes_call = len(inspect.signature(verdict).parameters) >= 3
                args = (call.jwt or "", call.topic or "") + ((call,) if takes_call else ())
                verdict = verdict(*args)
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
            owner.demo_sessions.record(claims)
        self.send_response(204 if claims else 400)
        self.send_header("content-length", "0")
        self.end_headers()

    do_POST = _handle
    do_GET = _handle
    do_PUT = _handle


_Server = QuietServer


class WebhookServer:
    def __init__(self, host="127.0.0.1", port=0, demo_secret=None, topics=None, verbose=False, sessions=None,
                 activity=None):
        self.host = host
        self.requested_port = port
        self.demo_secret = demo_secret  # not None -> demo mode
        self.topics = topics if topics is not None else DEMO_TOPICS
        self.verbose = verbose
        # demo mode: the sessions of the demo's logins (always tracked there)
        self.demo_sessions = SessionStore(demo_secret) if demo_secret is not None else None
        self.activity = activity or (lambda text: None)  # demo mode: one line per decision
        self.default = Behaviour()
        self.sessions = sessions  # a SessionStore: session-tracking mode; None: off
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
            self.sessions = None

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
        if self.sessions is not None:
            return self.sessions.verdict(token)
        payload = jwtutil.decode_unverified(token)
        user = payload.get("sub") if payload and isinstance(payload.get("sub"), str) else "ticket-user"
        return {"valid": True, "user_id": user, "expires_at": int(time.time()) + 600}

    def demo_verdict(self, token: str, topic: str) -> dict:
        """HS256 signature, then the user's topics, then the token's session (demo_sessions)."""
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
        self.demo_sessions.record(claims, now)
        session_exp = self.demo_sessions.expiry(claims)
        if session_exp is None or session_exp <= now:
            self.activity(f"webhook  {user} on {topic_label(topic)}: refused (token and session expired)")
            return refused
        exp = claims.get("exp")
        own = clock(exp) if isinstance(exp, (int, float)) else "missing"
        note = "" if exp == session_exp else f" (its session's; the token's own exp is {own})"
        self.activity(f"webhook  {user} on {topic_label(topic)}: valid until {clock(session_exp)}{note}")
        return {"valid": True, "user_id": user, "expires_at": session_exp}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("WEBHOOK_PORT", "9001")))
    ap.add_argument("--demo", action="store_true", help="verify HS256 JWTs and authorize topics per user")
    ap.add_argument("--secret", default=os.environ.get("REVENPROX_DEMO_SECRET"), help="HS256 secret (demo mode)")
    ap.add_argument("--sessions", action="store_true",
                    help="session tracking: answer with the newest expiry of the token's session (sid, else sub)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.demo and not args.secret:
        ap.error("--demo needs --secret or REVENPROX_DEMO_SECRET")
    if args.sessions and not (args.demo or args.secret):
        ap.error("--sessions verifies signatures: it needs --secret or REVENPROX_DEMO_SECRET")
    sessions = SessionStore(args.secret) if args.sessions and not args.demo else None
    srv = WebhookServer(args.host, args.port, demo_secret=args.secret if args.demo else None, verbose=args.verbose,
                        sessions=sessions, activity=lambda text: print(activity_line(text), flush=True))
    srv.start()
    mode = "demo (HS256, topics: %s)" % json.dumps(DEMO_TOPICS) if args.demo else \
        "test (HS256, any topic)" if sessions is not None else "test (accept all)"
    if sessions is not None:
        mode += ", session tracking"
    print(f"webhook listening on http://{args.host}:{srv.port}/verify mode={mode}", flush=True)
    serve_until_signalled(srv)


if __name__ == "__main__":
    main()
