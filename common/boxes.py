"""Overlaps between boxes, in numpy and float64, as the evaluation scripts of the literature do,
and the max-IoU pick of a query person.

Boxes are ``(x1, y1, x2, y2)`` in image pixels, continuous coordinates (no "+1" pixel
convention). An overlap whose denominator is 0 (a degenerate box) is 0, never NaN. The
evaluation, the runtime and the service all measure overlaps with these functions, so a query
picks the same detection wherever it is embedded.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in an image's pixels


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``(n, 4)`` boxes -> ``(n,)``."""
    boxes = _as_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _intersection(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Intersection areas of broadcastable ``(..., 4)`` box arrays -> ``(...)``."""
    top_left = np.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = np.minimum(boxes1[..., 2:], boxes2[..., 2:])
    size = np.clip(bottom_right - top_left, 0, None)
    return size[..., 0] * size[..., 1]


def intersection_areas(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas of ``(n, 4)`` and ``(m, 4)`` boxes -> ``(n, m)``."""
    boxes1, boxes2 = _as_boxes(boxes1), _as_boxes(boxes2)
    return _intersection(boxes1[:, None, :], boxes2[None, :, :])


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def iou_matrix(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of ``(n, 4)`` and ``(m, 4)`` boxes -> ``(n, m)``."""
    intersection = intersection_areas(boxes1, boxes2)
    union = box_areas(boxes1)[:, None] + box_areas(boxes2)[None, :] - intersection
    return _safe_divide(intersection, union)


def paired_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Intersection over union of ``boxes1[i]`` and ``boxes2[i]``, both ``(n, 4)`` -> ``(n,)``."""
    boxes1, boxes2 = _as_boxes(boxes1), _as_boxes(boxes2)
    intersection = _intersection(boxes1, boxes2)
    union = box_areas(boxes1) + box_areas(boxes2) - intersection
    return _safe_divide(intersection, union)


def ioa_matrix(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Pairwise intersection over the area of the first box -> ``(n, m)``.

    ``ioa_matrix(detections, ignore_regions)[i, j]`` is the fraction of detection ``i`` that lies
    inside region ``j``: the overlap used to decide whether a detection falls in an ignore region.
    """
    intersection = intersection_areas(boxes, regions)
    return _safe_divide(intersection, box_areas(boxes)[:, None])


class MaxIouPick(NamedTuple):
    """The detection chosen for a query box: its ``index`` and its ``iou`` with the box."""

    index: int
    iou: float


def max_iou_pick(boxes: np.ndarray, query_box: np.ndarray | Box) -> MaxIouPick:
    """The box among ``boxes`` (n, 4) that overlaps ``query_box`` (4,) most: the query of the
    protocol's max-IoU mode, for models that cannot embed a given box. It is the arg-max even
    when nothing overlaps (then the first box, with IoU 0), as AlignPS's released evaluation
    does. Raises ValueError when there are no boxes (the caller decides what a query without
    detections means)."""
    boxes = _as_boxes(boxes)
    if not len(boxes):
        raise ValueError("no boxes to pick the query from")
    overlaps = iou_matrix(boxes, query_box)[:, 0]
    index = int(np.argmax(overlaps))
    return MaxIouPick(index, float(overlaps[index]))
