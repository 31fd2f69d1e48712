"""What the test and demo servers share: a threading HTTP server fit for herds of connections."""
import sys
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
