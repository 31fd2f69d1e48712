"""A scripted SSE upstream: raw sockets on 127.0.0.1, byte-exact chunks (e2e/test_trust_fourth_run.py).

A test registers a script under a name and sends the request header `x-script: <name>`. A script
is a list of steps:
    ("send", bytes)    one write (one HTTP/1.1 chunk when chunked)
    ("sleep", secs)    pause (ends early when the client went away)
    ("end",)           the terminating chunk (chunked) and close
    ("hold", secs)     stay silent until the client goes away, at most `secs`
The response head: 200, text/event-stream, chunked unless the script's `content_length` is set.
Threads are daemons; `stop()` closes the listening socket and every connection it accepted.
"""
import select
import socket
import threading
import time


class ScriptedUpstream:
    def __init__(self):
        self.scripts = {}  # name -> (steps, content_length or None)
        self.requests = []  # (time, request head text)
        self._lock = threading.Lock()
        self._conns = []
        self._sock = None
        self._stopped = False

    def script(self, name, steps, content_length=None):
        with self._lock:
            self.scripts[name] = (list(steps), content_length)

    def start(self):
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def port(self):
        return self._sock.getsockname()[1]

    def stop(self):
        self._stopped = True
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self):
        while not self._stopped:
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _gone(c, wait):
        """Waits up to `wait` s; True when the peer closed."""
        try:
            p = select.poll()
            p.register(c, select.POLLIN | select.POLLERR | select.POLLHUP)
            ev = p.poll(max(0.0, wait) * 1000)
            if any(e & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, e in ev):
                return True
            if ev:
                if c.recv(1, socket.MSG_PEEK) == b"":
                    return True
                time.sleep(wait)
        except OSError:
            return True
        return False

    def _serve(self, c):
        try:
            c.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                d = c.recv(4096)
                if not d:
                    return
                head += d
            text = head.decode("latin-1")
            with self._lock:
                self.requests.append((time.time(), text))
            name = None
            for line in text.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "x-script":
                    name = v.strip()
            with self._lock:
                steps, clen = self.scripts.get(name, ([("send", b"data: none\n\n"), ("end",)], None))
            chunked = clen is None
            resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            resp += b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % clen
            c.sendall(resp + b"\r\n")
            for step in steps:
                kind = step[0]
                if kind == "send":
                    data = step[1]
                    c.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                elif kind == "sleep":
                    if self._gone(c, step[1]):
                        return
                elif kind == "hold":
                    deadline = time.monotonic() + step[1]
                    while time.monotonic() < deadline and not self._stopped:
                        if self._gone(c, 0.2):
                            return
                    return
                elif kind == "end":
                    if chunked:
                        c.sendall(b"0\r\n\r\n")
                    return
        except OSError:
            return
        finally:
            try:
                c.close()
            except OSError:
                pass
