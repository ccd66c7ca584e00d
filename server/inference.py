"""The engine side of the service: the jobs of the micro-batcher and how its worker runs them.

Two kinds of job, both one image: detect the persons of a gallery image (:class:`DetectJob`),
and embed a query person (:class:`QueryJob`). A batch may hold both. The engine
(``export.runtime.Engine``) embeds a query in one of two ways, and so do we, batched:

- RoI models (``manifest.embeds_boxes``) embed the query box itself ("GT-box" mode), one
  query at a time (the engine takes one image per call);
- the others run the detector on the query image and take the embedding of the detection that
  overlaps the query box most ("max-IoU" mode, docs/evaluation.md): these
  queries join the batch's detection pass, so they are batched with everything else.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from common.boxes import Box, max_iou_pick
from export.runtime import load_engine
from server.errors import InvalidField, NoPersonDetected
from server.settings import ServerSettings


class EngineInfo(Protocol):
    name: str
    fingerprint: str
    dim: int
    backend: str
    device: str


class EngineManifest(Protocol):
    embeds_boxes: bool


class Detections(Protocol):
    boxes: np.ndarray  # (n, 4) in the image's pixels
    scores: np.ndarray  # (n,) descending
    embeddings: np.ndarray  # (n, D) L2-normalised


class Engine(Protocol):
    """What the service uses of ``export.runtime.Engine``."""

    info: EngineInfo
    manifest: EngineManifest

    def detect(self, images: Sequence[np.ndarray]) -> list[Any]: ...

    def embed_query(self, image: np.ndarray, box: Any = None) -> np.ndarray: ...


EngineLoader = Callable[[ServerSettings], Engine]


@dataclass(frozen=True)
class DetectJob:
    """Detect the persons of an image."""

    pixels: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class QueryJob:
    """Embed the query person in ``box`` of an image (the whole image for a person crop)."""

    pixels: np.ndarray  # (H, W, 3) uint8
    box: Box


@dataclass(frozen=True)
class QueryEmbedding:
    """A query as embedded: the (D,) ``embedding`` of ``box``, found by ``method``, with its
    ``iou`` with the requested box and, for a detection, its ``det_score``."""

    embedding: np.ndarray
    box: Box
    method: Literal["box", "max_iou_detection"]
    iou: float
    det_score: float | None


Job = DetectJob | QueryJob


class InferenceWorker:
    """Runs batches of jobs on the engine: called by the batcher's one worker thread only."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.embeds_boxes = bool(engine.manifest.embeds_boxes)

    def __call__(self, jobs: Sequence[Job]) -> list[Any]:
        """One result per job, in order: a DetectJob's detections, a QueryJob's
        :class:`QueryEmbedding` (or the error of that query alone)."""
        results: list[Any] = [None] * len(jobs)
        # Detection jobs and max-IoU queries both need a detection pass: one engine batch.
        detected = [
            index
            for index, job in enumerate(jobs)
            if isinstance(job, DetectJob) or not self.embeds_boxes
        ]
        if detected:
            found = self.engine.detect([jobs[index].pixels for index in detected])
            for index, detections in zip(detected, found, strict=True):
                job = jobs[index]
                results[index] = (
                    detections if isinstance(job, DetectJob) else max_iou_query(detections, job.box)
                )
        for index, job in enumerate(jobs):
            if isinstance(job, QueryJob) and self.embeds_boxes:
                results[index] = self._embed_box(job)
        return results

    def _embed_box(self, job: QueryJob) -> QueryEmbedding | Exception:
        try:
            embedding = self.engine.embed_query(job.pixels, np.asarray(job.box))
        except ValueError as error:  # the engine refuses this query: fail it alone
            return InvalidField(f"the query cannot be embedded: {error}")
        return QueryEmbedding(np.asarray(embedding, np.float32), job.box, "box", 1.0, None)


def max_iou_query(detections: Detections, box: Box) -> QueryEmbedding | NoPersonDetected:
    """The detection overlapping ``box`` most, as the query (``common.boxes.max_iou_pick``);
    an error when nothing was detected."""
    if len(detections.scores) == 0:
        return NoPersonDetected("no person detected in the query image; nothing to embed")
    best, iou = max_iou_pick(detections.boxes, box)
    return QueryEmbedding(
        embedding=np.asarray(detections.embeddings[best], np.float32),
        box=_as_box(detections.boxes[best]),
        method="max_iou_detection",
        iou=iou,
        det_score=float(detections.scores[best]),
    )


def _as_box(values: np.ndarray) -> Box:
    x1, y1, x2, y2 = (float(value) for value in values)
    return (x1, y1, x2, y2)


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
