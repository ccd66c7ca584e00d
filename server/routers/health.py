"""``/healthz`` (the process answers) and ``/readyz`` (model and gallery loaded)."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.dependencies import StateDep
from server.schemas import HealthOut, ReadyOut, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> HealthOut:
    """Alive: the process answers requests (it may still be loading)."""
    return HealthOut(status="ok")


@router.get("/readyz", responses=error_responses(409, 503))
async def readyz(state: StateDep) -> ReadyOut:
    """Ready: the model and the gallery are loaded. 503 while loading; 409 or 503 when loading
    failed (the message says why)."""
    services = state.require()
    gallery = await run_in_threadpool(services.gallery_service.stats)
    return ReadyOut(
        status="ready",
        model=services.model,
        min_detection_score=services.min_detection_score,
        gallery=gallery,
    )
