"""The plain HTTP side of websocketd: its static files and the error
responses of requests that do not become a WebSocket.

Responses are websockets' own `Response` objects (sent through the
protocol's send_response, which closes the connection after them), so no
HTTP is formatted by hand here.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import http
import importlib.resources
from typing import Dict, Optional, Tuple

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

#: URL path -> (file in this package's static/ directory, Content-Type).
STATIC_FILES: Dict[str, Tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/pyipc.js": ("pyipc.js", "text/javascript; charset=utf-8"),
    "/chat.html": ("chat.html", "text/html; charset=utf-8"),
}


@functools.lru_cache(maxsize=None)
def static_body(filename: str) -> bytes:
    """A static file's bytes (read once)."""
    return importlib.resources.files(__package__).joinpath("static").joinpath(filename).read_bytes()


def is_upgrade(request: Request) -> bool:
    """Whether the request asks for a WebSocket (Upgrade: websocket)."""
    upgrade = request.headers.get_all("Upgrade")
    return any("websocket" in value.lower() for value in upgrade)


def malformed(request: Request) -> Optional[Response]:
    """The 400 of a request no answer can be given to, else None: a target
    that is not a path (only "/NAME" names a service: "GET echo" reached
    echo as if it were "/echo"), or no Host header (RFC 9112 3.2, RFC 6455
    4.2.1: it was upgraded)."""
    if not request.path.startswith("/"):
        return error(http.HTTPStatus.BAD_REQUEST,
                     f"the request target {request.path!r} is not a path starting with /")
    if "Host" not in request.headers:
        return error(http.HTTPStatus.BAD_REQUEST, "no Host header")
    return None


def for_method(response: Response, method: str) -> Response:
    """`response` as sent to a request of `method`: to a HEAD without its
    body (RFC 9110 9.3.2), its headers as they are."""
    return dataclasses.replace(response, body=b"") if method == "HEAD" else response


def static_response(request: Request) -> Optional[Response]:
    """The response to a GET (or HEAD) of one of the static files, else None."""
    entry = STATIC_FILES.get(request.path.split("?", 1)[0])
    if entry is None or is_upgrade(request):
        return None
    if request.method not in ("GET", "HEAD"):
        response = error(http.HTTPStatus.METHOD_NOT_ALLOWED,
                         f"{request.method} is not allowed here: use GET")
        response.headers["Allow"] = "GET, HEAD"
        return response
    filename, content_type = entry
    body = static_body(filename)
    headers = _headers(content_type, len(body))
    headers["Cache-Control"] = "no-cache"
    return for_method(Response(200, "OK", headers, body), request.method)


def error(status: http.HTTPStatus, text: str) -> Response:
    """A plain-text error response saying what went wrong (the connection is
    closed after it)."""
    body = f"{status.value} {status.phrase}: {text}\n".encode()
    return Response(status.value, status.phrase,
                    _headers("text/plain; charset=utf-8", len(body)), body)


def _headers(content_type: str, length: int) -> Headers:
    headers = Headers()
    headers["Date"] = email.utils.formatdate(usegmt=True)
    headers["Server"] = "pyipc-websocketd"
    headers["Connection"] = "close"
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(length)
    return headers
