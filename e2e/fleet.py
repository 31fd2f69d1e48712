"""Fleet harness (issue 14): N RevenProx replicas behind a front Envoy, and clients that act like
a page with an EventSource.

    fleet = Fleet(webhook, upstream, n=2, overrides={...}).start()   # the replicas
    front = fleet.front("user_hash")       # or "round_robin"; started once, stopped by fleet.stop()
    client = EventSourceClient(front.port, "alice", mint=..., duration=60)
    client.start(); client.join()          # a thread: stream, refresh on every challenge
    fleet.replicas_of(markers)             # which replica served each request (access logs)
    before = fleet.counters()              # [{revenprox_* name: value}] per replica (/stats)
    fleet.delta(before, "revenprox_reauthorizations")   # summed over the replicas since `before`

Replicas: envoy/revenprox.yaml.tmpl rendered by helpers.Envoy (so they land in ALL_ENVOYS and
the log checks), all sharing the session's webhook and SSE upstream. Started side by side from
the calling thread (an Envoy exits when the thread that spawned it ends).

Front: deploy/envoy/user-hash-front-proxy.yaml AS SHIPPED, changed only where a test host needs
it: listener and admin on 127.0.0.1 free ports, the access log into the run directory, the
replica cluster STATIC on the replicas' ports, and the IdP's remote JWKS replaced by an inline
HS256 key (`SECRET`, the test tokens' key) so jwt_authn verifies the test tokens; tokens must carry
`ISSUER`. "round_robin" is the plain front the issue measured: the same listener with only the
router (no jwt_authn, no hash policy) and lb_policy ROUND_ROBIN.

Which replica served a request: every client request carries a unique `m=<hex>` query parameter
(helpers.marker); the replica's access log prints the path without the token parameters but with
that marker, once the request is over (streams: once closed). The front's own access log names
the replica too (`replica=`, `route_user=`).
"""
import base64
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

import yaml

import helpers
from helpers import REPO, Envoy, Stream, free_port, http1_request, marker, plugin_config, run_dir
from servers import jwtutil

FRONT_FILE = REPO / "deploy" / "envoy" / "user-hash-front-proxy.yaml"
ROUTE_HEADER = "x-revenprox-route-user"
SECRET = b"test-secret"  # the HS256 key of helpers.new_token and the test webhook
POLICIES = ("user_hash", "round_robin")


def _front_hcm(doc):
    (listener,) = doc["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _front_provider(doc):
    (f,) = [f for f in _front_hcm(doc)["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
    ((name, provider),) = f["typed_config"]["providers"].items()
    return name, provider


ISSUER = _front_provider(yaml.safe_load(FRONT_FILE.read_text()))[1]["issuer"]


def front_config(policy, replica_ports, *, port, admin_port, access_log, behind_lb=False):
    """The front's Envoy config for this host (see the module docstring). behind_lb: the front
    sits behind a load balancer that appends the client's address, configured as the front
    file's comment says (xff_num_trusted_hops: 1)."""
    if policy not in POLICIES:
        raise helpers.HarnessError(f"front policy: one of {POLICIES}, got {policy!r}")
    doc = yaml.safe_load(FRONT_FILE.read_text())
    doc["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    doc["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    hcm = _front_hcm(doc)
    if behind_lb:
        hcm["xff_num_trusted_hops"] = 1
    for log in hcm["access_log"]:
        log["typed_config"]["path"] = str(access_log)
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    clusters = doc["static_resources"]["clusters"]
    (replicas,) = [c for c in clusters if c["name"] == route["route"]["cluster"]]
    replicas["type"] = "STATIC"
    replicas.pop("dns_lookup_family", None)
    replicas["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in replica_ports]}]
    _, provider = _front_provider(doc)
    jwks_cluster = provider.pop("remote_jwks")["http_uri"]["cluster"]
    key = base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode()
    provider["local_jwks"] = {"inline_string": json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": key}]})}
    doc["static_resources"]["clusters"] = [c for c in clusters if c["name"] != jwks_cluster]
    if policy == "round_robin":
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
        route["route"].pop("hash_policy")
        replicas["lb_policy"] = "ROUND_ROBIN"
    return doc


def wait_ready(env, timeout=30.0):
    """Waits for a spawned Envoy: admin /ready says LIVE and its listener accepts."""
    deadline = time.monotonic() + timeout
    while True:
        if env.proc.poll() is not None:
            raise helpers.HarnessError(f"{env.name} exited rc={env.proc.returncode}:\n{env.log_tail()}")
        try:
            if env.admin("/ready", timeout=1).strip() == "LIVE":
                socket.create_connection(("127.0.0.1", env.port), timeout=1).close()
                return env
        except OSError:
            pass
        if time.monotonic() > deadline:
            env.stop()
            raise helpers.HarnessError(f"{env.name} not ready after {timeout}s:\n{env.log_tail()}")
        time.sleep(0.05)


class FrontEnvoy(Envoy):
    """The front proxy: a helpers.Envoy whose config is front_config() instead of the template
    (same process handling, logs, admin and stats)."""

    def __init__(self, policy, replica_ports, *, name=None, concurrency=2, behind_lb=False):
        self.name = name or f"front-{policy}"
        self.policy = policy
        self.dir = run_dir() / f"{self.name}-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plugin_cfg = None
        self.port, self.admin_port = free_port(), free_port()
        self.concurrency = concurrency
        self.base_id = free_port() + 500_000
        self.yaml_path = self.dir / "envoy.yaml"
        self.log_path = self.dir / "envoy.log"
        self.access_log_path = self.dir / "access.log"
        self.leak_check = True
        self.extra_args = []
        self.proc = None
        self._logf = None
        doc = front_config(policy, replica_ports, port=self.port, admin_port=self.admin_port,
                           access_log=self.access_log_path, behind_lb=behind_lb)
        self.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        helpers.ALL_ENVOYS.append(self)


class Fleet:
    def __init__(self, webhook, upstream, n=2, overrides=None, name="fleet", behind_lb=False):
        """behind_lb: the front sits behind a load balancer that appends the client's address to
        X-Forwarded-For (tests connect from the balancer's address and send what it would): the
        front trusts that one hop and the replicas two, as the front file's comment says."""
        if n < 2:
            raise helpers.HarnessError("a fleet has at least two replicas")
        self.behind_lb = behind_lb
        # Behind the front, which appends the client's address to X-Forwarded-For (and behind the
        # balancer, which appended it before).
        self.replicas = [Envoy(plugin_config(overrides), webhook_port=webhook.port, upstream_port=upstream.port,
                               name=f"{name}-r{i}", xff_num_trusted_hops=2 if behind_lb else 1) for i in range(n)]
        self.fronts = {}

    def start(self):
        try:
            for env in self.replicas:
                env.spawn()
            for env in self.replicas:
                wait_ready(env)
        except Exception:
            self.stop()
            raise
        return self

    def front(self, policy="user_hash"):
        """The running front for `policy` (started on first use)."""
        env = self.fronts.get(policy)
        if env is None or not env.alive:
            env = FrontEnvoy(policy, [r.port for r in self.replicas], behind_lb=self.behind_lb)
            self.fronts[policy] = env
            env.spawn()
            wait_ready(env)
        return env

    def stop(self):
        for env in [*self.fronts.values(), *self.replicas]:
            env.stop()

    # -- which replica -------------------------------------------------------------------------
    def replicas_of(self, markers, timeout=10.0):
        """{marker: [index of every replica whose access log has it]}, waiting (up to `timeout`)
        until every marker has been logged somewhere."""
        deadline = time.monotonic() + timeout
        while True:
            logs = [r.access_log() for r in self.replicas]
            found = {m: [i for i, text in enumerate(logs) if m in text] for m in markers}
            if all(found.values()) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    # -- counters ------------------------------------------------------------------------------
    def counters(self):
        """[{revenprox_* name: value}] per replica."""
        out = []
        for r in self.replicas:
            st = r.stats()
            out.append({n: st.get(n) for n in st.names()})
        return out

    def delta(self, before, name):
        """Sum over the replicas of counter `name` now minus in `before` (a counters() result)."""
        return sum(now.get(name, 0) - then.get(name, 0) for now, then in zip(self.counters(), before))


# ------------------------------------------------------------------------------------------------
# tokens and clients
# ------------------------------------------------------------------------------------------------
def mint(user, ttl, *, sid=None):
    """A fresh token of `user` (the front's issuer, a unique jti), registered for the log checks."""
    extra = {"iss": ISSUER, "jti": uuid.uuid4().hex}
    if sid is not None:
        extra["sid"] = sid
    tok = jwtutil.make_jwt(sub=user, ttl=ttl, secret=SECRET, extra=extra)
    helpers.SENT_TOKENS.append(tok)
    return tok


CHANNELS = ("header", "query", "cookie")


def with_token(path, channel, token, headers=()):
    """(path, headers) carrying `token` on `channel`: Authorization, ?token= or the cookie."""
    headers = list(headers)
    if channel == "header":
        headers.append(("Authorization", f"Bearer {token}"))
    elif channel == "query":
        path += ("&" if "?" in path else "?") + f"token={token}"
    elif channel == "cookie":
        headers.append(("Cookie", f"revenprox_token={token}"))
    else:
        raise helpers.HarnessError(f"channel: one of {CHANNELS}, got {channel!r}")
    return path, headers


@dataclass
class Refresh:
    at: float           # seconds after the client started
    status: int
    error: Optional[str]
    marker: str
    token: str


class EventSourceClient(threading.Thread):
    """A page with an EventSource (issue 14): the stream on one HTTP/1.1 connection, and on every
    `event: challenge` a fresh token of the same user (`mint(user)`) POSTed on a fresh connection
    (`content-type: application/x-challenge-response`), the token on `channel` both times. Runs
    for `duration` seconds, or until the stream ends; then leaves the stream open for the test
    (close()). Bounded: every read has a timeout, the loop a deadline."""

    STALL = 5.0  # seconds without a complete event: the stream is stalled

    def __init__(self, port: int, user: str, mint: Callable[[str], str], duration: float, *, topic="news",
                 channel="header", tick_interval=1.0):
        super().__init__(name=f"es-{user}", daemon=True)
        self.port, self.user, self.mint, self.duration = port, user, mint, duration
        self.topic, self.channel, self.tick_interval = topic, channel, tick_interval
        self.stream = None
        self.t0 = None
        # results
        self.status: Optional[int] = None
        self.error: Optional[str] = None
        self.refreshes: List[Refresh] = []
        self.markers: List[str] = []   # every request's marker: the stream, each refresh, a reopen
        self.tokens: List[str] = []
        self.challenges = 0
        self.ticks = 0
        self.expired: Optional[str] = None       # data of `event: expired`
        self.ended_at: Optional[float] = None    # seconds after start when the stream ended
        self.last_tick_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.stalled_at: Optional[float] = None  # no event for STALL seconds (then reading stopped)

    def _now(self):
        return time.monotonic() - self.t0

    def _request(self, token, extra_headers=()):
        m = marker()
        self.markers.append(m)
        path, headers = with_token(f"/events/{self.topic}?{m}", self.channel, token, extra_headers)
        return m, path, headers

    def run(self):
        self.t0 = time.monotonic()
        try:
            self._run()
        except Exception as e:  # reported by the test, never swallowed
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished_at = self._now()

    def _run(self):
        token = self.mint(self.user)
        self.tokens.append(token)
        _, path, headers = self._request(token, [("x-upstream-mode", "stream"),
                                                 ("x-upstream-interval", str(self.tick_interval))])
        self.stream = s = Stream(self.port, path, headers, timeout=10)
        self.status = s.status
        if s.status != 200:
            s.read_for(1.0)
            self.error = f"stream opened with {s.status}: {s.text[:200]!r}"
            return
        seen = 0
        while self._now() < self.duration and not s.ended:
            # Wait for the next complete event. Ticks come every tick_interval, so this returns
            # at once; a read that times out leaves the stream unreadable (Python's socket file),
            # so the timeout is a stall: the stream is dead for the test.
            got = s.read_until(lambda t: t.count("\n\n") > seen, timeout=self.STALL)
            blocks = re.split(r"\r?\n\r?\n", s.text)[:-1]
            for block in blocks[seen:]:
                self._on_event(block)
            seen = len(blocks)
            if not got and not s.ended:
                self.stalled_at = self._now()
                break
        if s.ended:
            self.ended_at = self._now()

    def _on_event(self, block):
        fields = dict(ln.split(": ", 1) for ln in block.splitlines() if ": " in ln and not ln.startswith(":"))
        kind = fields.get("event")
        if kind == "challenge":
            self.challenges += 1
            if self._now() < self.duration:
                self.refresh()
        elif kind == "expired":
            self.expired = fields.get("data", "")
        elif fields.get("data", "").startswith("tick"):
            self.ticks += 1
            self.last_tick_at = self._now()

    def refresh(self):
        token = self.mint(self.user)
        self.tokens.append(token)
        m, path, headers = self._request(token, [("content-type", "application/x-challenge-response")])
        r = http1_request(self.port, path, headers, method="POST", body=b"", timeout=10)
        try:
            error = r.json().get("error") if r.body else None
        except ValueError:
            error = r.text[:100]
        self.refreshes.append(Refresh(self._now(), r.status, error, m, token))

    @property
    def alive(self):
        """Open at the end of the run: not ended or stalled, no `event: expired`, a tick in the
    last 3 s of the run."""
        return (self.status == 200 and self.error is None and self.ended_at is None and self.stalled_at is None
                and self.expired is None and self.last_tick_at is not None
                and self.finished_at - self.last_tick_at < 3.0)

    def close(self):
        if self.stream is not None:
            self.stream.close()

    def reconnect(self):
        """What an EventSource does after a network error: the same URL again, so the same
        token. Opens a stream with a fresh token of this user, reads its first event, closes it,
        and opens it once more with that token. Returns (token, [status, status]): how many
        webhook calls the token cost tells whether the second open found the first's verdict in
        its replica's cache."""
        token = self.mint(self.user)
        self.tokens.append(token)
        statuses = []
        for _ in range(2):
            _, path, headers = self._request(token, [("x-upstream-mode", "end")])
            r = http1_request(self.port, path, headers, timeout=10)
            statuses.append(r.status)
        return token, statuses

    def summary(self):
        return (f"{self.user} [{self.channel}] status={self.status} error={self.error} ticks={self.ticks} "
                f"challenges={self.challenges} refreshes={[(round(r.at, 1), r.status, r.error) for r in self.refreshes]} "
                f"expired={self.expired} ended_at={self.ended_at and round(self.ended_at, 1)} "
                f"end={self.stream and self.stream.end_reason} stalled_at={self.stalled_at and round(self.stalled_at, 1)} "
                f"last_tick_at={self.last_tick_at and round(self.last_tick_at, 1)}")


def run_all(clients, timeout):
    """Starts the clients together and waits for all of them (at most `timeout` seconds)."""
    for c in clients:
        c.start()
    deadline = time.monotonic() + timeout
    for c in clients:
        c.join(max(0.0, deadline - time.monotonic()))
    stuck = [c.user for c in clients if c.is_alive()]
    if stuck:
        raise AssertionError(f"clients still running after {timeout}s: {stuck}")

