"""The service's life: loading the model and the gallery, starting the services, stopping them.

::

    startup ─▶ the app answers at once (/healthz); a background task loads the engine and the
               gallery off the event loop, warms the engine up, then starts the services:
               the micro-batcher on the engine, the search and gallery services, the job
               runner (which resumes unfinished jobs)
    ready   ─▶ /readyz and the API answer; until then 503, or, when loading failed for good,
               the reason (409 for a gallery of another model, 503 otherwise)
    shutdown ─▶ a running load finishes first (a thread cannot be interrupted); then the job
               runner stops after its current batch, then the batcher, then the gallery, which
               writes its index snapshot

:func:`lifespan` is the app's lifespan; :class:`ServiceState` is what the dependencies ask for
the services.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from export.runtime import Engine, load_engine
from indexer.store import Gallery, open_gallery_for
from indexer.types import GalleryMismatch, GalleryNotFound, min_score_for
from server.batcher import MicroBatcher
from server.errors import ModelMismatch, NotReady, ServiceError
from server.jobs import JobService
from server.metrics import ServiceMetrics
from server.roots import AllowedRoots
from server.schemas import ModelOut
from server.services import GalleryService, SearchService
from server.settings import ServerSettings
from server.worker import InferenceTask, InferenceWorker

logger = logging.getLogger(__name__)

EngineLoader = Callable[[ServerSettings], Engine]


def load_runtime_engine(settings: ServerSettings) -> Engine:
    """``export.runtime.load_engine`` on the configured model, backend and device, with one
    forward pass per batcher batch."""
    return load_engine(
        settings.model_dir,
        settings.backend,
        settings.device,
        batch_size=settings.max_batch_size,
        threads=settings.threads,
    )


def warm_up(engine: Engine) -> None:
    """One small forward pass: backends initialise lazily, and the first request should not
    pay for it (a ready service answers at its normal speed)."""
    engine.detect([np.zeros((64, 64, 3), dtype=np.uint8)])


@dataclass
class Services:
    """Everything loaded: the model's description, the detection score from which persons are
    stored, the gallery, the batcher on the engine, and the services on them."""

    model: ModelOut
    min_detection_score: float
    gallery: Gallery
    batcher: MicroBatcher[InferenceTask, Any]
    search: SearchService
    gallery_service: GalleryService
    jobs: JobService


class ServiceState:
    """The services once loaded; until then, or when loading failed, why there are none."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self.services: Services | None = None
        self._failure: tuple[type[ServiceError], str] | None = None

    def fail(self, error: ServiceError) -> None:
        """Loading failed for good: requests get this error from now on."""
        self._failure = (type(error), error.message)

    def require(self) -> Services:
        """The services; raises while loading (503) or if loading failed."""
        if self.services is not None:
            return self.services
        if self._failure is not None:
            error_type, message = self._failure
            raise error_type(message)  # a new exception each time: tracebacks do not pile up
        raise NotReady(
            "the model and the gallery are still loading", retry_after_s=self.retry_after_s
        )


def load_engine_and_gallery(settings: ServerSettings, load: EngineLoader) -> tuple[Engine, Gallery]:
    """Load the model, open (or create) its gallery and warm the model up: blocking, for a
    worker thread.

    Raises :class:`ModelMismatch` when the gallery belongs to another model, :class:`NotReady`
    when there is no gallery and ``create_gallery`` is off.
    """
    engine = load(settings)
    info = engine.info
    try:
        gallery = open_gallery_for(
            settings.gallery_dir, info.fingerprint, info.dim, create=settings.create_gallery
        )
    except GalleryMismatch as error:
        raise ModelMismatch(str(error)) from None
    except GalleryNotFound as error:
        raise NotReady(f"{error}; create one, or set create_gallery") from None
    try:
        warm_up(engine)
    except BaseException:
        gallery.close()
        raise
    return engine, gallery


async def start_services(
    settings: ServerSettings, engine: Engine, gallery: Gallery, metrics: ServiceMetrics
) -> Services:
    """Start the batcher on the engine, build the services, and start the job runner, which
    resumes the jobs left unfinished (in the event loop). Stop them with :func:`stop_services`.
    """
    batcher: MicroBatcher[InferenceTask, Any] = MicroBatcher(
        InferenceWorker(engine),
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        queue_size=settings.queue_size,
        retry_after_s=settings.retry_after_s,
        observer=metrics,
        name="inference",
    )
    await batcher.start()
    roots = AllowedRoots(settings.allowed_roots)
    min_score = min_score_for(settings.min_detection_score, engine.info.detection_threshold)
    if settings.min_detection_score is None and engine.info.detection_threshold is None:
        logger.warning(
            "the model folder recommends no detection threshold (it was exported before "
            "psearch.json recorded one): storing persons scored >= %g; set "
            "min_detection_score to choose, or export the model again",
            min_score,
        )
    try:
        jobs = await run_in_threadpool(
            JobService.open,
            settings,
            gallery,
            batcher,
            engine.info,
            roots,
            asyncio.get_running_loop(),
            min_score,
        )
    except BaseException:
        await batcher.stop()
        raise
    return Services(
        model=ModelOut.model_validate(engine.info, from_attributes=True),
        min_detection_score=min_score,
        gallery=gallery,
        batcher=batcher,
        search=SearchService(settings, gallery, batcher, min_score),
        gallery_service=GalleryService(settings, gallery, roots),
        jobs=jobs,
    )


async def stop_services(services: Services) -> None:
    """Stop the job runner (its running job stops after its current batch, which still needs
    the batcher and the gallery), then the batcher, then close the gallery, which writes its
    index snapshot."""
    await run_in_threadpool(services.jobs.close)  # off the loop: the last batch needs it
    await services.batcher.stop()
    await run_in_threadpool(services.gallery.close)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's lifespan: loading in the background from startup, stopping at shutdown."""
    loading = asyncio.create_task(_load(app), name="load-services")
    try:
        yield
    finally:
        await _shut_down(app, loading)


async def _load(app: FastAPI) -> None:
    """Load the engine and the gallery off the event loop, then start the services."""
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
    info = engine.info
    logger.info(
        "ready: model %s (%s on %s), gallery %s, storing persons scored >= %g",
        info.name,
        info.backend,
        info.device,
        settings.gallery_dir,
        state.services.min_detection_score,
    )


async def _shut_down(app: FastAPI, loading: "asyncio.Task[None]") -> None:
    """Let a running load finish, then stop the services."""
    await loading
    state: ServiceState = app.state.service_state
    services = state.services
    if services is None:
        return
    state.services = None
    app.state.metrics.ready.set(0)
    await stop_services(services)
