"""The request body size limit, answered in the service's JSON error shape.

FastAPI's own ``max_body_size`` answers a too-large Content-Length with Starlette's plain-text
413, whatever the app would have said; this middleware answers JSON, and counts the bytes of
chunked bodies (which declare no length) as they stream in.
"""

from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import TooLarge, error_response


class BodySizeLimitMiddleware:
    """413 for request bodies over ``max_bytes``: at once when Content-Length says so, without
    reading the body; otherwise as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            message = f"the request body is {declared} bytes; the limit is {self.max_bytes}"
            response = error_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, TooLarge.code, message)
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI passes it on from body parsing (it would turn
                    # any other error into a 400), and the app's handler answers it in JSON.
                    raise HTTPException(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the request body is over the limit of {self.max_bytes} bytes",
                    )
            return message

        await self.app(scope, receive_within_limit, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
