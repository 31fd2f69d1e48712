"""VM death under the shipped `failure_policy: FAIL_CLOSED`: when the filter's wasm VM dies, Envoy
refuses every request that VM would have checked; nothing reaches the upstream unauthenticated.

The VM is killed on purpose with a test-only build (cargo feature `fault-injection`, built here
into target/fault-injection, never the shipped artifact): a request carrying
`x-revenprox-fault: trap` makes `on_http_request_headers` execute `unreachable`, the same trap a
panic becomes under panic=abort. e2e/test_build.py checks the shipped .wasm has no such code.

What Envoy 1.40 does (observed, and asserted below):
- the trapping request and every later request on that worker: 503, empty body, no
  content-type (an Envoy local reply; access log response code details `wasm_fail_stream`);
- the VM stays dead (FAIL_CLOSED never reloads it); the other worker's VM keeps serving;
- Envoy logs one `[error][wasm] ... Function: proxy_on_request_headers failed: Uncaught
  RuntimeError: unreachable` line per dead VM; no `wasm.*` stat counts the failure, only the
  HCM's 5xx counter grows and the filter's own `revenprox_requests` does not.
"""
import re
import shutil
import subprocess
import time

import pytest

from helpers import REPO, Envoy, marker, new_token, plugin_config, sub_of
from servers.webhook import invalid

FAULT_TARGET_DIR = REPO / "target/fault-injection"
FAULT_WASM = FAULT_TARGET_DIR / "wasm32-wasip1/release/revenprox.wasm"
FAULT_HEADER = "x-revenprox-fault"
TRAP_LOG = re.compile(r"\]\[(\d+)\]\[error\]\[wasm\] [^\n]*Function: proxy_on_request_headers failed: "
                      r"Uncaught RuntimeError: unreachable")
CONCURRENCY = 2


@pytest.fixture(scope="module")
def fault_wasm():
    """The fault-injection build, in its own target dir (the shipped artifact is untouched)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail("cargo not found: needed to build the fault-injection wasm")
    cmd = [cargo, "build", "--release", "--target", "wasm32-wasip1", "--features", "fault-injection",
           "--target-dir", str(FAULT_TARGET_DIR)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    assert FAULT_WASM.is_file(), f"{FAULT_WASM} was not produced"
    # the needle e2e/test_build.py looks for in the shipped wasm really marks this build
    assert FAULT_HEADER.encode() in FAULT_WASM.read_bytes(), "the fault build has no fault injection"
    return FAULT_WASM


@pytest.fixture
def fenv(fault_wasm, webhook, upstream, request):
    """A fresh Envoy per test (killing VMs is destructive) on the shipped template (FAIL_CLOSED)."""
    env = Envoy(plugin_config(), webhook_port=webhook.port, upstream_port=upstream.port,
                name=f"vmfail-{request.node.name}", concurrency=CONCURRENCY, wasm=fault_wasm)
    assert "failure_policy: FAIL_CLOSED" in env.yaml_path.read_text()
    env.start()
    tokens = []
    yield env, tokens
    env.stop()
    # never a credential in Envoy's log or access log, also not when a VM dies
    text = env.envoy_log() + "\n" + env.access_log()
    leaked = [t for t in tokens if t in text]
    assert not leaked, f"{len(leaked)} credential(s) in the logs of {env}"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def plain_stats(env):
    """Counters and gauges of admin /stats as {name: int}."""
    out = {}
    for line in env.admin("/stats").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def stats_after(env, before, requests):
    """/stats once the HCM counted `requests` more requests than in `before` (a stream's counters
    move when Envoy finishes it, just after the client got its answer); at most 2 s."""
    total = "http.revenprox_ingress.downstream_rq_total"
    deadline = time.monotonic() + 2.0
    while True:
        now = plain_stats(env)
        if now.get(total, 0) - before.get(total, 0) >= requests or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def is_envoy_refusal(r):
    """Envoy's FAIL_CLOSED local reply: 503, empty body, no content-type (the filter never ran;
    the filter's own 503 is JSON)."""
    return (r.status == 503 and r.body == b"" and r.header("content-type") is None
            and r.header("server") == "envoy")


def dead_worker_threads(env):
    return set(TRAP_LOG.findall(env.envoy_log()))


def access_details(env, m, timeout=3.0):
    """Response code details of the access log line of the request carrying marker `m` in its
    path (not its query: a request the filter never saw is logged without its query, which may
    hold a token)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in env.access_log().splitlines() if m in ln]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, f"access log lines for {m}: {lines}"
    found = re.search(r'" (\d{3}) \S+ (\S*) bytes=', lines[0])
    assert found, lines[0]
    return int(found.group(1)), found.group(2)


def trap(env, tok):
    """A request that kills the VM of the worker it lands on (its own answer is a refusal)."""
    m = marker()
    r = env.get(f"/events/news/{m}", {**bearer(tok), FAULT_HEADER: "trap"})
    assert is_envoy_refusal(r), f"the trapping request got {r!r}"
    assert access_details(env, m) == (503, "wasm_fail_stream")
    return m


def send_mix(env, webhook, tokens, rounds):
    """`rounds` x (valid token, no token, spoofed identity, webhook-denied token), each on a fresh
    connection. Returns [(kind, marker, response, user)]."""
    out = []
    for _ in range(rounds):
        good = new_token("vm-good")
        bad = new_token("vm-bad")
        webhook.program(bad, invalid())
        tokens += [good, bad]
        for kind, headers, user in (
            ("valid", bearer(good), sub_of(good)),
            ("no_token", {}, None),
            ("spoofed", {"x-revenprox-user": "admin"}, None),
            ("denied", bearer(bad), None),
        ):
            m = marker()
            out.append((kind, m, env.get(f"/events/news/{m}", headers), user))
    return out


def assert_every_answer_is_authenticated_or_refused(results, upstream):
    """No 200 without a valid verdict; nothing unauthenticated at the upstream."""
    time.sleep(0.05)
    for kind, m, r, user in results:
        seen = upstream.requests_containing(m)
        if is_envoy_refusal(r):
            assert seen == [], f"{kind}: refused by Envoy yet forwarded: {[q.path for q in seen]}"
            continue
        if kind == "valid":
            assert r.status == 200, f"valid token: {r!r}"
            assert r.first_event_json()["headers"].get("x-revenprox-user") == user
            assert len(seen) == 1 and seen[0].header("x-revenprox-user") == user
            # The credential stays with the filter (token.forward_to_upstream is false).
            assert seen[0].header("authorization") is None
        else:
            # a live VM answers these itself: 401, never forwarded
            assert r.status == 401, f"{kind}: expected 401 or Envoy's refusal, got {r!r}"
            assert r.json()["error"] == ("invalid_token" if kind == "denied" else "missing_token"), r
            assert seen == [], f"{kind}: reached the upstream: {[q.path for q in seen]}"


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def test_a_trap_kills_one_worker_vm_its_requests_are_refused_the_other_worker_serves(fenv, webhook, upstream):
    env, tokens = fenv
    ok = new_token("vm-before")
    tokens.append(ok)
    r = env.get("/events/news", bearer(ok))
    assert r.status == 200 and r.first_event_json()["headers"].get("x-revenprox-user") == sub_of(ok)
    assert dead_worker_threads(env) == set()
    vm_stats_before = {k: v for k, v in plain_stats(env).items() if k.startswith("wasm.")}

    trap_marker = trap(env, ok)
    assert env.wait_log(TRAP_LOG), f"no trap line in Envoy's log:\n{env.log_tail()}"
    assert len(dead_worker_threads(env)) == 1
    assert upstream.requests_containing(trap_marker) == []
    assert not [q for q in upstream.requests if q.header(FAULT_HEADER)], "the trapping request was forwarded"

    before = plain_stats(env)
    results = send_mix(env, webhook, tokens, rounds=15)  # 60 requests, fresh connections
    after = stats_after(env, before, len(results))
    assert_every_answer_is_authenticated_or_refused(results, upstream)

    refused = [(kind, m) for kind, m, r, _ in results if is_envoy_refusal(r)]
    served = [(kind, m) for kind, m, r, _ in results if not is_envoy_refusal(r)]
    # connections spread over both workers: the dead VM's worker refuses, the other one serves
    # (15 valid requests each: the odds that all land on one worker are 2**-15)
    assert any(kind == "valid" for kind, _ in refused), "no valid-token request hit the dead VM's worker"
    assert any(kind == "valid" for kind, _ in served), "the surviving worker served no valid request"
    for _, m in refused:
        assert access_details(env, m) == (503, "wasm_fail_stream")
    for kind, m in served:
        status, details = access_details(env, m)
        assert details != "wasm_fail_stream" and status in (200, 401), (kind, status, details)

    # still exactly one dead VM: refusals on it are not logged again, the other VM never failed
    assert len(dead_worker_threads(env)) == 1
    assert len(TRAP_LOG.findall(env.envoy_log())) == 1

    # stats: Envoy's 5xx counter counts the refusals; the filter never saw them
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in
             ("http.revenprox_ingress.downstream_rq_5xx", "http.revenprox_ingress.downstream_rq_total",
              "wasmcustom.revenprox_requests")}
    assert delta["http.revenprox_ingress.downstream_rq_total"] == len(results)
    assert delta["http.revenprox_ingress.downstream_rq_5xx"] == len(refused)
    assert delta["wasmcustom.revenprox_requests"] == len(served)
    # FAIL_CLOSED never reloads nor replaces the dead VM; no wasm.* stat records the death
    vm_stats_after = {k: v for k, v in after.items() if k.startswith("wasm.")}
    assert vm_stats_after == vm_stats_before, "wasm.* stats changed after the VM died"
    assert after.get("wasm.revenprox.vm_reload") == 0
    assert after.get("wasm.wasm_vm_count", 0) >= CONCURRENCY  # the dead VM still counts


def test_with_every_worker_vm_dead_nothing_reaches_the_upstream(fenv, webhook, upstream):
    env, tokens = fenv
    tok = new_token("vm-all")
    tokens.append(tok)
    # trap on fresh connections until the VM of every worker died (connections spread over workers)
    for _ in range(60):
        trap(env, tok)
        if len(dead_worker_threads(env)) == CONCURRENCY:
            break
        time.sleep(0.02)  # Envoy writes the log line just after the reply
        if len(dead_worker_threads(env)) == CONCURRENCY:
            break
    assert len(dead_worker_threads(env)) == CONCURRENCY, f"not every worker VM died:\n{env.log_tail()}"

    results = send_mix(env, webhook, tokens, rounds=5)
    time.sleep(0.5)  # and it stays so: no reload under FAIL_CLOSED
    results += send_mix(env, webhook, tokens, rounds=2)
    m = marker()
    h2 = env.get(f"/events/news/{m}", bearer(tok), http2=True)
    bad = [(kind, r) for kind, _, r, _ in results if not is_envoy_refusal(r)]
    assert not bad, f"answers other than Envoy's refusal with every VM dead: {bad[:4]}"
    assert h2.status == 503 and h2.body == b"", h2
    assert_every_answer_is_authenticated_or_refused(results, upstream)  # none was forwarded
    assert upstream.requests_containing(m) == []
    assert len(TRAP_LOG.findall(env.envoy_log())) == CONCURRENCY

    # Envoy itself is alive (its admin answers); the filter runs on every route, so FAIL_CLOSED
    # refuses every path, not only topics.
    assert env.alive
    assert env.admin("/ready").strip() == "LIVE"
    r = env.get("/health")
    assert r.status == 503 and r.body == b"", r
