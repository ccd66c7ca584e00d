"""Prometheus metrics of one app: requests, latencies, the inference queue, the gallery; and
each answer's ``Server-Timing`` header (``server/timing.py``).

Each app has its own registry (two apps in one process, as in tests, do not collide). Request
metrics are labelled by the route *template* (``/v1/gallery/images/{image_id}``), never by the
raw path, which would create one time series per image id; unknown paths share one label.
"""

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.batcher import BatchObserver
from server.timing import STATE_KEY, Timeline

UNMATCHED_ROUTE = "<unmatched>"

# Latencies from a 5 ms health check to a multi-second batch upload.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics(BatchObserver):
    """The service's metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "psearch_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "psearch_request_duration_seconds",
            "Time from request start to the end of the response, by method and route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Gauge(
            "psearch_inference_queue_depth",
            "Images waiting for the inference worker.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "psearch_inference_batch_size",
            "Images per batch run by the inference worker.",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "psearch_inference_batch_duration_seconds",
            "Time the inference worker took per batch.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ready = Gauge(
            "psearch_ready", "1 once the model and the gallery are loaded.", registry=self.registry
        )
        self.gallery_images = Gauge(
            "psearch_gallery_images", "Images in the gallery.", registry=self.registry
        )
        self.gallery_persons = Gauge(
            "psearch_gallery_persons", "Persons in the gallery.", registry=self.registry
        )

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def batch_done(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_latency.observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def exposition(self, gallery_counts: Callable[[], tuple[int, int]] | None) -> bytes:
        """The text exposition format, the gallery gauges refreshed from ``gallery_counts()
        -> (images, persons)`` when a gallery is loaded."""
        if gallery_counts is not None:
            images, persons = gallery_counts()
            self.gallery_images.set(images)
            self.gallery_persons.set(persons)
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """ASGI middleware that counts every HTTP request and times it, errors included, and
    answers where its time went in a ``Server-Timing`` header: the steps marked on its
    :class:`~server.timing.Timeline` (kept in the request's state) and the ``total``."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeline = Timeline()
        scope.setdefault("state", {})[STATE_KEY] = timeline
        status = 500  # if the app fails before it answers

        async def send_with_timing(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                header = timeline.finish(time.perf_counter())
                MutableHeaders(scope=message).append("Server-Timing", header)
            await send(message)

        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            route = scope.get("route")  # set by the router on the scope it shares with us
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            seconds = time.perf_counter() - timeline.start
            self.metrics.observe_request(scope["method"], template, status, seconds)
