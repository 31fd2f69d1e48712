"""The browser demo in a real headless Chromium: `make demo`'s page, three ways to stream.

Debian's Chromium (/usr/bin/chromium, `apt-get install -y chromium`) driven by Playwright for
Python (PyPI `playwright`: its wheel carries the driver; no browser is ever downloaded). Playwright
launches Chromium with a fresh temporary profile (user-data-dir) and these flags, so the closed
network here is never tried. Missing Chromium or Playwright fails the test; it never skips.

demo/run.py runs on free ports with short timings (tokens live 5 s, challenge 3 s before expiry,
heartbeat after 1 s of silence). In five isolated browser contexts at once, the page logs in,
picks a mode and clicks Connect:
  fetch + Authorization header / EventSource + ?token= / EventSource + cookie
each answering challenges (the stream outlives the first token, on the same connection), and
fetch and EventSource (query) with "don't answer challenges" (event: expired ends it). No page
shows an error in its console; the page links the filter's metrics and shows its counters.
Screenshots go to e2e/artifacts/run-*/browser/.
"""
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import helpers
from helpers import ENVOY_BIN, REPO, WASM, Stats, free_port, stop_process

CHROMIUM = Path(os.environ.get("REVENPROX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN_TTL, CHALLENGE_BEFORE, HEARTBEAT = 5, 3, 1
MODES = ["fetch", "query", "cookie"]


def _http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def demo():
    """demo/run.py (not --check) on free ports with short session timings; stopped by PID."""
    out_dir = helpers.run_dir() / "browser"
    out_dir.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("PORT", "ADMIN_PORT", "WEBHOOK_PORT", "UPSTREAM_PORT")}
    env = dict(os.environ, REVENPROX_DEMO_DIR=str(out_dir / "demo"), REVENPROX_WASM=str(WASM),
               REVENPROX_ENVOY=str(ENVOY_BIN), REVENPROX_DEMO_TOKEN_TTL_SEC=str(TOKEN_TTL),
               REVENPROX_DEMO_CHALLENGE_SEC=str(CHALLENGE_BEFORE), REVENPROX_DEMO_HEARTBEAT_SEC=str(HEARTBEAT),
               REVENPROX_DEMO_EVENT_INTERVAL_SEC="1",
               **{f"REVENPROX_DEMO_{k}": str(v) for k, v in ports.items()})
    log = open(out_dir / "demo-run.log", "wb")
    proc = subprocess.Popen([sys.executable, str(REPO / "demo" / "run.py")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports['PORT']}"
    try:
        deadline = time.monotonic() + 40
        while not _http_ok(f"{url}/demo/settings"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"demo did not come up (rc={proc.poll()}):\n"
                                     + (out_dir / "demo-run.log").read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        yield {"url": url, "admin": f"http://127.0.0.1:{ports['ADMIN_PORT']}", "dir": out_dir}
    finally:
        stop_process(proc, timeout=20)  # SIGTERM to this PID: run.py stops its own children by PID
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` (the browser test never skips)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright for Python is missing ({e}): `.venv/bin/pip install playwright` "
                    "(or `make deploy-deps`); never `playwright install`")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


STATE_JS = """() => {
  const d = window.revenproxDemo;
  return {state: d.state, counts: d.counts, firstExpiresAt: d.firstExpiresAt, expiresAt: d.expiresAt,
          lastEventAt: d.lastEventAt, openedAt: d.openedAt, now: Date.now(),
          log: d.log.map(l => l.kind + ' ' + l.text)};
}"""


def _prepare(browser, url, *, mode, answer, user="alice", topic="news", quiet=False):
    """A page in its own browser context, logged in, mode and options chosen, not connected yet."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})  # own cookies per session
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # nothing in the console either (a missing favicon was a 404 there)
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.goto(url + "/", wait_until="domcontentloaded")
    page.wait_for_function("() => window.revenproxDemo && window.revenproxDemo.settings", timeout=5000)
    page.select_option("#user", user)
    page.click("#login")
    page.wait_for_function("() => window.revenproxDemo.token", timeout=5000)
    page.select_option("#topic", topic)
    page.check(f"#mode-{mode}")
    if quiet:
        page.select_option("#pace", index=2)
    if not answer:
        page.check("#no-answer")
    return {"ctx": ctx, "page": page, "mode": mode, "answer": answer, "errors": errors}


def _state(s):
    return s["page"].evaluate(STATE_JS)


def _wait_opened(s, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        st = _state(s)
        if st["openedAt"]:  # open (or already past it: the short-lived sessions move fast)
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{s['mode']} session not open after {timeout}s: {st['state']} {st['counts']}\n"
                                 + "\n".join(st["log"]) + f"\npage errors: {s['errors']}")
        time.sleep(0.1)


def test_browser_demo_three_modes(demo, browser):
    url = demo["url"]
    # fetch mode runs on a quiet pace so heartbeats show between events
    sessions = []
    try:
        sessions += [_prepare(browser, url, mode=m, answer=True, quiet=(m == "fetch")) for m in MODES]
        # not answering: the fetch parser and native EventSource (cookie mode shares query's path)
        sessions += [_prepare(browser, url, mode=m, answer=False, user="bob") for m in ("fetch", "query")]
        for s in sessions:
            s["page"].click("#connect")
        for s in sessions:
            _wait_opened(s)
        # Wait until every answering stream is well past its first token's expiry, and every
        # non-answering one has expired.
        deadline = time.monotonic() + TOKEN_TTL + 12
        while True:
            states = [_state(s) for s in sessions]
            outlived = all(st["now"] / 1000 > st["firstExpiresAt"] + 2.5
                           for s, st in zip(sessions, states) if s["answer"])
            ended = all(st["state"] == "expired" for s, st in zip(sessions, states) if not s["answer"])
            if (outlived and ended) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        for s in sessions:
            s["page"].screenshot(path=str(demo["dir"] / f"browser-{s['mode']}-{'answers' if s['answer'] else 'no-answer'}.png"),
                                 full_page=True)

        for s, st in zip(sessions, states):
            what = f"{s['mode']} ({'answers challenges' if s['answer'] else 'no answers'}): {st['counts']} {st['state']}\n" \
                   + "\n".join(st["log"][-25:])
            assert not s["errors"], f"{what}\npage errors: {s['errors']}"
            c = st["counts"]
            assert c["events"] >= 2, what
            assert c["challenges"] >= 1, what
            opens = [l for l in st["log"] if "stream open" in l]
            assert len(opens) == 1 and not any("reconnecting" in l for l in st["log"]), \
                f"one connection expected, no reconnection: {what}"
            if s["answer"]:
                assert st["state"] == "open", what
                assert c["answered"] >= 2 and c["refusedAnswers"] == 0, what
                assert c["expired"] == 0, what
                assert st["expiresAt"] > st["firstExpiresAt"], what
                # the same stream still delivers events after the first token's expiry
                assert st["lastEventAt"] / 1000 > st["firstExpiresAt"], what
                assert any(l.startswith("event message:") for l in st["log"]), what
            else:
                assert st["state"] == "expired", what
                assert c["expired"] == 1 and c["answered"] == 0, what
                assert any("token_expired" in l for l in st["log"]), what
                assert st["expiresAt"] == st["firstExpiresAt"], what
            if s["mode"] == "fetch" and s["answer"]:
                assert c["heartbeats"] >= 1, f"fetch mode sees ': heartbeat' comments: {what}"

        # The page links the filter's metrics at Envoy's admin and shows its counters.
        page = sessions[0]["page"]
        href = page.get_attribute("#metrics-link", "href")
        assert href == demo["admin"] + "/stats/prometheus?filter=wasmcustom.revenprox_", href
        with urllib.request.urlopen(href, timeout=5) as r:
            linked = Stats(r.read().decode())
        assert linked.get("revenprox_reauthorizations") >= 2 * len(MODES) and not linked.has("envoy_http_downstream_rq_total")
        page.wait_for_function(f"() => (window.revenproxDemo.metrics || {{}}).revenprox_reauthorizations >= {2 * len(MODES)}",
                               timeout=5000)
        shown = page.inner_text("#metrics")
        assert re.search(r"revenprox_challenges_sent\s+\d+", shown), shown
        assert not [e for s in sessions for e in s["errors"]], [e for s in sessions for e in s["errors"]]

        # The page is not fooling itself: Envoy's own counters saw the same.
        with urllib.request.urlopen(demo["admin"] + "/stats/prometheus", timeout=5) as r:
            stats = Stats(r.read().decode())
        assert stats.get("revenprox_reauthorizations") >= 2 * len(MODES)
        assert stats.get("revenprox_streams_expired") >= 2
        assert stats.get("revenprox_heartbeats_sent") >= 1
        assert stats.get("revenprox_denied_user_mismatch") == 0
        # every metric the dashboards and rules of docs/deploy.md use exists under that name
        import test_deploy
        names, patterns = test_deploy.metric_names_used()
        scraped = set(stats.names())
        assert names and names <= scraped, f"not in Envoy's scrape: {sorted(names - scraped)}"
        for pat in patterns:
            assert any(re.fullmatch(pat, n) for n in scraped), pat
    finally:
        for s in sessions:
            s["ctx"].close()
