"""The auth service's HTTP error rendering: every `AuthError`, FastAPI's own validation errors,
HTTP exceptions and anything unexpected become RFC 9457 problem+json, so clients only ever see
problem documents. Also the body-size limit (413 after draining what was sent)."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.auth.errors import PROBLEM_TYPE_BASE, AuthError
from shared.logging import get_logger

PROBLEM_CONTENT_TYPE = "application/problem+json"

log = get_logger(__name__)


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


async def _auth_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthError)
    return problem(exc.status, exc.slug, exc.title, exc.detail, instance=request.url.path, headers=exc.headers,
                   **exc.extensions)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only where and why: never `input`/`ctx`, which would echo what was sent (maybe a code).
    errors = [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()[:20]
    ]
    return problem(
        422, "invalid-request", "Invalid request", "The request body or parameters are not valid.",
        instance=request.url.path, errors=errors,
    )


class PayloadTooLarge(StarletteHTTPException):
    """Raised while a body is read (so FastAPI passes it through untouched); rendered as a problem."""

    def __init__(self, limit: int, *, drained: bool = True) -> None:
        self.limit = limit
        super().__init__(
            413, f"The request body is larger than {limit} bytes.", headers=None if drained else {"Connection": "close"}
        )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 413:
        detail = exc.detail if isinstance(exc, PayloadTooLarge) else "The request body is too large."
        return problem(413, "payload-too-large", "Payload too large", detail, instance=request.url.path,
                       headers=dict(exc.headers or {}))
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to a body that is not even text (e.g. not UTF-8): the same problem as
        # any other body that is not valid JSON.
        return problem(422, "invalid-request", "Invalid request", "The request body is not valid JSON.",
                       instance=request.url.path, errors=[])
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "Error"
    slug = phrase.lower().replace(" ", "-").replace("'", "")
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase + "."
    return problem(exc.status_code, slug, phrase, detail, instance=request.url.path, headers=dict(exc.headers or {}))


class CatchAllMiddleware:
    """A bug becomes a 500 problem without internals (and one log line), not a stack trace
    on the wire; Starlette's own last-resort handler would re-raise into the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("unhandled error", error_type=type(exc).__name__, path=scope.get("path"), exc_info=True)
            if started:
                raise
            response = problem(500, "internal", "Internal error", "The request could not be completed.",
                               instance=scope.get("path"))
            await response(scope, receive, send)


# A refused body is still read (and dropped) up to these bounds before the 413 goes out: a server
# that answers and closes while the client is still sending makes the kernel reset the
# connection, and the client then sees a broken connection instead of the 413.
DRAIN_MAX_BYTES = 8 << 20
DRAIN_MAX_SECONDS = 5.0


async def drain(receive: Receive, *, max_bytes: int = DRAIN_MAX_BYTES, max_seconds: float = DRAIN_MAX_SECONDS) -> bool:
    """Read and drop the rest of a request body. True when it ended within the bounds (the
    connection can carry on); False when the client went away, sent too much or too slowly."""
    read = 0
    try:
        async with asyncio.timeout(max_seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return False  # http.disconnect
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
                if read > max_bytes:
                    return False
    except TimeoutError:
        return False


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes with a 413 problem: at once when Content-Length says so,
    else as soon as the streamed body passes the limit (chunked uploads).

    Either way the rest of the body is drained first (bounded: `drain`), so the client reads
    the 413 rather than a connection reset. A client that sent `Expect: 100-continue` has not
    sent its body yet: it gets the 413 at once (and no `100 Continue`)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self, scope: Scope, *, drained: bool) -> JSONResponse:
        return problem(
            413, "payload-too-large", "Payload too large",
            f"The request body is larger than {self.limit} bytes.", instance=scope.get("path"),
            headers=None if drained else {"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            drained = False if _expects_continue(scope) else await drain(receive)
            log.info("request body refused", path=scope.get("path"), declared_bytes=declared, limit=self.limit,
                     drained=drained)
            await self._too_large(scope, drained=drained)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    drained = not message.get("more_body", False) or await drain(receive)
                    log.info("request body refused", path=scope.get("path"), read_bytes=seen, limit=self.limit,
                             drained=drained)
                    raise PayloadTooLarge(self.limit, drained=drained)
            return message

        await self.app(scope, limited_receive, send)


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AuthError, _auth_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(CatchAllMiddleware)
