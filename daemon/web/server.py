"""The review page's server: uvicorn in a thread of its own, on a socket bound at start (a
port that cannot be had ends the start, as metrics.listen's does)."""

import logging
import socket
import threading

import uvicorn

from daemon.errors import WardrobeError
from daemon.service.config import show_listen

log = logging.getLogger("daemon.web")


class WebServer:
    def __init__(self, app, listen):
        self.listen = listen
        host, port = listen
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._socket = socket.socket(family, socket.SOCK_STREAM)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(128)
        except OSError as error:
            raise WardrobeError(f"web.listen: cannot serve the review page on "
                                f"{show_listen(listen)}: {error.strerror or error}") from None
        # No access log: a URL may carry the token (/?token=...), which is never logged.
        self._server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", server_header=False,
            limit_concurrency=64, timeout_keep_alive=5, timeout_graceful_shutdown=2,
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
