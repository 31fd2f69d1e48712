"""The token-leak scan of e2e/conftest.py (pytest_sessionfinish) fails a run: a pytest run of its
own, in a subprocess, whose one test writes a credential it created into the access log of an
Envoy object (rendered, never started). The scan of THIS run is at its end."""
import os
import subprocess
import sys

from helpers import REPO

PROBE = '''
import helpers


def test_writes_a_credential_into_an_access_log():
    env = helpers.Envoy(helpers.plugin_config(), webhook_port=1, upstream_port=1, name="leak-probe")
    tok = helpers.new_token("leakprobe")
    helpers.new_token("notleaked")
    if LEAK:
        env.access_log_path.write_text(f'[t] access "GET /events/news?token={tok} HTTP/1.1" 200\\\\n')
    env.log_path.write_text("[t][info][main] nothing secret here\\\\n")
'''


def run_probe(tmp_path, leak):
    (tmp_path / "test_probe.py").write_text(f"LEAK = {leak}\n" + PROBE)
    env = dict(os.environ, PYTHONPATH=str(REPO / "e2e"))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def test_a_leaked_credential_fails_the_run_naming_file_and_token(tmp_path):
    rc, out = run_probe(tmp_path, leak=True)
    assert rc == 1, f"rc {rc}:\n{out}"
    assert "1 passed" in out, out  # the test itself passed: the scan failed the run
    assert "credential leak" in out and "1 credential(s) in Envoy logs" in out, out
    line = next(ln for ln in out.splitlines() if "leak-probe" in ln and "access.log:" in ln)
    assert "eyJhbGciOiJI…" in line and "(sub leakprobe-" in line, line
    assert "notleaked" not in out, out


def test_a_clean_run_passes_and_says_what_was_scanned(tmp_path):
    rc, out = run_probe(tmp_path, leak=False)
    assert rc == 0, f"rc {rc}:\n{out}"
    assert "token-leak scan: 2 credentials, logs and access logs of 1 Envoys: none found" in out, out
