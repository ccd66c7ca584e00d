"""API keys, checked before a request's body is read.

Every operation under ``/v1/`` needs one of the configured keys in the ``X-API-Key`` header
(none configured: no authentication); health, metrics and the web page do not. The check is an
ASGI middleware, not a FastAPI dependency: FastAPI reads and parses a request's body (a
multipart upload, spooled to disk) before it runs the dependencies, so a dependency would
answer a 30 MB unauthenticated upload with 401 only after reading all of it. The middleware
answers from the headers alone; the body is never read.

The routers still declare the key (:data:`API_KEY_SCHEME` through
``server.dependencies.api_key_scheme``) so that the OpenAPI document shows it, and a test holds
the two to the same operations.
"""

import secrets
from collections.abc import Sequence
from http import HTTPStatus

from fastapi.security import APIKeyHeader
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import Forbidden, ServiceError, Unauthenticated, error_response

API_KEY_HEADER = "X-API-Key"
PROTECTED_PREFIX = "/v1/"

API_KEY_SCHEME = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,  # the middleware answers a missing key, in the service's error shape
    description="One of the keys the service was configured with (when it has any).",
)


def check_api_key(given: str | None, keys: Sequence[SecretStr]) -> None:
    """Nothing when ``keys`` is empty or ``given`` is one of them; else :class:`Unauthenticated`
    (no key) or :class:`Forbidden` (a wrong one)."""
    if not keys:
        return
    if not given:
        raise Unauthenticated(f"an API key is required in the {API_KEY_HEADER} header")
    candidate = given.encode()
    # Compare with every key in constant time: timing must not tell how much of a key matched.
    matches = [secrets.compare_digest(candidate, key.get_secret_value().encode()) for key in keys]
    if not any(matches):
        raise Forbidden(f"the API key in the {API_KEY_HEADER} header is not valid")


class ApiKeyMiddleware:
    """401 or 403 for a ``/v1/`` request without a valid key, before its body is read."""

    def __init__(self, app: ASGIApp, keys: Sequence[SecretStr]) -> None:
        self.app = app
        self.keys = tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.keys
            and _route_path(scope).startswith(PROTECTED_PREFIX)
        ):
            try:
                check_api_key(Headers(scope=scope).get(API_KEY_HEADER), self.keys)
            except ServiceError as error:
                response = error_response(HTTPStatus(error.status_code), error.code, error.message)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app routes on: without the ``root_path`` a proxy mounts it under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
