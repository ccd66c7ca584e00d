"""``/metrics``: Prometheus metrics of the service."""

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.dependencies import StateDep

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics."}},
)
def metrics(request: Request, state: StateDep) -> Response:
    """Requests and latencies per route, the inference queue and batch sizes, gallery size
    (in Prometheus' text format)."""
    services = state.services
    counts = services.gallery_service.counts if services is not None else None
    body = request.app.state.metrics.exposition(counts)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
