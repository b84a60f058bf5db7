"""The review page's HTTP side (Starlette): the page itself, and the small JSON API it uses.

Who may ask: with `web.token`, only requests carrying it (an `Authorization: Bearer` header,
or the cookie `GET /?token=...` sets); without one (a loopback address only, config.py
checks), only requests naming a loopback host (a web site whose name resolves to 127.0.0.1
-- DNS rebinding -- is refused). A POST must be JSON and, from a browser, from the page's
own origin (CSRF). Bodies, pages and thumbnails are bounded; paths are checked by paths.py.
"""

import hmac
import ipaddress
import json
import logging
import os
import threading
import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from daemon.data.images import BadImage, Unreadable
from daemon.web import paths
from daemon.web.index import SORTS
from daemon.web.paths import Refused

log = logging.getLogger("daemon.web")

STATIC = os.path.join(os.path.dirname(__file__), "static")
PAGE_FILES = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
MAX_BODY = 4096
MAX_LIMIT = 500
STATUS_SECONDS = 1.0  # /api/status is read from save/ at most this often
COOKIE = "wardrobe_token"
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self'; "
                                      "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY"}


class Review:
    """What the endpoints use: the index, the corrections, the thumbnails, the status."""

    def __init__(self, root, index, corrections, thumbs, status, token=None):
        self.root = root  # the inbox's real path
        self.index, self.corrections, self.thumbs = index, corrections, thumbs
        self._status = status  # () -> status --json's object
        self.token = token
        self._cached = (0.0, None)
        self._thumbs_at_once = threading.Semaphore(1)  # one core at most, never both

    def status(self, max_age=STATUS_SECONDS):
        made, result = self._cached
        if result is None or time.monotonic() - made > max_age:
            result = self._status()
            counts, errors = self.index.counts()
            result["review"] = {"listed": len(self.index), "by_label": counts,
                                "errors": errors, "changes": self.index.changes,
                                "trains": self.corrections.data_path is not None}
            self._cached = (time.monotonic(), result)
        return result


def app(review):
    async def page(request):
        if review.token and "token" in request.query_params:  # log in: then a clean URL
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, request.query_params["token"], httponly=True,
                                samesite="strict", secure=request.url.scheme == "https")
            return response
        return FileResponse(os.path.join(STATIC, PAGE_FILES[request.url.path]))

    def status(request):
        return JSONResponse(review.status())

    def images(request):
        query = request.query_params
        sort = query.get("sort", "confidence")
        if sort not in SORTS:
            raise Refused(400, f"sort: one of {', '.join(SORTS)}")
        offset, limit = _number(query, "offset", 0, 10**9), _number(query, "limit", 60, MAX_LIMIT)
        label = query.get("class") or None
        total, rows = review.index.page(sort, label, offset, limit)
        gone = [path for path, _ in rows if not os.path.lexists(os.path.join(review.root, path))]
        for path in gone:  # removed with its folder, say: no event told the index
            review.index.gone(os.path.join(review.root, path))
        rows = [row for row in rows if row[0] not in gone]
        return JSONResponse({"total": total, "offset": offset, "changes": review.index.changes,
                             "images": [_row(path, entry) for path, entry in rows]})

    def listed(relative):
        """The absolute path of a listed image (one with a sidecar of ours), else Refused."""
        path = paths.image(review.root, relative)
        if review.index.get(relative) is None:
            raise Refused(404, "path: not an image the daemon has labelled")
        return path

    def thumb(request):
        relative = request.query_params.get("path")
        path = listed(relative)
        with review._thumbs_at_once:
            try:
                data = review.thumbs.get(path, relative)
            except (BadImage, Unreadable) as error:
                raise Refused(422, f"no thumbnail: {error}") from None
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400"})

    async def label(request):
        body = await _json(request)
        path = listed(body.get("path"))
        name = paths.class_name(body.get("label"))
        return JSONResponse(_record(await _threaded(review.corrections.label, path, name)))

    async def undo(request):
        body = await _json(request)
        path = listed(body.get("path"))
        return JSONResponse(_record(await _threaded(review.corrections.undo, path)))

    routes = [Route(path, page) for path in PAGE_FILES] + [
        Route("/api/status", status), Route("/api/images", images),
        Route("/api/thumb", thumb), Route("/api/label", label, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(Guard, review=review)],
                     exception_handlers={Refused: _refused})


class Guard(BaseHTTPMiddleware):
    """Who may ask what (the module's docstring), and the headers every answer carries."""

    def __init__(self, app, review):
        super().__init__(app)
        self.review = review

    async def dispatch(self, request, call_next):
        started = time.perf_counter()
        refusal = self.refusal(request)
        if refusal is not None:
            response = JSONResponse({"error": refusal[1]}, status_code=refusal[0])
        else:
            response = await call_next(request)
        response.headers.update(HEADERS)
        # the server's own time, for the browser's tools and bench/web.py
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - started):.2f}"
        if request.url.path.startswith("/api/") and request.url.path != "/api/thumb":
            response.headers["Cache-Control"] = "no-store"
        return response

    def refusal(self, request):
        """(status, why) or None."""
        token = self.review.token
        host = request.headers.get("host", "")
        if token is None:
            name = (host.rsplit(":", 1)[0] if not host.endswith("]") else host).strip("[]")
            if not _loopback_name(name.lower()):
                return 403, "this page answers to localhost only (set web.token to serve it " \
                            "under another name)"
        else:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else ""
            given = given or request.cookies.get(COOKIE, "")
            if request.url.path == "/" and "token" in request.query_params:
                given = request.query_params["token"]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return 401, "a token is needed: open the page as /?token=... (web.token)"
        if request.method == "POST":
            if request.headers.get("content-type", "").split(";")[0].strip() != \
                    "application/json":
                return 415, "a POST takes application/json"
            origin = request.headers.get("origin")
            if (origin is not None and origin != f"{request.url.scheme}://{host}") or \
                    request.headers.get("sec-fetch-site", "same-origin") not in (
                        "same-origin", "none"):
                return 403, "a POST from another site's page is refused"
        return None


def _loopback_name(name):
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _number(query, key, default, most):
    try:
        value = int(query.get(key, default))
    except ValueError:
        raise Refused(400, f"{key}: expected a whole number") from None
    if not 0 <= value <= most:
        raise Refused(400, f"{key}: expected 0 to {most}")
    return value


async def _json(request):
    """The request's JSON object, read no further than MAX_BODY bytes."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise Refused(413, f"a request body is at most {MAX_BODY} bytes")
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise Refused(413, f"a request body is at most {MAX_BODY} bytes")
    except ClientDisconnect:  # gone before its body came (server.py's deadline)
        raise Refused(400, "the request's body never came") from None
    try:
        value = json.loads(body)
    except ValueError:
        raise Refused(400, "expected a JSON object") from None
    if not isinstance(value, dict):
        raise Refused(400, "expected a JSON object")
    return value


async def _threaded(function, *args):
    return await run_in_threadpool(function, *args)


def _row(path, entry):
    label, confidence, source, when, error = entry
    return {"path": path, "label": label, "confidence": confidence, "source": source,
            "time": when, "error": error}


def _record(record):
    """What a POST answers: the sidecar now, without the file's stat."""
    if record is None:
        return {"label": None, "source": None}
    return {key: value for key, value in record.items() if key not in ("file", "previous")}


async def _refused(request, error):
    """A request refused -- or, 202, taken but not finished yet (a full disk)."""
    return JSONResponse({"pending" if error.status < 300 else "error": str(error)},
                        status_code=error.status, headers=HEADERS)
