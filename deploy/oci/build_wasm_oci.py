#!/usr/bin/env python3
"""Package revenprox.wasm as an OCI image layout (a directory) for Istio's and Gloo's image fetchers.

    python3 deploy/oci/build_wasm_oci.py                     # compat variant, tag = Cargo version
    python3 deploy/oci/build_wasm_oci.py --variant oci       # Solo "oci" (wasme) variant
    make wasm-oci                                             # same, via mk/deploy.mk

Two variants of the Wasm image specification (github.com/solo-io/wasm, spec/):

  compat (default) - a standard OCI image with exactly ONE layer,
      application/vnd.oci.image.layer.v1.tar+gzip, holding `plugin.wasm`, and the manifest
      annotation module.wasm.image/variant=compat. Istio's WasmPlugin (oci://...) accepts it; so
      does every registry, since only standard media types are used. What `docker build` of
      deploy/oci/Dockerfile produces, minus the Docker media types.
  oci - Solo's artifact variant as `wasme` pushed it: config
      application/vnd.module.wasm.config.v1+json (runtime-config.json: type envoy_proxy, ABI,
      root ids) and TWO layers: that config and the module itself,
      application/vnd.module.wasm.content.layer.v1+wasm. Istio accepts it too (it requires
      exactly two layers for this variant); registries must accept OCI artifacts.

Output: <out>/oci-layout, <out>/index.json (one manifest, tagged via
org.opencontainers.image.ref.name) and <out>/blobs/sha256/<hex>. Byte-for-byte reproducible: the
tar entry and the gzip header carry a fixed time (SOURCE_DATE_EPOCH, default 0) and JSON is
written canonically, so the same .wasm always gives the same manifest digest.

Push with any OCI tool, e.g.
    skopeo copy oci:.build/oci/revenprox:0.1.0 docker://registry.example.com/platform/revenprox:0.1.0
    oras cp --from-oci-layout .build/oci/revenprox:0.1.0 registry.example.com/platform/revenprox:0.1.0
Stdlib only.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_WASM = REPO / "target/wasm32-wasip1/release/revenprox.wasm"
DEFAULT_OUT = REPO / ".build/oci/revenprox"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
MT_WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
ABI_VERSION = "proxy_abi_version_0_2_1"  # exported by the module (proxy-wasm 0.2.x)
ROOT_ID = "revenprox"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cargo_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "Cargo.toml").read_text(), re.M)
    return m.group(1) if m else "latest"


class Layout:
    def __init__(self, out: Path):
        self.out = out
        self.blobs = out / "blobs" / "sha256"

    def reset(self):
        if self.out.exists():
            shutil.rmtree(self.out)
        self.blobs.mkdir(parents=True)

    def put(self, data: bytes, media_type: str, annotations=None) -> dict:
        digest = sha256(data)
        (self.blobs / digest.split(":", 1)[1]).write_bytes(data)
        desc = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc


def plugin_tar_gz(wasm: bytes, mtime: int):
    """(uncompressed tar, gzip of it) holding plugin.wasm, reproducibly."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(wasm), 0o644, mtime
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    tar_bytes = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=mtime, compresslevel=9) as f:
        f.write(tar_bytes)
    return tar_bytes, gz.getvalue()


def build(wasm_path: Path, out: Path, tag: str, variant: str, mtime: int = 0) -> dict:
    wasm = Path(wasm_path).read_bytes()
    if wasm[:4] != b"\0asm":
        raise SystemExit(f"{wasm_path}: not a WebAssembly module")
    layout = Layout(Path(out))
    layout.reset()
    annotations = {"org.opencontainers.image.title": "revenprox",
                   "org.opencontainers.image.version": tag,
                   "org.opencontainers.image.description": "RevenProx proxy-wasm HTTP filter for Envoy (root_id revenprox)"}
    if variant == "compat":
        tar_bytes, tgz = plugin_tar_gz(wasm, mtime)
        config = {"architecture": "wasm", "os": "wasip1", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes)]}}
        config_desc = layout.put(canonical(config), MT_OCI_CONFIG)
        layers = [layout.put(tgz, MT_OCI_LAYER_TGZ)]
        annotations["module.wasm.image/variant"] = "compat"
    elif variant == "oci":
        runtime = {"type": "envoy_proxy", "abiVersions": [ABI_VERSION], "config": {"rootIds": [ROOT_ID]}}
        title = {"org.opencontainers.image.title": "runtime-config.json"}
        config_desc = layout.put(canonical(runtime), MT_WASM_CONFIG, title)
        layers = [dict(config_desc), layout.put(wasm, MT_WASM_LAYER, {"org.opencontainers.image.title": "filter.wasm"})]
        annotations["module.wasm.runtime/type"] = "envoy_proxy"
        annotations["module.wasm.runtime/abi_version"] = ABI_VERSION
    else:
        raise SystemExit(f"unknown variant {variant!r} (compat or oci)")
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": layers,
                "annotations": annotations}
    manifest_desc = layout.put(canonical(manifest), MT_MANIFEST,
                               {"org.opencontainers.image.ref.name": tag})
    (layout.out / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    (layout.out / "index.json").write_bytes(canonical({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                                       "manifests": [manifest_desc]}))
    return {"out": str(layout.out), "tag": tag, "variant": variant, "manifest": manifest_desc["digest"],
            "wasm_sha256": hashlib.sha256(wasm).hexdigest(), "wasm_size": len(wasm)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=Path, default=Path(os.environ.get("REVENPROX_WASM", DEFAULT_WASM)))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"layout directory (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--tag", default=None, help="tag (default: the Cargo.toml version)")
    ap.add_argument("--variant", choices=["compat", "oci"], default="compat")
    args = ap.parse_args(argv)
    if not args.wasm.is_file():
        raise SystemExit(f"{args.wasm} not found (run `make wasm`)")
    res = build(args.wasm, args.out, args.tag or cargo_version(), args.variant,
                int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    print(f"OCI image layout ({res['variant']} variant) in {res['out']}, tag {res['tag']}\n"
          f"  manifest {res['manifest']}\n"
          f"  module   sha256 {res['wasm_sha256']} ({res['wasm_size']} bytes; the sha256 for a WasmPlugin http(s) url)\n"
          f"  push:    skopeo copy oci:{res['out']}:{res['tag']} docker://REGISTRY/revenprox:{res['tag']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
