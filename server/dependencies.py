"""FastAPI dependencies: settings, the loaded services, API keys, request media types.

They are ``async``: none blocks, and FastAPI would run plain functions in the thread pool."""

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from server.errors import Forbidden, Unauthenticated, UnsupportedMediaType
from server.jobs import JobService
from server.lifecycle import ServiceState
from server.services import GalleryService, SearchService
from server.settings import ServerSettings

API_KEY_HEADER = "X-API-Key"

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,  # we answer a missing key ourselves, in the service's error shape
    description="One of the keys the service was configured with (when it has any).",
)


async def get_settings(request: Request) -> ServerSettings:
    """The app's settings."""
    return request.app.state.settings


async def get_state(request: Request) -> ServiceState:
    """The app's loading state (services, or why there are none)."""
    return request.app.state.service_state


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_search_service(state: StateDep) -> SearchService:
    """The search service; 503 while loading, 409 or 503 if loading failed."""
    return state.require().search


async def get_gallery_service(state: StateDep) -> GalleryService:
    """The gallery service; 503 while loading, 409 or 503 if loading failed."""
    return state.require().gallery_service


async def get_job_service(state: StateDep) -> JobService:
    """The job service; 503 while loading, 409 or 503 if loading failed."""
    return state.require().jobs


SearchServiceDep = Annotated[SearchService, Depends(get_search_service)]
GalleryServiceDep = Annotated[GalleryService, Depends(get_gallery_service)]
JobServiceDep = Annotated[JobService, Depends(get_job_service)]


async def require_api_key(
    settings: SettingsDep, api_key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    """401 without a key, 403 with a wrong one; nothing to check when no keys are configured."""
    if not settings.api_keys:
        return
    if not api_key:
        raise Unauthenticated(f"an API key is required in the {API_KEY_HEADER} header")
    given = api_key.encode()
    # Compare with every key in constant time: timing must not tell how much of a key matched.
    keys = [key.get_secret_value().encode() for key in settings.api_keys]
    if not any([secrets.compare_digest(given, key) for key in keys]):
        raise Forbidden(f"the API key in the {API_KEY_HEADER} header is not valid")


async def require_multipart(request: Request) -> None:
    """415 unless the request body is ``multipart/form-data`` (uploads carry files)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"the request must be multipart/form-data (it carries images), got "
            f"{media_type or 'no content type'!r}"
        )
