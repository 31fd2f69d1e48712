"""`make demo` works: run demo/run.py --check on free ports (events arrive for alice, a token
signed with the wrong secret gets 401, bob is refused on a topic he may not read)."""
import os
import subprocess
import sys

from helpers import REPO, ENVOY_BIN, WASM, free_port


def test_demo_check(tmp_path):
    env = dict(os.environ,
               REVENPROX_DEMO_PORT=str(free_port()), REVENPROX_DEMO_ADMIN_PORT=str(free_port()),
               REVENPROX_DEMO_WEBHOOK_PORT=str(free_port()), REVENPROX_DEMO_UPSTREAM_PORT=str(free_port()),
               REVENPROX_DEMO_DIR=str(tmp_path), REVENPROX_WASM=str(WASM), REVENPROX_ENVOY=str(ENVOY_BIN))
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
