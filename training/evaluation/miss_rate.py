"""Pedestrian detection metrics for CrowdHuman: MR^-2, AP and recall, as its toolkit computes them.

The LLA paper reports CrowdHuman full-body MR^-2 / AP / recall computed with the CrowdHuman
evaluation toolkit (CrowdDet's ``APMRToolkits``, also in cvpods and mmdetection). We reproduce
its rules, so that our numbers can stand next to the paper's:

Matching, per image (Caltech style, greedy by score). Detections are visited from the highest
score down. A detection matches the still unmatched GT box with which it has the largest IoU,
if that IoU is *greater than* ``iou_thresh`` (0.5): a true positive. Otherwise, if it lies inside
an ignore region (intersection over the detection's own area, IoA, greater than ``iou_thresh``),
it is dropped: neither true nor false positive, and the region can absorb any number of
detections. Otherwise it is a false positive. Ignore regions are CrowdHuman's "mask" boxes and
boxes with ``extra.ignore``; they are not counted as GT boxes.

Curves, over all images: detections sorted by score (ties in image order), and after each one
``recall = TP / GT boxes``, ``precision = TP / (TP + FP)``, ``FPPI = FP / images``,
``miss rate = 1 - recall``.

- MR^-2: at each of nine reference FPPIs, log-spaced in [1e-2, 1] (the toolkit's rounded values
  ``FPPI_REFERENCE``), the miss rate of the first point of the curve whose FPPI reaches the
  reference (the last point if none does); MR^-2 is the geometric mean of the nine. Dollar's
  Caltech code samples instead the lowest miss rate at or below each FPPI; the toolkit's rule,
  which produced the published CrowdHuman numbers, is the one here (``docs/evaluation.md``).
- AP: the trapezoidal area under the (recall, precision) points, starting at the first
  detection. This is the toolkit's AP, not the step-wise AP of the person search protocol.
- recall: the recall after the last detection.

Image sizes, when given, clip GT boxes, ignore regions and detections to the image the way the
toolkit does (x1 to [0, W - 1], x2 to [0, W], likewise for y), which matters for full-body boxes
of people cut by the image border.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.boxes import ioa_matrix, iou_matrix
from training.datasets.base import SceneAnnotation

from .predictions import Predictions, PredictionsError

FPPI_REFERENCE = (0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.0000)
"""10 ** linspace(-2, 0, 9), rounded to 4 decimals as the CrowdHuman toolkit has them."""

TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1


@dataclass(frozen=True)
class PedestrianDetectionResult:
    """MR^-2 (lower is better), AP and recall, with the counts they come from."""

    log_average_miss_rate: float
    average_precision: float
    recall: float
    num_images: int
    num_gt: int
    num_ignore_regions: int
    num_counted_detections: int
    iou_thresh: float


def caltech_match(
    gt_boxes: np.ndarray, ignore_regions: np.ndarray, detections: np.ndarray, iou_thresh: float
) -> np.ndarray:
    """Label each detection ``(n, 5)`` of one image TRUE_POSITIVE, FALSE_POSITIVE or IGNORED.

    Labels come back in the order of ``detections``; the matching visits them by descending
    score (a stable sort). See the module docstring for the rules.
    """
    labels = np.full(len(detections), FALSE_POSITIVE, dtype=np.int8)
    if len(detections) == 0:
        return labels
    ious = iou_matrix(detections[:, :4], gt_boxes)  # (n, n_gt)
    inside_ignored = (ioa_matrix(detections[:, :4], ignore_regions) > iou_thresh).any(axis=1)
    unmatched = np.ones(len(gt_boxes), dtype=bool)
    for d in np.argsort(-detections[:, 4], kind="stable"):
        overlaps = np.where(unmatched, ious[d], -1.0)
        best = int(np.argmax(overlaps)) if overlaps.size else -1
        if best >= 0 and overlaps[best] > iou_thresh:
            labels[d] = TRUE_POSITIVE
            unmatched[best] = False
        elif inside_ignored[d]:
            labels[d] = IGNORED
    return labels


def log_average_miss_rate(fppi: np.ndarray, miss_rate: np.ndarray) -> float:
    """MR^-2 of a curve given point by point, ``fppi`` non-decreasing: the geometric mean of the
    miss rates sampled at ``FPPI_REFERENCE`` (first point reaching each, else the last point)."""
    fppi, miss_rate = np.asarray(fppi, dtype=np.float64), np.asarray(miss_rate, dtype=np.float64)
    if fppi.size == 0:
        return 1.0  # no detection: everything is missed at every FPPI
    first_reaching = np.searchsorted(fppi, FPPI_REFERENCE, side="left")
    samples = miss_rate[np.minimum(first_reaching, fppi.size - 1)]
    with np.errstate(divide="ignore"):  # a miss rate of 0 makes the mean -inf and MR^-2 0
        return float(np.exp(np.mean(np.log(samples))))


def evaluate_pedestrian_detection(
    annotations: Sequence[SceneAnnotation],
    detections: Mapping[str, np.ndarray],
    iou_thresh: float = 0.5,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> PedestrianDetectionResult:
    """MR^-2, AP and recall of ``detections[name]`` ``(n, 5)`` against ``annotations``' person
    boxes and ignore regions; ``image_sizes[name] = (width, height)`` turns on clipping."""
    Predictions(detections)  # checks shapes and values
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    num_gt = num_ignore = 0
    for annotation in annotations:
        if annotation.name not in detections:
            raise PredictionsError(f"no detections for image {annotation.name!r}")
        gt, ignore, dets = annotation.boxes, annotation.ignore_boxes, detections[annotation.name]
        if image_sizes is not None:
            size = _size_of(image_sizes, annotation.name)
            gt, ignore = _clip(gt, size), _clip(ignore, size)
            dets = np.concatenate([_clip(dets[:, :4], size), dets[:, 4:5]], axis=1)
        order = np.argsort(-dets[:, 4], kind="stable")
        scores.append(dets[order, 4])
        labels.append(caltech_match(gt, ignore, dets, iou_thresh)[order])
        num_gt += len(gt)
        num_ignore += len(ignore)
    if num_gt == 0:
        raise ValueError("no ground-truth boxes to evaluate detections against")

    all_scores = np.concatenate([np.zeros(0), *scores])
    all_labels = np.concatenate([np.zeros(0, dtype=np.int8), *labels])
    counted = all_labels != IGNORED
    ranked = all_labels[counted][np.argsort(-all_scores[counted], kind="stable")]
    true_positives = np.cumsum(ranked == TRUE_POSITIVE)
    false_positives = np.cumsum(ranked == FALSE_POSITIVE)
    recall = true_positives / num_gt
    precision = true_positives / np.maximum(true_positives + false_positives, 1)
    fppi = false_positives / len(annotations)
    return PedestrianDetectionResult(
        log_average_miss_rate=log_average_miss_rate(fppi, 1.0 - recall),
        average_precision=_trapezoidal_area(recall, precision),
        recall=float(recall[-1]) if recall.size else 0.0,
        num_images=len(annotations),
        num_gt=num_gt,
        num_ignore_regions=num_ignore,
        num_counted_detections=len(ranked),
        iou_thresh=iou_thresh,
    )


def _trapezoidal_area(recall: np.ndarray, precision: np.ndarray) -> float:
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _size_of(image_sizes: Mapping[str, tuple[int, int]], name: str) -> tuple[int, int]:
    if name not in image_sizes:
        raise PredictionsError(f"no image size for image {name!r}")
    return image_sizes[name]


def _clip(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Clip x1 y1 x2 y2 boxes like the CrowdHuman toolkit: x1 into [0, W-1], x2 into [0, W]."""
    width, height = size
    low = np.array([width - 1, height - 1])
    high = np.array([width, height])
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([np.clip(boxes[:, :2], 0, low), np.clip(boxes[:, 2:4], 0, high)], axis=1)
