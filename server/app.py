"""The FastAPI app: ``create_app(settings)``.

The app answers at once (``/healthz``) and loads the model and the gallery in the background;
``/readyz`` and the API answer 503 until they are loaded (``server/lifecycle.py``).
"""

from fastapi import FastAPI

from server.auth import ApiKeyMiddleware
from server.errors import install_error_handlers
from server.lifecycle import EngineLoader, ServiceState, lifespan, load_runtime_engine
from server.limits import BodySizeLimitMiddleware
from server.metrics import RequestMetricsMiddleware, ServiceMetrics
from server.routers import gallery, health, jobs, metrics, search, ui
from server.settings import ServerSettings, load_settings

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
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.load_engine = load_engine or load_runtime_engine
    app.state.metrics = ServiceMetrics()
    app.state.service_state = ServiceState(settings.retry_after_s)
    install_error_handlers(app)
    # The last added is the outermost: metrics see every answer, the size limit's included;
    # the API key is checked before the body size, and before any of the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    routers = (search.router, gallery.router, jobs.router, health.router, metrics.router, ui.router)
    for router in routers:
        app.include_router(router)
    return app
