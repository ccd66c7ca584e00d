"""The FastAPI app: ``create_app(settings)``.

On startup the app answers at once (``/healthz``), and loads the model and the gallery in a
background thread; ``/readyz`` and the API answer 503 until they are loaded. Loading failures
are kept and reported: 409 when the gallery belongs to another model, 503 otherwise.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server.errors import NotReady, ServiceError, install_error_handlers
from server.inference import EngineLoader, load_runtime_engine
from server.limits import BodySizeLimitMiddleware
from server.metrics import RequestMetricsMiddleware, ServiceMetrics
from server.routers import gallery, health, jobs, metrics, search, ui
from server.services import (
    ServiceState,
    load_engine_and_gallery,
    start_services,
    stop_services,
)
from server.settings import ServerSettings, load_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """Person search: find a query person in a gallery of scene images.

Upload a query (a person crop, or a scene image with a box) to `POST /v1/search`; add scene
images with `POST /v1/gallery/images`. Errors are `{"error": {"code", "message"}}`."""


def create_app(
    settings: ServerSettings | None = None, load_engine: EngineLoader | None = None
) -> FastAPI:
    """The service app. ``settings`` default to :func:`~server.settings.load_settings` (the
    environment); ``load_engine(settings) -> Engine`` to ``export.runtime.load_engine`` on the
    configured model."""
    settings = settings if settings is not None else load_settings()
    app = FastAPI(
        title="psearch",
        summary="Person search API",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.load_engine = load_engine or load_runtime_engine
    app.state.metrics = ServiceMetrics()
    app.state.service_state = ServiceState(settings.retry_after_s)
    install_error_handlers(app)
    # The last added is the outermost: metrics see every answer, the size limit's included.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    routers = (search.router, gallery.router, jobs.router, health.router, metrics.router, ui.router)
    for router in routers:
        app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    loading = asyncio.create_task(_load(app), name="load-services")
    try:
        yield
    finally:
        await _shut_down(app, loading)


async def _load(app: FastAPI) -> None:
    """Load the engine and the gallery off the event loop, then start the services (the job
    runner among them: unfinished jobs resume as soon as the service is ready)."""
    settings: ServerSettings = app.state.settings
    state: ServiceState = app.state.service_state
    try:
        engine, gallery = await run_in_threadpool(
            load_engine_and_gallery, settings, app.state.load_engine
        )
    except ServiceError as error:
        logger.error("not ready: %s", error.message)
        state.fail(error)
        return
    except Exception as error:
        logger.exception("loading the model or the gallery failed")
        state.fail(NotReady(f"loading the model or the gallery failed: {error}"))
        return
    try:
        state.services = await start_services(settings, engine, gallery, app.state.metrics)
    except Exception as error:
        logger.exception("starting the services failed")
        await run_in_threadpool(gallery.close)
        state.fail(NotReady(f"starting the services failed: {error}"))
        return
    app.state.metrics.ready.set(1)
    logger.info(
        "ready: model %s (%s on %s), gallery %s",
        engine.info.name,
        engine.info.backend,
        engine.info.device,
        settings.gallery_dir,
    )


async def _shut_down(app: FastAPI, loading: "asyncio.Task[None]") -> None:
    """Let a running load finish (a thread cannot be interrupted), then stop the services: the
    jobs after their current batch, then the batcher, then the gallery, which writes its index
    snapshot."""
    await loading
    state: ServiceState = app.state.service_state
    services = state.services
    if services is None:
        return
    state.services = None
    app.state.metrics.ready.set(0)
    await stop_services(services)
