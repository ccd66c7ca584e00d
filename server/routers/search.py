"""``POST /v1/search``: find a query person in the gallery."""

from typing import Annotated

from fastapi import APIRouter, Depends, Form

from server.dependencies import (
    SearchServiceDep,
    TimelineDep,
    api_key_scheme,
    require_multipart,
)
from server.schemas import SearchForm, SearchResponse, error_responses
from server.uploads import read_upload

router = APIRouter(
    prefix="/v1",
    tags=["search"],
    dependencies=[Depends(api_key_scheme)],
    responses=error_responses(401, 403, 409, 503),
)


@router.post(
    "/search",
    dependencies=[Depends(require_multipart)],
    responses=error_responses(400, 413, 415, 422),
)
async def search(
    form: Annotated[SearchForm, Form(media_type="multipart/form-data")],
    service: SearchServiceDep,
    timeline: TimelineDep,
) -> SearchResponse:
    """Embed the query person (a crop, or `box` in a scene) and return the most similar gallery
    persons, best first, with the box embedded and where the time went (also in the
    `Server-Timing` header, step by step)."""
    return await service.search(await read_upload(form.image), form, timeline)
