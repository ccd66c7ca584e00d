"""The engine side of the service: the tasks of the micro-batcher and how its worker runs them.

Two kinds of task, both one image: detect the persons of a gallery image (:class:`DetectTask`),
and embed a query person (:class:`QueryTask`). A batch may hold both. The engine
(``export.runtime.Engine``) embeds a query in one of two ways, and so do we, batched:

- RoI models (``manifest.embeds_boxes``) embed the query box itself ("GT-box" mode), one
  query at a time (the engine takes one image per call);
- the others run the detector on the query image and take the embedding of the detection that
  overlaps the query box most (the protocol's "max-IoU" mode, ``common.boxes.max_iou_pick``):
  these queries join the batch's detection pass, so they are batched with everything else.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from common.boxes import Box, max_iou_pick
from export.runtime import Engine, ImageDetections
from server.errors import InvalidField, NoPersonDetected


@dataclass(frozen=True)
class DetectTask:
    """Detect the persons of an image."""

    pixels: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class QueryTask:
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


InferenceTask = DetectTask | QueryTask


class InferenceWorker:
    """Runs batches of tasks on the engine: called by the batcher's one worker thread only."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.embeds_boxes = bool(engine.manifest.embeds_boxes)

    def __call__(self, tasks: Sequence[InferenceTask]) -> list[Any]:
        """One result per task, in order: a DetectTask's :class:`ImageDetections`, a
        QueryTask's :class:`QueryEmbedding` (or the error of that query alone)."""
        results: list[Any] = [None] * len(tasks)
        # Detection tasks and max-IoU queries both need a detection pass: one engine batch.
        detected = [
            index
            for index, task in enumerate(tasks)
            if isinstance(task, DetectTask) or not self.embeds_boxes
        ]
        if detected:
            found = self.engine.detect([tasks[index].pixels for index in detected])
            for index, detections in zip(detected, found, strict=True):
                task = tasks[index]
                results[index] = (
                    detections
                    if isinstance(task, DetectTask)
                    else max_iou_query(detections, task.box)
                )
        for index, task in enumerate(tasks):
            if isinstance(task, QueryTask) and self.embeds_boxes:
                results[index] = self._embed_box(task)
        return results

    def _embed_box(self, task: QueryTask) -> QueryEmbedding | Exception:
        try:
            embedding = self.engine.embed_query(task.pixels, np.asarray(task.box))
        except ValueError as error:  # the engine refuses this query: fail it alone
            return InvalidField(f"the query cannot be embedded: {error}")
        return QueryEmbedding(np.asarray(embedding, np.float32), task.box, "box", 1.0, None)


def max_iou_query(detections: ImageDetections, box: Box) -> QueryEmbedding | NoPersonDetected:
    """The detection overlapping ``box`` most, as the query (``common.boxes.max_iou_pick``);
    an error when nothing was detected."""
    if len(detections.scores) == 0:
        return NoPersonDetected("no person detected in the query image; nothing to embed")
    best, iou = max_iou_pick(detections.boxes, box)
    x1, y1, x2, y2 = (float(value) for value in detections.boxes[best])
    return QueryEmbedding(
        embedding=np.asarray(detections.embeddings[best], np.float32),
        box=(x1, y1, x2, y2),
        method="max_iou_detection",
        iou=iou,
        det_score=float(detections.scores[best]),
    )
