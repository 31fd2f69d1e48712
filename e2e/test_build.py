"""The built artifact itself: small enough to ship in a config map, and a proxy-wasm module; and
the generated sources it is built from."""
import re
import subprocess
import sys
import unicodedata

from helpers import REPO, WASM

MAX_BYTES = 300 * 1024


def test_wasm_is_at_most_300_kb():
    size = WASM.stat().st_size
    assert size <= MAX_BYTES, f"{WASM} is {size} bytes (limit {MAX_BYTES})"


def test_wasm_exports_the_proxy_wasm_abi():
    data = WASM.read_bytes()
    assert data[:4] == b"\0asm", "not a wasm module"
    for name in (b"proxy_abi_version_0_2_1", b"proxy_on_configure", b"proxy_on_request_headers",
                 b"proxy_on_response_body", b"proxy_on_http_call_response", b"proxy_on_queue_ready"):
        assert re.search(re.escape(name), data), f"{name.decode()} is not exported"


def test_shipped_wasm_has_no_fault_injection():
    # The cargo feature `fault-injection` (test-only: a request header makes the VM trap) must never
    # be in the shipped artifact. Its header name is in the fault build's data (checked by
    # e2e/test_vm_failure.py), so its absence here means the feature is off.
    found = b"x-revenprox-fault" in WASM.read_bytes()
    assert not found, f"{WASM} was built with the fault-injection feature"


def test_nfkc_table_is_generated_from_unicode_data(tmp_path):
    # core/src/auth/nfkc.rs is generated from Python's unicodedata by tools/gen_nfkc_table.py: a
    # hand edit, or a table left behind by a change of the generator, differs from its output here.
    committed = REPO / "core/src/auth/nfkc.rs"
    fresh = tmp_path / "nfkc.rs"
    subprocess.run([sys.executable, str(REPO / "tools/gen_nfkc_table.py"), str(fresh)], check=True,
                   capture_output=True, timeout=120)
    version = re.search(rb'UNICODE_VERSION: &str = "([^"]*)"', committed.read_bytes())
    assert fresh.read_bytes() == committed.read_bytes(), (
        f"{committed} is not what tools/gen_nfkc_table.py generates (committed table: Unicode "
        f"{version.group(1).decode() if version else '?'}, this Python {sys.version.split()[0]}: "
        f"Unicode {unicodedata.unidata_version}); regenerate it with `python3 tools/gen_nfkc_table.py`")


def test_pip_installs_show_their_progress():
    # `make envoy` downloads a 37 MB wheel: a newcomer must see it progress, not a silent minute.
    from helpers import REPO

    makefiles = [REPO / "Makefile", *sorted((REPO / "mk").glob("*.mk"))]
    installs = [(f.name, ln) for f in makefiles for ln in f.read_text().splitlines() if "pip install" in ln]
    assert len(installs) >= 2, installs  # the Envoy wheel and the test tools
    quiet = [(name, ln.strip()) for name, ln in installs if re.search(r"(^|\s)(--quiet|-q+)(\s|$)", ln)]
    assert not quiet, f"pip installs that hide their progress: {quiet}"
