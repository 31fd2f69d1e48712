"""The built artifact itself: small enough to ship in a config map, and a proxy-wasm module."""
import re

from helpers import WASM

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
