"""The review page's server: uvicorn in a thread of its own, on a socket bound at start (a
port that cannot be had ends the start, as metrics.listen's does)."""

import logging
import socket
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.errors import WardrobeError
from daemon.service.addresses import show_listen

log = logging.getLogger("daemon.web")

REQUEST_SECONDS = 15  # a connection's request, from its first byte awaited to its answer
CONNECTIONS = 256  # at once; beyond, 503 (each is a file descriptor of the daemon's)


class Deadline(H11Protocol):
    """uvicorn's HTTP/1.1 with a deadline per request: a client that connects and sends
    nothing, or half a request, is dropped after REQUEST_SECONDS (uvicorn waits forever,
    and a few dozen such connections would take the page from everyone)."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = self.loop.call_later(REQUEST_SECONDS, self._too_slow)

    def on_response_complete(self):
        super().on_response_complete()
        self._deadline.cancel()  # the next request on this connection: its own time
        self._deadline = self.loop.call_later(REQUEST_SECONDS + self.timeout_keep_alive,
                                              self._too_slow)

    def connection_lost(self, exc):
        self._deadline.cancel()
        super().connection_lost(exc)

    def _too_slow(self):
        if not self.transport.is_closing():
            self.transport.close()


class WebServer:
    def __init__(self, app, listen):
        self.listen = listen
        host, port = listen
        try:
            family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
            # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only
            # on connections whose socket says TCP; with it on, every answer on a kept-alive
            # connection (headers and body written apart) waited ~40 ms for a delayed ACK
            self._socket = socket.socket(family, kind, proto)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(128)
        except OSError as error:
            raise WardrobeError(f"web.listen: cannot serve the review page on "
                                f"{show_listen(listen)}: {error.strerror or error}") from None
        # No access log: a URL may carry the token (/?token=...), which is never logged.
        # log_config None: uvicorn's records go through the daemon's handler, not its own.
        self._server = uvicorn.Server(uvicorn.Config(
            app, http=Deadline, log_config=None, log_level="warning", access_log=False,
            lifespan="off", server_header=False, limit_concurrency=CONNECTIONS,
            timeout_keep_alive=5, timeout_graceful_shutdown=2,
            h11_max_incomplete_event_size=16 * 1024))
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)

    def start(self):
        self._thread.start()
        log.info("serving the review page at http://%s/", show_listen(self.listen))

    def _serve(self):
        try:
            self._server.run(sockets=[self._socket])
        except BaseException:  # uvicorn exits the thread with SystemExit on a failed start
            log.exception("the review page's server stopped")

    def stop(self):
        self._server.should_exit = True

    def join(self, timeout=None):
        self._thread.join(timeout)
        self._socket.close()
