"""Overlaps between boxes, in numpy and float64, as the evaluation scripts of the literature do.

Boxes are ``(x1, y1, x2, y2)`` in original image pixels, continuous coordinates (no "+1" pixel
convention). An overlap whose denominator is 0 (a degenerate box) is 0, never NaN.
"""

from __future__ import annotations

import numpy as np


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
