#!/usr/bin/env python3
"""`make bench`: RevenProx side by side with bare Envoy, ext_authz and jwt_authn, in one run.

Five Envoys (1.40, --concurrency 2) front the same fast Rust upstream (bench/src/bin/benchd.rs):
  A  bare Envoy (the limit)
  B  Envoy + ext_authz (HTTP) calling the Rust auth service on every request
  C  Envoy + jwt_authn, RS256 with a local JWKS (signature checked on every request)
  D  Envoy + RevenProx, verdict cache warm
  E  Envoy + RevenProx, cache off (cache_ttl_sec 0): a webhook verification per request

Phases (every loop bounded in count and time, everything on 127.0.0.1):
  ceilings    the upstream, webhook and auth service measured directly (they must not be the limit)
  rounds      handshakes (wrk, 32 conns), unloaded latency (wrk, 1 conn), events/s through 1 and
              N flood streams, paced per-event latency; setups alternate, order rotated per round
  herd        1,000 simultaneous requests with one fresh token → auth calls
  memory      a fresh Envoy per setup, RSS before/with 10,000 open SSE streams, and Envoy's CPU then
  scale       2,000 open streams with mixed upstream patterns through A and D (heartbeat 1 s): CPU, RSS
  cliff       D's CPU with 1,000 streams far from their expiry, then inside the last challenge + 5 s
  reverify    10,000 streams on D re-verifying every 10 s: CPU and webhook calls per second
  cache       a fresh D, RSS after 10k/20k/100k/200k distinct tokens (cache_max_size 10,000)
  hotpath     the filter's pure core natively (ns/op and callgrind instructions/op)
  callgrind   opt-in (--only callgrind, ~10 min): instructions inside Envoy per handshake and per
              event for A, N (no-op wasm filter), V (RevenProx without auth), D, E, and the price of
              single host calls (bench/noop-wasm probes)

Writes docs/benchmarks.md, docs/bench/results.json and docs/bench/ratios.svg, and prints the
table. Every process it starts is stopped by its PID (never by name), also on errors and Ctrl-C.
"""
import argparse
import base64
import ctypes
import datetime
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BIN = BENCH / "target" / "release"
WASM = Path(os.environ.get("REVENPROX_WASM", REPO / "target/wasm32-wasip1/release/revenprox.wasm"))
ENVOY_BIN = Path(os.environ.get("REVENPROX_ENVOY", REPO / ".venv/bin/envoy"))
WRK = shutil.which("wrk")
DOCS = REPO / "docs"
SETUPS = ["A", "B", "C", "D", "E"]
# Two more Envoys in the rounds, for the breakdown of the filter's cost (handshakes, 1-stream flood):
#   N  a no-op Rust proxy-wasm filter (bench/noop-wasm): the floor of any wasm filter in V8
#   V  RevenProx in development mode (no webhook, nothing to verify): header and SSE session work
BREAKDOWN = ["N", "V"]
SETUP_NAMES = {
    "A": "bare Envoy",
    "B": "ext_authz (HTTP)",
    "C": "jwt_authn (RS256)",
    "D": "RevenProx, cache warm",
    "E": "RevenProx, cache off",
    "N": "no-op wasm filter",
    "V": "RevenProx, development mode",
}
NOOP_WASM = BENCH / "noop-wasm/target/wasm32-wasip1/release/noop_wasm.wasm"
ISSUER = "https://issuer.bench"
HERD_TOPIC = "herd"
HERD_DELAY_MS = 100

PROFILES = {
    # make bench: ~10 minutes on 2 cores
    "full": dict(rounds=3, hs_secs=3, lat_secs=2, flood_secs=1.5, paced_secs=3, warmup=0.5,
                 many_streams=100, paced_streams=50, paced_ms=10, mem_streams=10_000,
                 cache_size=10_000, cache_points=[10_000, 20_000, 100_000, 200_000],
                 herd_n=1000, herd_rounds=3, ceiling_secs=2, callgrind=True, breakdown=True,
                 mem_cpu_secs=8, scale_streams=2_000, scale_secs=10, cliff_streams=1_000, cliff_ttl=45,
                 cliff_challenge=10, reverify_interval=10, reverify_secs=19),
    # --quick: the same pipeline, small and short (for development on a busy machine)
    "quick": dict(rounds=1, hs_secs=2, lat_secs=1, flood_secs=1, paced_secs=1.5, warmup=0.3,
                  many_streams=20, paced_streams=20, paced_ms=10, mem_streams=2_000,
                  cache_size=1_000, cache_points=[1_000, 2_000, 5_000, 10_000],
                  herd_n=300, herd_rounds=1, ceiling_secs=1, callgrind=True, breakdown=True,
                  mem_cpu_secs=4, scale_streams=400, scale_secs=5, cliff_streams=200, cliff_ttl=35,
                  cliff_challenge=5, reverify_interval=5, reverify_secs=9.5),
}


class BenchError(RuntimeError):
    pass


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# processes: every child is owned here and stopped by PID
# ------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _child_setup():
    # die with the bench (SIGTERM when the parent goes away) and get the full fd allowance
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_hard_nofile, _hard_nofile))
    except (ValueError, OSError):
        pass


class Procs:
    def __init__(self):
        self.live = []

    def start(self, cmd, name, log_path=None, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE):
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        p = subprocess.Popen([str(c) for c in cmd], stdin=stdin, stdout=stdout,
                             stderr=out if log_path else subprocess.DEVNULL,
                             preexec_fn=_child_setup, cwd=str(REPO))
        p.bench_name = name
        p.bench_log = out if log_path else None
        self.live.append(p)
        return p

    def stop(self, p, timeout=10):
        if p.poll() is None:
            p.terminate()  # SIGTERM to this PID only
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout)
        if getattr(p, "bench_log", None):
            p.bench_log.close()
        for f in (p.stdin, p.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"could not stop {p.bench_name} pid {p.pid}: {e}")


PROCS = Procs()


def run_json(cmd, timeout, marker=None):
    """Run a short-lived tool to completion (bounded) and parse its JSON line."""
    p = PROCS.start(cmd, Path(str(cmd[0])).name)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        PROCS.stop(p)
        raise BenchError(f"timed out after {timeout}s: {' '.join(map(str, cmd))[:300]}")
    PROCS.stop(p)
    text = out.decode(errors="replace")
    for line in reversed(text.splitlines()):
        if marker and line.startswith(marker):
            return json.loads(line[len(marker):])
        if not marker and line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"no result from {' '.join(map(str, cmd))[:300]} (rc={p.returncode}):\n{text[-2000:]}")


def proc_cpu_s(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


# ------------------------------------------------------------------------------------------
# servers
# ------------------------------------------------------------------------------------------
class Server:
    def __init__(self, role, workdir, extra=()):
        self.role = role
        self.proc = PROCS.start([BIN / "benchd", role, "--max-secs", "1200", *extra], f"benchd-{role}",
                                log_path=workdir / f"{role}.log")
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("READY "):
            raise BenchError(f"benchd {role} did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self):
        return self.proc.pid

    def calls(self):
        return json.loads(http_get(f"http://127.0.0.1:{self.port}/_count")[1])["calls"]


# ------------------------------------------------------------------------------------------
# tokens (RS256, signed with a key made here by openssl)
# ------------------------------------------------------------------------------------------
def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Keys:
    def __init__(self, workdir):
        openssl = shutil.which("openssl")
        if not openssl:
            raise BenchError("openssl not found (apt-get install openssl)")
        self.openssl = openssl
        self.key = workdir / "jwt-key.pem"
        subprocess.run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", str(self.key)], check=True, capture_output=True, timeout=60)
        mod = subprocess.run([openssl, "rsa", "-in", str(self.key), "-noout", "-modulus"], check=True,
                             capture_output=True, timeout=30).stdout.decode().strip()
        n = bytes.fromhex(mod.split("=", 1)[1])
        self.jwks = json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench",
                                          "n": b64url(n), "e": "AQAB"}]})

    def token(self, sub, ttl=3 * 3600):
        now = int(time.time())
        header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}, separators=(",", ":")).encode())
        claims = {"iss": ISSUER, "sub": sub, "aud": "revenprox-bench", "iat": now, "exp": now + ttl,
                  "jti": hashlib.sha256(f"{sub}{random.random()}".encode()).hexdigest()[:16]}
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        sig = subprocess.run([self.openssl, "dgst", "-sha256", "-sign", str(self.key)], input=signing_input,
                             check=True, capture_output=True, timeout=30).stdout
        return f"{header}.{payload}.{b64url(sig)}"


# ------------------------------------------------------------------------------------------
# Envoy
# ------------------------------------------------------------------------------------------
def topic_id(segment):
    return hashlib.sha256(segment.encode()).hexdigest()[:32]


def plugin_config(setup, heartbeat_sec=None, cache_size=None, sse=None):
    if setup == "V":
        cfg = {"jwt_verifier": {"webhook_url": "", "require_authentication": False}}
        if heartbeat_sec:
            cfg["sse"] = {"heartbeat_interval_sec": heartbeat_sec}
        return cfg
    cfg = {"jwt_verifier": {"webhook_url": "http://auth.bench/verify", "webhook_cluster": "webhook",
                            # the bench must measure the filter, not its rate limit
                            "rate_limit_per_sec": 1_000_000}}
    if setup == "E":
        cfg["jwt_verifier"]["cache_ttl_sec"] = 0
    if cache_size:
        cfg["jwt_verifier"]["cache_max_size"] = cache_size
    if heartbeat_sec:
        cfg["sse"] = {"heartbeat_interval_sec": heartbeat_sec}
    if sse:
        cfg.setdefault("sse", {}).update(sse)
    return cfg


def envoy_config(setup, upstream, webhook, authz, jwks, plugin_cfg, upstream_h2=False):
    thresholds = {"thresholds": [{"priority": "DEFAULT", "max_connections": 1_000_000,
                                  "max_pending_requests": 1_000_000, "max_requests": 1_000_000,
                                  "max_retries": 1_000}]}

    def cluster(name, port, h2=False):
        c = {"name": name, "type": "STATIC", "connect_timeout": "1s", "circuit_breakers": thresholds,
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                 "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    filters = []
    if setup == "B":
        filters.append({"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "http_service": {
                "server_uri": {"uri": "http://authz.bench", "cluster": "authz", "timeout": "5s"},
                "authorization_response": {"allowed_upstream_headers": {
                    "patterns": [{"exact": "x-user", "ignore_case": True}]}}}}})
    elif setup == "C":
        filters.append({"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"bench": {"issuer": ISSUER, "local_jwks": {"inline_string": jwks}, "forward": True,
                                    "claim_to_headers": [{"header_name": "x-user", "claim_name": "sub"}]}},
            "rules": [{"match": {"prefix": "/events/"}, "requires": {"provider_name": "bench"}}]}})
    elif setup in ("D", "E", "V", "N"):
        filters.append({"name": "envoy.filters.http.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {"name": "revenprox", "root_id": "revenprox", "failure_policy": "FAIL_CLOSED",
                       "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                         "value": plugin_cfg if isinstance(plugin_cfg, str)
                                         else json.dumps(plugin_cfg or {})},
                       "vm_config": {"vm_id": "revenprox", "runtime": "envoy.wasm.runtime.v8",
                                     "code": {"local": {"filename": str(NOOP_WASM if setup == "N" else WASM)}}}}}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "bench", "codec_type": "AUTO", "stream_idle_timeout": "0s", "request_timeout": "0s",
           "route_config": {"name": "bench", "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "0s"}}]}]},
           "http_filters": filters}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "bench", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [cluster("upstream", upstream, upstream_h2), cluster("webhook", webhook),
                         cluster("authz", authz)]}}


_base_ids = set()


class Envoy:
    def __init__(self, setup, ctx, tag="", upstream_h2=False, heartbeat_sec=None, cache_size=None, probe=None,
                 sse=None, webhook=None):
        self.setup = setup
        self.name = f"{setup}{tag}"
        self.dir = ctx.workdir / f"envoy-{self.name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plugin_cfg = plugin_config(setup, heartbeat_sec, cache_size, sse) if setup in "DEV" else probe
        cfg = envoy_config(setup, ctx.upstream.port, (webhook or ctx.webhook).port, ctx.authz.port, ctx.keys.jwks,
                           self.plugin_cfg, upstream_h2)
        self.cfg_path = self.dir / "envoy.json"
        self.cfg_path.write_text(json.dumps(cfg, indent=1))
        self.admin_path = self.dir / "admin-address"
        while True:
            self.base_id = random.randint(5_000_000, 9_000_000)
            if self.base_id not in _base_ids:
                _base_ids.add(self.base_id)
                break
        self.proc = None

    def start(self, timeout=30, concurrency=2, prefix=()):
        if self.admin_path.exists():
            self.admin_path.unlink()
        binary = envoy_elf() if prefix else ENVOY_BIN
        self.proc = PROCS.start([*prefix, binary, "-c", self.cfg_path, "--concurrency", concurrency, "--base-id", self.base_id,
                                 "--admin-address-path", self.admin_path, "--log-level", "warn"],
                                f"envoy-{self.name}", log_path=self.dir / "envoy.log", stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"Envoy {self.name} exited rc={self.proc.returncode}; log {self.dir / 'envoy.log'}:\n"
                                 + (self.dir / "envoy.log").read_text(errors="replace")[-3000:])
            if self.admin_path.exists() and self.admin_path.read_text().strip():
                self.admin = "http://" + self.admin_path.read_text().strip()
                try:
                    if http_get(self.admin + "/ready", 5)[1].strip() == b"LIVE":
                        listeners = json.loads(http_get(self.admin + "/listeners?format=json")[1])
                        self.port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        return self
                except Exception:
                    pass
            time.sleep(0.05 if not prefix else 0.5)
        raise BenchError(f"Envoy {self.name} not ready after {timeout}s")

    def stop(self):
        if self.proc:
            PROCS.stop(self.proc)
            self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def rss_kb(self):
        return proc_rss_kb(self.pid)

    def cpu_s(self):
        return proc_cpu_s(self.pid)

    def stats(self, pattern="."):
        raw = json.loads(http_get(self.admin + "/stats?format=json&filter=" + urllib.request.quote(pattern))[1])
        out = {}
        for s in raw.get("stats", []):
            if "value" in s:
                out[s["name"].replace("wasmcustom.", "")] = s["value"]
        return out

    def version(self):
        return http_get(self.admin + "/server_info")[1]


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------
class Ctx:
    pass


def wrk(port, path, tokens_file, conns, secs, mode="bearer", extra=()):
    if not WRK:
        raise BenchError("wrk not found (apt-get install wrk)")
    cmd = [WRK, "-t1", f"-c{conns}", f"-d{max(1, round(secs))}s", "--timeout", "5s", "-s", BENCH / "wrk.lua",
           f"http://127.0.0.1:{port}{path}", "--", tokens_file, mode, *extra]
    r = run_json(cmd, timeout=secs + 30, marker="WRKJSON ")
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_status"] + r["errors_timeout"]
    return r


def benchc(mode, port, path, timeout, **kw):
    cmd = [BIN / "benchc", mode, "--port", port, "--path", path]
    for k, v in kw.items():
        cmd += ["--" + k.replace("_", "-"), v]
    return run_json(cmd, timeout=timeout)


def measure_cpu(pids, fn):
    before = {k: proc_cpu_s(p) for k, p in pids.items()}
    r = fn()
    after = {k: proc_cpu_s(p) for k, p in pids.items()}
    return r, {k: after[k] - before[k] for k in pids}


def ceilings(ctx, P):
    log("ceilings: the upstream, webhook and auth service alone")
    out = {}
    s = P["ceiling_secs"]
    out["upstream_handshakes_per_s"] = wrk(ctx.upstream.port, "/events/bench?mode=short", ctx.pool_file, 32, s)["rps"]
    out["webhook_verifications_per_s"] = wrk(ctx.webhook.port, "/verify", ctx.pool_file, 32, s, mode="webhook",
                                             extra=[topic_id("bench")])["rps"]
    out["authz_checks_per_s"] = wrk(ctx.authz.port, "/events/bench", ctx.pool_file, 32, s)["rps"]
    secs = P["flood_secs"] + P["warmup"] + 3
    for n, key in ((1, "upstream_events_per_s_1_stream"), (P["many_streams"], "upstream_events_per_s_many")):
        r = benchc("stream", ctx.upstream.port, f"/events/bench?mode=flood&secs={secs:.0f}", timeout=secs + 30,
                   streams=n, warmup=P["warmup"], secs=P["flood_secs"], token_file=ctx.pool_file, latency="off")
        out[key] = r["events_per_sec"]
    for k, v in out.items():
        log(f"  {k}: {v:,.0f}")
    return out


def one_round(ctx, P, envoy, rnd, full=True):
    """full=False (breakdown setups): handshakes and the 1-stream flood only."""
    setup = envoy.setup
    pids = {"envoy": envoy.pid, "upstream": ctx.upstream.pid, "webhook": ctx.webhook.pid, "authz": ctx.authz.pid}
    res = {"setup": setup, "round": rnd}
    # 1. handshakes: short complete SSE responses, 32 keep-alive connections, saturating
    hs, cpu = measure_cpu(pids, lambda: wrk(envoy.port, "/events/bench?mode=short", ctx.pool_file, 32, P["hs_secs"]))
    n = max(hs["requests"], 1)
    res["hs"] = {"rps": hs["rps"], "p50_us": hs["p50_us"], "p99_us": hs["p99_us"], "errors": hs["errors"],
                 "requests": hs["requests"],
                 "envoy_cpu_us": cpu["envoy"] / n * 1e6,
                 "auth_cpu_us": (cpu["webhook"] + cpu["authz"]) / n * 1e6}
    if not full:
        secs = P["flood_secs"] + P["warmup"] + 3
        r, cpu = measure_cpu(pids, lambda: benchc(
            "stream", envoy.port, f"/events/bench?mode=flood&secs={secs:.0f}", timeout=secs + 30,
            streams=1, warmup=P["warmup"], secs=P["flood_secs"], token_file=ctx.pool_file, latency="off"))
        res["flood1"] = {"eps": r["events_per_sec"], "streams_with_events": r["streams_with_events"],
                         "errors": r["errors"], "envoy_cpu_ns_per_event": cpu["envoy"] / max(r["events"], 1) * 1e9}
        log(f"  round {rnd} {setup}: {res['hs']['rps']:,.0f} hs/s, {res['hs']['envoy_cpu_us']:.0f} us CPU/hs, "
            f"flood {res['flood1']['eps']:,.0f} ev/s")
        return res
    # 2. unloaded latency: one connection, one request at a time
    lat = wrk(envoy.port, "/events/bench?mode=short", ctx.pool_file, 1, P["lat_secs"])
    res["lat"] = {"p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "rps": lat["rps"], "errors": lat["errors"]}
    # 3. events/s through 1 and many flood streams
    secs = P["flood_secs"] + P["warmup"] + 3
    for n_streams, key in ((1, "flood1"), (P["many_streams"], "floodN")):
        r, cpu = measure_cpu(pids, lambda: benchc(
            "stream", envoy.port, f"/events/bench?mode=flood&secs={secs:.0f}", timeout=secs + 30,
            streams=n_streams, warmup=P["warmup"], secs=P["flood_secs"], token_file=ctx.pool_file, latency="off"))
        res[key] = {"eps": r["events_per_sec"], "streams_with_events": r["streams_with_events"],
                    "errors": r["errors"], "envoy_cpu_ns_per_event": cpu["envoy"] / max(r["events"], 1) * 1e9}
    # 4. per-event latency at a fixed pace (heartbeats on in D/E)
    secs = P["paced_secs"] + P["warmup"] + 3
    # events every paced_ms for 1 s, then 1.2 s of silence: D/E (heartbeat_interval_sec 1) inject a
    # heartbeat in every silence, so event latency is measured with heartbeats going on
    r, cpu = measure_cpu(pids, lambda: benchc(
        "stream", envoy.port, f"/events/bench?mode=paced&ms={P['paced_ms']}&on=1000&off=1200&secs={secs:.0f}",
        timeout=secs + 30, streams=P["paced_streams"], warmup=P["warmup"], secs=P["paced_secs"],
        token_file=ctx.pool_file))
    # Envoy CPU over the whole client run / every event it received (warm-up included)
    total = r["all_events"]
    res["paced"] = {"p50_us": r["lat_p50_us"], "p99_us": r["lat_p99_us"], "p999_us": r["lat_p999_us"],
                    "eps": r["events_per_sec"], "samples": r["lat_samples"], "errors": r["errors"],
                    "heartbeats": r["heartbeats"], "envoy_cpu_us_per_event": cpu["envoy"] / max(total, 1) * 1e6}
    log(f"  round {rnd} {setup}: {res['hs']['rps']:,.0f} hs/s (p50 {res['lat']['p50_us']} us unloaded), "
        f"flood {res['flood1']['eps']:,.0f}/{res['floodN']['eps']:,.0f} ev/s, "
        f"paced p50/p99 {res['paced']['p50_us']:.0f}/{res['paced']['p99_us']:.0f} us")
    return res


def sanity(ctx, envoy):
    """The setup really authenticates: 200 with a token, refused without (bare Envoy: 200)."""
    good = benchc("load", envoy.port, "/events/bench?mode=short", timeout=30, requests=20, concurrency=2,
                  token_file=ctx.pool_file)
    none = benchc("load", envoy.port, "/events/bench?mode=short", timeout=30, requests=2, concurrency=1)
    if good["ok"] != 20:
        raise BenchError(f"setup {envoy.setup}: requests with a valid token failed: {good['statuses']}")
    refused = none["ok"] == 0
    if refused != (envoy.setup in "BCDE"):
        raise BenchError(f"setup {envoy.setup}: a request without a token got {none['statuses']}")


def herd(ctx, P, envoys):
    log(f"herd: {P['herd_n']} simultaneous requests with one fresh token; the auth backends answer after "
        f"{HERD_DELAY_MS} ms")
    out = {s: [] for s in SETUPS}
    for rnd in range(P["herd_rounds"]):
        token = ctx.keys.token(f"herd-{rnd}")
        for s in SETUPS:
            e = envoys[s]
            before = (ctx.webhook.calls(), ctx.authz.calls(), e.stats("revenprox_") if s in "DE" else {})
            r = benchc("herd", e.port, f"/events/{HERD_TOPIC}?mode=short", timeout=90, n=P["herd_n"], token=token)
            time.sleep(0.2)
            after = (ctx.webhook.calls(), ctx.authz.calls(), e.stats("revenprox_") if s in "DE" else {})
            calls = (after[0] - before[0]) + (after[1] - before[1])
            joins = after[2].get("revenprox_singleflight_joins", 0) - before[2].get("revenprox_singleflight_joins", 0)
            out[s].append({"auth_calls": calls, "singleflight_joins": joins, "statuses": r["statuses"],
                           "connect_errors": r["connect_errors"], "all_done_ms": r["all_done_ms"]})
            log(f"  {s}: {calls} auth calls, statuses {r['statuses']}, all answered in {r['all_done_ms']:.0f} ms")
    return out


def memory(ctx, P):
    n = P["mem_streams"]
    log(f"memory: a fresh Envoy per setup, RSS with {n:,} open SSE streams (upstream over h2c)")
    out = {}
    for s in SETUPS:
        e = Envoy(s, ctx, tag="-mem", upstream_h2=True).start()
        try:
            sanity(ctx, e)
            benchc("load", e.port, "/events/bench?mode=short", timeout=60, requests=500, concurrency=16,
                   token_file=ctx.pool_file)
            time.sleep(1.0)
            rss0 = e.rss_kb()
            alloc0 = e.stats("server.memory_allocated").get("server.memory_allocated", 0)
            tokens = {"token_file": ctx.pool_file} if s == "C" else {"token_gen": f"mem{s}"}
            p = PROCS.start([BIN / "benchc", "hold", "--port", e.port, "--path", "/events/bench?mode=hold&secs=300",
                             "--streams", n, "--max-secs", 240, "--open-concurrency", 256,
                             *sum(([f"--{k.replace('_', '-')}", v] for k, v in tokens.items()), [])],
                            f"benchc-hold-{s}", stdin=subprocess.PIPE)
            try:
                line = p.stdout.readline().decode()
                if not line.startswith("{"):
                    raise BenchError(f"hold client for {s} failed: {line!r}")
                opened = json.loads(line)
                time.sleep(2.0)
                rss1 = e.rss_kb()
                st = e.stats("(downstream_cx_active|memory_allocated|revenprox_open_streams)")
                alloc1 = st.get("server.memory_allocated", 0)
                cpu = cpu_window(e, P["mem_cpu_secs"])
            finally:
                try:
                    p.stdin.write(b"close\n")
                    p.stdin.flush()
                except OSError:
                    pass
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                PROCS.stop(p)
            k = max(opened["opened"], 1)
            out[s] = {"streams": n, "opened": opened["opened"], "open_errors": opened["errors"],
                      "open_secs": opened["open_secs"], "rss_before_kb": rss0, "rss_open_kb": rss1,
                      "per_stream_kb": (rss1 - rss0) / k,
                      "heap_per_stream_kb": (alloc1 - alloc0) / 1024 / k,
                      "downstream_cx_active": st.get("http.bench.downstream_cx_active"), "cpu_pct": cpu,
                      "revenprox_open_streams": st.get("revenprox_open_streams")}
            log(f"  {s}: {opened['opened']:,} open, RSS {rss0 / 1024:.1f} → {rss1 / 1024:.1f} MiB, "
                f"{out[s]['per_stream_kb']:.2f} KiB/stream, Envoy CPU {cpu:.1f} % while they are open")
        finally:
            e.stop()
    return out


class Held:
    """`benchc hold`: n streams opened and held (read to the end with drain) until `close()`."""

    def __init__(self, e, n, paths, tokens, name, drain=True, max_secs=240, open_concurrency=256):
        args = [BIN / "benchc", "hold", "--port", e.port, "--paths", ",".join(paths), "--streams", n,
                "--max-secs", max_secs, "--open-concurrency", open_concurrency, "--drain", "on" if drain else "off"]
        for k, v in tokens.items():
            args += [f"--{k.replace('_', '-')}", v]
        self.p = PROCS.start(args, f"benchc-hold-{name}", stdin=subprocess.PIPE)
        line = self.p.stdout.readline().decode()
        if not line.startswith("{"):
            PROCS.stop(self.p)
            raise BenchError(f"hold client {name} failed: {line!r}")
        self.opened = json.loads(line)

    def close(self):
        try:
            self.p.stdin.write(b"close\n")
            self.p.stdin.flush()
        except OSError:
            pass
        out = {}
        try:
            line = self.p.stdout.readline().decode()
            out = json.loads(line) if line.startswith("{") else {}
            self.p.wait(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            pass
        PROCS.stop(self.p)
        return out


def cpu_window(e, secs):
    """Envoy's CPU (utime+stime) over the next `secs` seconds, in % of one core."""
    c0, t0 = e.cpu_s(), time.monotonic()
    time.sleep(secs)
    return 100.0 * (e.cpu_s() - c0) / (time.monotonic() - t0)


# Upstream patterns of the open-streams phases, one stream in four each: one event then silence
# (a heartbeat every second of it), an event every 700 ms (no heartbeat due), an event every
# 500 ms, bursts of 10 events 20 ms apart then 3 s of silence (heartbeats in every silence).
MIXED_PATHS = ["/events/bench?mode=hold&secs=300", "/events/bench?mode=paced&ms=700&secs=300",
               "/events/bench?mode=paced&ms=500&secs=300",
               "/events/bench?mode=paced&ms=20&on=200&off=3000&secs=300"]


def scale(ctx, P):
    """Open streams at scale (issue #16): the same mixed streams through bare Envoy and through D
    (heartbeats every second), Envoy's CPU while they run and its RSS per stream."""
    n, secs = P["scale_streams"], P["scale_secs"]
    log(f"scale: {n:,} open streams (mixed upstream patterns), A and D (heartbeat 1 s), CPU over {secs} s")
    out = {}
    for s in ("A", "D"):
        e = Envoy(s, ctx, tag="-scale", heartbeat_sec=1).start()
        try:
            sanity(ctx, e)
            time.sleep(1.0)
            rss0 = e.rss_kb()
            # 64 at a time: bare Envoy opens them so fast that the upstream refused a few at 256
            held = Held(e, n, MIXED_PATHS, {"token_gen": f"scale{s}"}, f"scale-{s}", open_concurrency=64)
            try:
                time.sleep(3.0)
                rss1 = e.rss_kb()
                cpu = cpu_window(e, secs)
                st = e.stats("revenprox_(heartbeats_sent|open_streams)")
            finally:
                counts = held.close()
            k = max(held.opened["opened"], 1)
            out[s] = {"streams": n, "opened": held.opened["opened"], "open_errors": held.opened["errors"],
                      "cpu_pct": cpu, "rss_before_kb": rss0, "rss_open_kb": rss1, "per_stream_kb": (rss1 - rss0) / k,
                      "received": counts, "heartbeats_sent": st.get("revenprox_heartbeats_sent"),
                      "revenprox_open_streams": st.get("revenprox_open_streams")}
            log(f"  {s}: {held.opened['opened']:,} open, Envoy CPU {cpu:.1f} %, {out[s]['per_stream_kb']:.1f} KiB/stream, "
                f"received {counts.get('events', 0):,} events, {counts.get('heartbeats', 0):,} heartbeats")
        finally:
            e.stop()
    return out


def cliff(ctx, P):
    """No CPU cliff near expiry (issue #16): D's CPU while every stream is far from its token's
    expiry, then while every stream is inside its last challenge_before_expiry_sec + 5 s. The
    webhook answers with each token's own `exp`, so neither the server-side refresh nor the
    re-verification moves it: the streams stay in the window until they expire (clients that
    ignore the challenge)."""
    n, ttl, window = P["cliff_streams"], P["cliff_ttl"], P["cliff_challenge"]
    log(f"cliff: {n:,} streams on D expiring {ttl} s after they open (challenge {window} s before): "
        "CPU outside and inside the last challenge + 5 s")
    webhook = Server("webhook", ctx.workdir, ["--threads", "2", "--exp-from-token", "on"])
    e = Envoy("D", ctx, tag="-cliff", heartbeat_sec=1, webhook=webhook,
              sse={"challenge_before_expiry_sec": window}).start()
    try:
        sanity(ctx, e)
        t0 = time.monotonic()
        held = Held(e, n, MIXED_PATHS, {"token_gen": "cliff", "token_ttl": ttl}, "cliff")
        try:
            spread = time.monotonic() - t0
            enter = ttl - window - 5  # the first stream's window opens then (seconds after t0)
            if spread > enter - 8:
                raise BenchError(f"cliff: opening took {spread:.1f} s, too long for a {ttl} s token")
            # outside: from 3 s after the last open until 2 s before the first stream's window
            time.sleep(max(0.0, t0 + spread + 3 - time.monotonic()))
            calls0 = webhook.calls()
            out_secs = t0 + enter - 2 - time.monotonic()
            cpu_out = cpu_window(e, out_secs)
            calls1 = webhook.calls()
            # inside: from 1 s after the last stream's window opened until 1 s before the first expiry
            time.sleep(max(0.0, t0 + spread + enter + 1 - time.monotonic()))
            st0 = e.stats("revenprox_(challenges_sent|streams_expired)")
            in_secs = t0 + ttl - 1 - time.monotonic()
            cpu_in = cpu_window(e, in_secs)
            calls2 = webhook.calls()
            st1 = e.stats("revenprox_(challenges_sent|streams_expired)")
            time.sleep(max(0.0, t0 + spread + ttl + 2 - time.monotonic()))
            st2 = e.stats("revenprox_(challenges_sent|streams_expired|open_streams)")
        finally:
            counts = held.close()
    finally:
        e.stop()
        PROCS.stop(webhook.proc)
    out = {"streams": n, "opened": held.opened["opened"], "ttl_sec": ttl, "challenge_before_expiry_sec": window,
           "open_secs": spread, "outside_secs": out_secs, "inside_secs": in_secs,
           "cpu_outside_pct": cpu_out, "cpu_inside_pct": cpu_in, "ratio": cpu_in / cpu_out if cpu_out else None,
           "webhook_calls_outside": calls1 - calls0, "webhook_calls_inside": calls2 - calls1,
           "challenges_inside": st1.get("revenprox_challenges_sent", 0) - st0.get("revenprox_challenges_sent", 0),
           "expired_at_end": st2.get("revenprox_streams_expired"), "open_at_end": st2.get("revenprox_open_streams"),
           "received": counts}
    log(f"  CPU outside {cpu_out:.1f} % ({out_secs:.0f} s), inside {cpu_in:.1f} % ({in_secs:.0f} s): "
        f"{out['ratio']:.2f} x; webhook calls {out['webhook_calls_outside']} / {out['webhook_calls_inside']}, "
        f"{out['challenges_inside']} challenges inside, {out['expired_at_end']} expired")
    return out


def reverify(ctx, P):
    """Re-verification at scale (issue #13): 10,000 open streams (distinct tokens, so nothing is
    coalesced) on D with a short `sse.reverify_interval_sec`: Envoy's CPU and the webhook calls
    per second while they re-verify. Compare with D's CPU in the memory phase (same streams,
    re-verification at its 300 s default: none in the window). A stream asks again 0.9-1.0 x the
    interval after its last verdict (spread over the last tenth), so the steady rate is open
    streams / (0.95 x interval), and the window lasts two such rounds (reverify_secs = 1.9 x the
    interval): a window of any other length catches one or two bunches of the streams opened
    together, depending on where it falls."""
    n, interval, secs = P["mem_streams"], P["reverify_interval"], P["reverify_secs"]
    log(f"reverify: {n:,} streams on D re-verifying every {interval} s: CPU and webhook calls over {secs} s")
    e = Envoy("D", ctx, tag="-reverify", upstream_h2=True, sse={"reverify_interval_sec": interval}).start()
    try:
        sanity(ctx, e)
        t0 = time.monotonic()
        held = Held(e, n, ["/events/bench?mode=hold&secs=300"], {"token_gen": "reverify"}, "reverify", drain=False)
        try:
            spread = time.monotonic() - t0
            # every stream has re-verified at least once (interval after it opened) before the window
            time.sleep(max(2.0, t0 + interval + 1 - time.monotonic()))
            calls0, st0 = ctx.webhook.calls(), e.stats("revenprox_(reverif|streams_revoked)")
            c0, w0 = e.cpu_s(), time.monotonic()
            time.sleep(secs)
            cpu = 100.0 * (e.cpu_s() - c0) / (time.monotonic() - w0)
            calls1, st1 = ctx.webhook.calls(), e.stats("revenprox_(reverif|streams_revoked|open_streams)")
            wall = time.monotonic() - w0
        finally:
            held.close()
    finally:
        e.stop()
    d = lambda k: st1.get(k, 0) - st0.get(k, 0)  # noqa: E731
    out = {"streams": n, "opened": held.opened["opened"], "interval_sec": interval, "open_secs": spread,
           "window_secs": wall, "cpu_pct": cpu, "webhook_calls_per_s": (calls1 - calls0) / wall,
           "expected_calls_per_s": held.opened["opened"] / (0.95 * interval),
           "reverifications": d("revenprox_reverifications"), "reverify_failures": d("revenprox_reverify_failures"),
           "revoked": d("revenprox_streams_revoked"), "open_at_end": st1.get("revenprox_open_streams")}
    log(f"  {held.opened['opened']:,} open: Envoy CPU {cpu:.1f} %, {out['webhook_calls_per_s']:,.0f} webhook calls/s "
        f"(open streams / (0.95 x interval) = {out['expected_calls_per_s']:,.0f}), {out['reverify_failures']} failures")
    return out


def cache_memory(ctx, P):
    size = P["cache_size"]
    log(f"cache: RSS of a fresh D (cache_max_size {size:,}) as distinct tokens go through it")
    e = Envoy("D", ctx, tag="-cache", cache_size=size).start()
    points = []
    try:
        benchc("load", e.port, "/events/bench?mode=short", timeout=60, requests=500, concurrency=16,
               token_file=ctx.pool_file)
        time.sleep(1.0)
        points.append({"tokens": 0, "rss_kb": e.rss_kb()})
        done = 0
        t0 = time.monotonic()
        for target in P["cache_points"]:
            m = target - done
            r = benchc("load", e.port, "/events/bench?mode=short", timeout=300, requests=m, start=done,
                       concurrency=64, token_gen="cache", max_secs=240)
            if r["ok"] != m:
                raise BenchError(f"cache fill: {r['statuses']}")
            done = target
            time.sleep(1.0)
            st = e.stats("revenprox_(cache|webhook_calls)")
            points.append({"tokens": done, "rss_kb": e.rss_kb(), "rps": r["rps"],
                           "webhook_calls": st.get("revenprox_webhook_calls"),
                           "cache_hits": st.get("revenprox_cache_hits"),
                           "cache_misses": st.get("revenprox_cache_misses")})
            log(f"  {done:,} tokens: RSS {points[-1]['rss_kb'] / 1024:.1f} MiB ({r['rps']:,.0f} verifications/s)")
        secs = time.monotonic() - t0
    finally:
        e.stop()
    return {"cache_max_size": size, "points": points, "secs": secs}


# Opt-in phase `callgrind`: instructions executed inside Envoy (its C++, V8, and the filter's
# wasm) per handshake and per event, counted by valgrind --tool=callgrind on a --concurrency 1
# Envoy. Unlike CPU time, the counts do not move with the machine's load (repeatable to ~0.1 %).
# (label, setup, probe configuration of bench/noop-wasm, what is counted)
CALLGRIND_SPECS = [
    ("A", "A", None, "handshake"), ("N", "N", None, "handshake"), ("V", "V", None, "handshake"),
    ("D", "D", None, "handshake"), ("E", "E", None, "handshake"),
    ("B", "B", None, "handshake"), ("C", "C", None, "handshake"),
    ("N headers=20", "N", "headers=20", "handshake"), ("N shared=20", "N", "shared=20", "handshake"),
    ("N metrics=20", "N", "metrics=20", "handshake"), ("N time=20", "N", "time=20", "handshake"),
    ("N tick=1", "N", "tick=1", "handshake"),
    ("A", "A", None, "event"), ("N", "N", None, "event"), ("V", "V", None, "event"), ("D", "D", None, "event"),
    ("N body=1", "N", "body=1", "event"), ("N queue=1", "N", "queue=1", "event"),
    ("N signal=1", "N", "signal=1", "event"),
]


def envoy_elf():
    """The Envoy executable itself (.venv/bin/envoy is a Python wrapper that execs it)."""
    with open(ENVOY_BIN, "rb") as f:
        elf = f.read(4) == b"\x7fELF"
    if elf:
        return ENVOY_BIN
    found = sorted((REPO / ".venv").glob("lib/python*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise BenchError("cannot find the Envoy binary behind .venv/bin/envoy")
    return found[0]


def callgrind(ctx, P, n_handshakes=1000, event_secs=5.0, only=None):
    """`only`: run just the specs named `label/what` in this list (all when None)."""
    vg = shutil.which("valgrind")
    if not vg or not shutil.which("callgrind_control"):
        raise BenchError("valgrind not found (apt-get install valgrind)")
    log(f"callgrind: instructions inside Envoy (--concurrency 1) per handshake ({n_handshakes}) and per event")
    out = []
    for i, (label, setup, probe_cfg, what) in enumerate(CALLGRIND_SPECS):
        if only is not None and f"{label}/{what}" not in only:
            continue
        e = Envoy(setup, ctx, tag=f"-cg{i}", heartbeat_sec=1, probe=probe_cfg)
        cg_out = e.dir / "callgrind.out"
        e.start(timeout=300, concurrency=1, prefix=[vg, "--tool=callgrind", f"--callgrind-out-file={cg_out}",
                                                    "--smc-check=all-non-file", "--instr-atstart=no"])
        try:
            benchc("load", e.port, "/events/bench?mode=short", timeout=300, requests=200, concurrency=4,
                   token_file=ctx.pool_file)
            for args in (["-i", "on"], ["-z"]):
                subprocess.run(["callgrind_control", *args, str(e.pid)], capture_output=True, timeout=60)
            if what == "handshake":
                r = benchc("load", e.port, "/events/bench?mode=short", timeout=600, requests=n_handshakes,
                           concurrency=4, token_file=ctx.pool_file)
                count = r["ok"]
            else:
                # 10 streams, one event every 50 ms each: every event is its own chunk
                r = benchc("stream", e.port, f"/events/bench?mode=paced&ms=50&secs={event_secs + 10:.0f}",
                           timeout=120, streams=10, warmup=0.5, secs=event_secs, token_file=ctx.pool_file)
                count = r["events"]
            subprocess.run(["callgrind_control", "-d", str(e.pid)], capture_output=True, timeout=120)
            time.sleep(0.5)
            ir = 0
            for f in e.dir.glob("callgrind.out.*"):
                m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.M)
                ir += int(m.group(1)) if m else 0
        finally:
            e.stop()
            for f in e.dir.glob("callgrind.out*"):
                f.unlink()
        row = {"label": label, "setup": setup, "probe": probe_cfg, "what": what, "count": count,
               "instructions": ir, "per_op": ir / max(count, 1)}
        out.append(row)
        log(f"  {label:14s} {what:9s} {row['per_op']:10,.0f} instructions (over {count})")
    return out


def hotpath(P):
    log("hotpath: the filter's pure core, natively")
    out = run_json([BIN / "hotpath"], timeout=120)
    vg = shutil.which("valgrind")
    if P["callgrind"] and vg:
        def ir(case, iters):
            p = subprocess.run([vg, "--tool=callgrind", "--callgrind-out-file=/dev/null", BIN / "hotpath",
                                "--only", case, "--iters", str(iters)], capture_output=True, timeout=120)
            m = re.search(rb"Collected : (\d+)", p.stderr)
            if not m:
                raise BenchError(f"callgrind gave no count for {case}")
            return int(m.group(1))
        for c in out["cases"]:
            c["instructions_per_op"] = round((ir(c["case"], 201) - ir(c["case"], 1)) / 200)
        out["instructions"] = "callgrind"
    return out


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "kernel": platform.release(),
            "os": platform.platform(), "nofile_limit": _hard_nofile}


def envoy_version():
    p = subprocess.run([ENVOY_BIN, "--version"], capture_output=True, timeout=30)
    m = re.search(rb"version: (\S+)", p.stdout + p.stderr)
    return m.group(1).decode() if m else "?"


# ------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small, short runs (development)")
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--only", default="ceilings,rounds,herd,memory,scale,cliff,reverify,cache,hotpath",
                    help="comma-separated phases to run (default: all but the opt-in `callgrind`)")
    ap.add_argument("--callgrind-specs", help="with --only callgrind: just these specs, comma-separated "
                    "`label/what` (e.g. 'D/handshake,D/event,N queue=1/event')")
    ap.add_argument("--budget", type=int, help="hard time limit in seconds (default 900, +900 with callgrind)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/ (results go to bench/out)")
    args = ap.parse_args()
    P = dict(PROFILES["quick" if args.quick else "full"])
    if args.rounds:
        P["rounds"] = args.rounds
    phases = set(args.only.split(","))

    for path, hint in ((WASM, "make wasm"), (NOOP_WASM, "make bench-tools"), (ENVOY_BIN, "make envoy"), (BIN / "benchd", "make bench-tools"),
                       (BIN / "benchc", "make bench-tools"), (BIN / "hotpath", "make bench-tools")):
        if not path.exists():
            raise SystemExit(f"missing {path} (run `{hint}`)")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum, _frame):
        raise BenchError(f"time budget of {budget}s exceeded")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    budget = args.budget or (900 + (900 if "callgrind" in phases else 0))
    signal.alarm(budget)

    ctx = Ctx()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ctx.workdir = BENCH / "out" / f"run-{stamp}"
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    for old in sorted((BENCH / "out").glob("run-*"))[:-3]:
        if time.time() - old.stat().st_mtime > 3600:  # never one that may still be running
            shutil.rmtree(old, ignore_errors=True)
    t_start = time.monotonic()
    results = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "envoy_version": envoy_version(), "profile": "quick" if args.quick else "full",
        "params": P, "load_avg_start": os.getloadavg(), "wasm_bytes": WASM.stat().st_size,
        "setups": SETUP_NAMES, "herd_delay_ms": HERD_DELAY_MS}}
    try:
        log(f"workdir {ctx.workdir}; profile {results['meta']['profile']}; wasm {WASM.stat().st_size:,} bytes")
        ctx.keys = Keys(ctx.workdir)
        ctx.pool = [ctx.keys.token(f"pool-{i}") for i in range(64)]
        ctx.pool_file = ctx.workdir / "tokens-pool.txt"
        ctx.pool_file.write_text("\n".join(ctx.pool) + "\n")
        ctx.upstream = Server("upstream", ctx.workdir, ["--threads", "2"])
        ctx.webhook = Server("webhook", ctx.workdir, ["--threads", "2", "--slow-topic", HERD_TOPIC,
                                                       "--slow-ms", str(HERD_DELAY_MS)])
        ctx.authz = Server("authz", ctx.workdir, ["--threads", "2", "--slow-topic", HERD_TOPIC,
                                                   "--slow-ms", str(HERD_DELAY_MS)])
        if "ceilings" in phases:
            results["ceilings"] = ceilings(ctx, P)
        if phases & {"rounds", "herd"}:
            envoys = {}
            for s in SETUPS + (BREAKDOWN if "rounds" in phases and P["breakdown"] else []):  # one after another
                envoys[s] = Envoy(s, ctx, heartbeat_sec=1).start()
                sanity(ctx, envoys[s])
                # warm-up (fills D's cache with every pool token)
                wrk(envoys[s].port, "/events/bench?mode=short", ctx.pool_file, 8, 1)
                log(f"Envoy {s} ({SETUP_NAMES[s]}) on 127.0.0.1:{envoys[s].port}, pid {envoys[s].pid}")
            results["rss_idle_kb"] = {s: e.rss_kb() for s, e in envoys.items()}
            if "rounds" in phases:
                log(f"rounds: {P['rounds']} × {len(SETUPS)} setups, order rotated each round")
                results["rounds"] = []
                every = list(envoys)
                for rnd in range(P["rounds"]):
                    order = every[rnd % len(every):] + every[:rnd % len(every)]
                    for s in order:
                        results["rounds"].append(one_round(ctx, P, envoys[s], rnd, full=s in SETUPS))
                # streams Envoy reset because a filter held more than its buffer limit (floods)
                results["rs_too_large"] = {s: e.stats("http.bench.rs_too_large").get("http.bench.rs_too_large", 0)
                                           for s, e in envoys.items()}
                d_stats = envoys["D"].stats("revenprox_")
                e_stats = envoys["E"].stats("revenprox_")
                results["filter_stats"] = {"D": d_stats, "E": e_stats}
            if "herd" in phases:
                results["herd"] = herd(ctx, P, envoys)
            for e in envoys.values():
                e.stop()
        if "memory" in phases:
            results["memory"] = memory(ctx, P)
        if "scale" in phases:
            results["scale"] = scale(ctx, P)
        if "cliff" in phases:
            results["cliff"] = cliff(ctx, P)
        if "reverify" in phases:
            results["reverify"] = reverify(ctx, P)
        if "cache" in phases:
            results["cache"] = cache_memory(ctx, P)
        if "hotpath" in phases:
            results["hotpath"] = hotpath(P)
        if "callgrind" in phases:
            only = args.callgrind_specs.split(",") if args.callgrind_specs else None
            results["callgrind"] = callgrind(ctx, P, only=only)
            if not args.no_docs and only is None:
                # kept apart: the default run re-renders it (counts do not depend on the machine's load)
                (DOCS / "bench").mkdir(parents=True, exist_ok=True)
                (DOCS / "bench" / "callgrind.json").write_text(json.dumps({
                    "date": results["meta"]["date"], "envoy_version": results["meta"]["envoy_version"],
                    "wasm_bytes": results["meta"]["wasm_bytes"], "rows": results["callgrind"]}, indent=1) + "\n")
    finally:
        signal.alarm(0)
        PROCS.stop_all()
    results["meta"]["duration_s"] = round(time.monotonic() - t_start, 1)
    results["meta"]["load_avg_end"] = os.getloadavg()
    results["summary"] = report.summarize(results)
    md, table, svg = report.render(results)
    (ctx.workdir / "results.json").write_text(json.dumps(results, indent=1))
    saved = DOCS / "bench" / "results.json"
    if not args.no_docs and phases == {"callgrind"} and saved.exists():
        # A callgrind-only run refreshes docs/bench/callgrind.json (written above) and re-renders the
        # last full run with it, instead of replacing that run's figures with a callgrind-only page.
        table = report.rerender(saved)
        log("wrote docs/bench/callgrind.json; re-rendered docs/benchmarks.md from docs/bench/results.json")
    elif not args.no_docs:
        (DOCS / "bench").mkdir(parents=True, exist_ok=True)
        (DOCS / "bench" / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (DOCS / "bench" / "ratios.svg").write_text(svg)
        (DOCS / "benchmarks.md").write_text(md)
        log("wrote docs/benchmarks.md, docs/bench/results.json, docs/bench/ratios.svg")
    else:
        (ctx.workdir / "ratios.svg").write_text(svg)
        (ctx.workdir / "benchmarks.md").write_text(md)
        log(f"wrote {ctx.workdir}/benchmarks.md")
    print(table)
    log(f"done in {results['meta']['duration_s']:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        PROCS.stop_all()
        raise SystemExit(f"bench interrupted ({e}); every process it started was stopped")
    except BenchError as e:
        PROCS.stop_all()
        raise SystemExit(f"bench failed: {e}")
