r"""SSE topic server behind RevenProx: a real HTTP/1.1 server on 127.0.0.1.

GET /events/<topic...>  -> 200 text/event-stream (chunked). The first event's data is JSON
                           echoing what arrived: {"path": <raw path incl. query>,
                           "headers": {lowercased name: value}}. Then, per request header
                           `x-upstream-mode` (or the server default):
                             end     end the response (terminating chunk)
                             stream  `id: <send time>` + `data: tick N` every
                                     `x-upstream-interval` s (default 1) until the client goes away
                             split   after `x-upstream-split-delay` s (default 1.5) one event in
                                     two chunks with the same pause inside it
                                     ("data: first-half-" ... "second-half\n\n"), then
                                     "data: after\n\n" and the end
                             silent  send nothing more, hold the stream open until the client
                                     goes away
                             burst   `x-upstream-burst` events (default 30) in quick succession,
                                     in chunks a few ms apart, some ending inside an event, the
                                     last one ending with the last event; then silence until the
                                     client goes away
                             big     one 2 MB event (`id: big`) in 64 KB chunks, then
                                     "data: after-big\n\n" and the end
                             reset   "data: tick 1\n\n" and half an event, then a TCP reset
                             flood   `x-upstream-flood-mb` MB (default 16) of numbered events
                                     ("data: f<N>\n\n") written 1 MB at a time as fast as the
                                     connection takes them, 0.2 s later "data: after-flood\n\n",
                                     then silence until the client goes away
GET /health             -> 200 text/plain "ok"
anything else           -> 200 text/plain "upstream <method> <path>"

Every request is recorded (method, path, headers) so tests can assert that a refused request
never reached the upstream.

The demo's topic server is `demo/run.py --serve-app`, not this test server.
"""
import argparse
import io
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

try:  # imported as servers.sse_upstream
    from .httpbase import QuietServer, serve_until_signalled, start_event_stream
except ImportError:  # run as a script
    from httpbase import QuietServer, serve_until_signalled, start_event_stream  # type: ignore


@dataclass
class Request:
    method: str
    path: str
    headers: list
    time: float

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


# A silent stream's thread sleeps in poll() until its client goes (poll wakes at once on EOF or
# reset); the timeout only bounds the sleep. Long, so that a thousand idle streams do not wake a
# thousand threads twice a second in the test process and starve its accept loop.
IDLE_WAIT_S = 30.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "revenprox-test-upstream"
    sys_version = ""

    def log_message(self, fmt, *args):
        if self.server.owner.verbose:
            sys.stderr.write("upstream: " + (fmt % args) + "\n")

    # -- helpers -------------------------------------------------------------------------
    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self, wait: float) -> bool:
        """Wait up to `wait` s; True when the peer closed (readable with EOF) or errored."""
        try:
            # poll, not select: a test may hold more than FD_SETSIZE (1,024) streams open.
            p = select.poll()
            p.register(self.connection, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
            events = p.poll(wait * 1000)
            if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in events):
                return True
            if events:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":  # EOF: client went away
                    return True
                time.sleep(min(wait, 0.5))  # unexpected bytes from the client: ignore, don't spin
        except OSError:
            return True
        return False

    def _simple(self, status, body: bytes, ctype="text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    # -- dispatch --------------------------------------------------------------------------
    def _handle(self):
        owner: SseUpstream = self.server.owner
        owner._record(Request(self.command, self.path, list(self.headers.items()), time.time()))
        if self.command in ("POST", "PUT"):
            self._read_body()
        raw_path = self.path.split("?", 1)[0]
        if raw_path.startswith("/events/") and self.command in ("GET", "HEAD"):
            return self._sse(raw_path)
        if raw_path == "/health":
            return self._simple(200, b"ok")
        return self._simple(200, f"upstream {self.command} {self.path}\n".encode())

    do_GET = _handle
    do_POST = _handle
    do_HEAD = _handle
    do_PUT = _handle
    do_DELETE = _handle

    def _sse(self, raw_path):
        owner: SseUpstream = self.server.owner
        mode = (self.headers.get("x-upstream-mode") or owner.default_mode).lower()
        try:
            interval = float(self.headers.get("x-upstream-interval") or owner.interval)
        except ValueError:
            interval = owner.interval
        if not start_event_stream(self):
            return
        try:
            echo = {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
            self._chunk(b"data: " + json.dumps(echo, separators=(",", ":")).encode() + b"\n\n")
            if mode == "stream":
                n = 1
                while not self._client_gone(interval):
                    # id = send time, so a client can measure the latency Envoy adds
                    self._chunk(f"id: {time.time():.6f}\ndata: tick {n}\n\n".encode())
                    n += 1
            elif mode == "split":
                # one event split across two chunks with a pause inside it, then one more event
                delay = float(self.headers.get("x-upstream-split-delay") or 1.5)
                if self._client_gone(delay):
                    return
                self._chunk(b"data: first-half-")
                if self._client_gone(delay):
                    return
                self._chunk(b"second-half\n\n")
                self._chunk(b"data: after\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            elif mode == "big":
                # one 2 MB event in 64 KB chunks (the client checks it arrives unchanged), then one more
                payload = (b"0123456789abcdef" * 4096)[:65536]
                event = b"id: big\ndata: " + payload * 32 + b"\n\n"
                for i in range(0, len(event), 65536):
                    self._chunk(event[i:i + 65536])
                self._chunk(b"data: after-big\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
            elif mode == "flood":
                total = int(float(self.headers.get("x-upstream-flood-mb") or 16) * 1024 * 1024)
                n, sent = 0, 0
                while sent < total:
                    block = bytearray()
                    while len(block) < 1024 * 1024:
                        block += b"data: f%d\n\n" % n
                        n += 1
                    self._chunk(bytes(block))
                    sent += len(block)
                # A moment later one small event: it arrives as its own chunk, which the filter holds
                # again (a body over 64 KiB is let through unheld, see README "Floods").
                time.sleep(0.2)
                self._chunk(b"data: after-flood\n\n")
                while not self._client_gone(IDLE_WAIT_S):
                    pass
            elif mode == "reset":
                # half an event, then the connection is torn down without a terminating chunk
                self._chunk(b"data: tick 1\n\ndata: half-")
                time.sleep(0.3)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # close the fd itself (rfile/wfile keep the socket object alive): linger 0 = RST
                os.close(self.connection.detach())
                self.wfile = io.BytesIO()
                return
            elif mode == "burst":
                count = int(self.headers.get("x-upstream-burst") or 30)
                text = b"".join(b"data: burst %d\n\n" % n for n in range(1, count + 1))
                # pieces of 7..23 bytes: most chunks end inside an event; the last ends with it
                pos, size = 0, 7
                while pos < len(text):
                    self._chunk(text[pos:pos + size])
                    pos += size
                    size = 7 + (size * 5) % 17
                    time.sleep(0.003)
                while not self._client_gone(IDLE_WAIT_S):
                    pass
            elif mode == "silent":
                while not self._client_gone(IDLE_WAIT_S):
                    pass
            else:  # end
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
        except OSError:
            pass
        self.close_connection = True


_Server = QuietServer


class SseUpstream:
    def __init__(self, host="127.0.0.1", port=0, default_mode="end", interval=1.0, verbose=False, backlog=None):
        self.backlog = backlog  # listen backlog (default QuietServer's 1,024)
        self.host = host
        self.requested_port = port
        self.default_mode = default_mode
        self.interval = interval
        self.verbose = verbose
        self._lock = threading.Lock()
        self._requests = []
        self._httpd = None

    def start(self, accepting=True):
        """Listens and, unless `accepting` is False, accepts. Not accepting models a backend that
        is slow to accept (restarting, paused): its listen queue fills and the kernel drops the
        SYNs it has no room for, until accept_after()."""
        server = _Server if self.backlog is None else type("_Server", (_Server,), {"request_queue_size": self.backlog})
        self._httpd = server((self.host, self.requested_port), _Handler)
        self._httpd.owner = self
        self._accepting = threading.Event()
        if accepting:
            self._accepting.set()

        def serve():
            self._accepting.wait()
            self._httpd.serve_forever(poll_interval=0.1)
        threading.Thread(target=serve, daemon=True).start()
        return self

    def accept_after(self, seconds):
        """Starts accepting `seconds` from now."""
        timer = threading.Timer(seconds, self._accepting.set)
        timer.daemon = True
        timer.start()

    @property
    def port(self):
        return self._httpd.server_address[1]

    def stop(self):
        if self._httpd:
            self._accepting.set()  # shutdown() waits for serve_forever to run and end
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _record(self, req):
        with self._lock:
            self._requests.append(req)

    @property
    def requests(self):
        with self._lock:
            return list(self._requests)

    def requests_containing(self, needle: str):
        """Requests whose path or any header value contains `needle`."""
        return [r for r in self.requests if needle in r.path or any(needle in v for _, v in r.headers)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("UPSTREAM_PORT", "9002")))
    ap.add_argument("--mode", default="stream", choices=["end", "stream", "silent"], help="test-mode default")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    srv = SseUpstream(args.host, args.port, default_mode=args.mode, interval=args.interval,
                      verbose=args.verbose).start()
    print(f"sse upstream listening on http://{args.host}:{srv.port}/events/<topic>", flush=True)
    serve_until_signalled(srv)


if __name__ == "__main__":
    main()
