"""What the test and demo servers share: a threading HTTP server fit for herds of connections,
the preamble of an event-stream response, and running until SIGTERM or SIGINT."""
import signal
import sys
import threading
from http.server import ThreadingHTTPServer


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: herds of connections must not be refused
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # a peer (Envoy, a test client) resetting a connection is normal here: stay quiet
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def start_event_stream(handler):
    """Sends the headers of a chunked `200 text/event-stream` response. `False` for HEAD (then the
    response is complete and the connection closes)."""
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("cache-control", "no-cache")
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    if handler.command == "HEAD":
        handler.close_connection = True
        return False
    return True


def serve_until_signalled(server):
    """Blocks until SIGTERM or SIGINT, then stops `server` (anything with a `stop()`)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop()
