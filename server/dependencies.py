"""FastAPI dependencies: the loaded services, the API key scheme, request media types.

They are ``async``: none blocks, and FastAPI would run plain functions in the thread pool."""

from typing import Annotated

from fastapi import Depends, Request, Security

from server.auth import API_KEY_SCHEME
from server.errors import UnsupportedMediaType
from server.jobs import JobService
from server.lifecycle import ServiceState
from server.services import GalleryService, SearchService
from server.timing import STATE_KEY, Timeline


async def get_state(request: Request) -> ServiceState:
    """The app's loading state (services, or why there are none)."""
    return request.app.state.service_state


async def get_timeline(request: Request) -> Timeline:
    """The request's timeline (``server/timing.py``); a new one where no middleware opened it."""
    timeline = getattr(request.state, STATE_KEY, None)
    return timeline if isinstance(timeline, Timeline) else Timeline()


StateDep = Annotated[ServiceState, Depends(get_state)]
TimelineDep = Annotated[Timeline, Depends(get_timeline)]


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


async def api_key_scheme(api_key: Annotated[str | None, Security(API_KEY_SCHEME)]) -> None:
    """Declares the ``X-API-Key`` scheme of an operation in the OpenAPI document. The key is
    checked before the body is read, by ``server.auth.ApiKeyMiddleware`` (a dependency runs
    only after FastAPI has read the body)."""


async def require_multipart(request: Request) -> None:
    """415 unless the request body is ``multipart/form-data`` (uploads carry files)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"the request must be multipart/form-data (it carries images), got "
            f"{media_type or 'no content type'!r}"
        )
