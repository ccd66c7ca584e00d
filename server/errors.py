"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

The service raises :class:`ServiceError` subclasses; FastAPI's own errors (request validation,
unknown routes, wrong methods, bodies over the size limit, unparsable bodies) are translated
into the same shape by the handlers :func:`install_error_handlers` registers.
"""

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ServiceError(Exception):
    """An error answered with ``status_code`` and a JSON body ``{"error": {code, message}}``."""

    status_code = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadImage(ServiceError):
    """The upload is empty or is not a decodable image."""

    status_code = HTTPStatus.BAD_REQUEST
    code = "bad_image"


class TooLarge(ServiceError):
    """The body or an image (bytes, pixels) is over the configured limits."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too_large"


class UnsupportedMediaType(ServiceError):
    """The request or an upload is of a media type the service does not read."""

    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class InvalidField(ServiceError):
    """A field is well-formed but its value is not acceptable (a box outside the image)."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_field"


class NoPersonDetected(InvalidField):
    """The query image is fine, but the detector finds nobody in it to embed."""

    code = "no_person_detected"


class Unauthenticated(ServiceError):
    """No API key was given where one is required."""

    status_code = HTTPStatus.UNAUTHORIZED
    code = "unauthenticated"


class Forbidden(ServiceError):
    """The API key given is not one of the configured keys."""

    status_code = HTTPStatus.FORBIDDEN
    code = "forbidden"


class PathNotAllowed(ServiceError):
    """A path of a job request resolves outside the allowed roots (or none are configured)."""

    status_code = HTTPStatus.FORBIDDEN
    code = "path_not_allowed"


class NotFound(ServiceError):
    """No such image (or route)."""

    status_code = HTTPStatus.NOT_FOUND
    code = "not_found"


class ModelMismatch(ServiceError):
    """The gallery was built with another model than the one loaded."""

    status_code = HTTPStatus.CONFLICT
    code = "model_mismatch"


class JobNameTaken(ServiceError):
    """A job of the requested name exists already."""

    status_code = HTTPStatus.CONFLICT
    code = "job_name_taken"


class JobFinished(ServiceError):
    """The job asked to be cancelled has finished already."""

    status_code = HTTPStatus.CONFLICT
    code = "job_finished"


class Overloaded(ServiceError):
    """The inference queue is full; the client should retry after ``Retry-After`` seconds."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class NotReady(ServiceError):
    """The model or the gallery is not loaded (yet, or it failed to load)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "not_ready"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
        super().__init__(message, headers)


# Codes of the errors FastAPI and Starlette raise themselves, by status.
_HTTP_CODES = {
    HTTPStatus.BAD_REQUEST: "bad_request",
    HTTPStatus.UNAUTHORIZED: Unauthenticated.code,
    HTTPStatus.FORBIDDEN: Forbidden.code,
    HTTPStatus.NOT_FOUND: NotFound.code,
    HTTPStatus.METHOD_NOT_ALLOWED: "method_not_allowed",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: TooLarge.code,
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: UnsupportedMediaType.code,
    HTTPStatus.UNPROCESSABLE_ENTITY: InvalidField.code,
}


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error answer."""
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """FastAPI's validation errors as one readable line: ``top_k: Input should be ...; ...``."""
    parts = []
    for error in errors:
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        # The first element says where ("body", "query", "path"); the rest is the field.
        field = ".".join(str(part) for part in error.get("loc", ())[1:])
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    return error_response(error.status_code, error.code, error.message, error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    message = describe_validation_errors(list(error.errors()))
    return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, InvalidField.code, message)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    status = HTTPStatus(error.status_code)
    code = _HTTP_CODES.get(status, status.phrase.lower().replace(" ", "_"))
    message = error.detail if isinstance(error.detail, str) else status.phrase
    if status == HTTPStatus.NOT_FOUND and message == status.phrase:
        message = f"no route {request.method} {request.url.path}"
    if status == HTTPStatus.METHOD_NOT_ALLOWED and message == status.phrase:
        allowed = (error.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    return error_response(status, code, message, error.headers)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises the error after this answer, and the server logs it with its traceback.
    return error_response(
        HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error (see the server log)"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the one JSON shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
