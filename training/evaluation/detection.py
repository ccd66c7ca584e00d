"""Detection AP and recall of a person search model, as the person search papers compute them.

Per gallery image (``docs/evaluation.md``, "Detection AP and recall"): keep the
detections scored >= ``det_thresh``; a GT box and a detection match when their IoU reaches
``iou_thresh`` *and* each is the other's highest-IoU partner (mutual best by IoU, whatever the
scores; the first index wins a tie, as ``argmax`` does). A detection is a true positive if it
matches a GT box. Over all images::

    recall = true positives / GT boxes        (GT boxes of images without detections count)
    AP     = average_precision(is_true_positive, score) * recall

This is not the greedy, score-ordered matching of PASCAL VOC or COCO: a detection that is second
best for a GT box never matches it, even when the best one is claimed by another GT box. Ignore
regions (``SceneAnnotation.ignore_boxes``) play no part here; CrowdHuman's metric is in
``miss_rate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.boxes import iou_matrix
from training.datasets.base import SceneAnnotation

from .average_precision import average_precision
from .predictions import Predictions, PredictionsError


@dataclass(frozen=True)
class DetectionResult:
    """Detection accuracy over a set of images (AP already scaled by recall)."""

    average_precision: float
    recall: float
    num_gt: int
    num_detections: int
    num_true_positives: int
    det_thresh: float
    iou_thresh: float


def mutual_best_matches(ious: np.ndarray, iou_thresh: float) -> np.ndarray:
    """``(n_gt, n_det)`` bool: IoU >= ``iou_thresh`` and each is the other's highest-IoU partner.

    Every GT box and every detection is in at most one match.
    """
    n_gt, n_det = ious.shape
    if n_gt == 0 or n_det == 0:
        return np.zeros((n_gt, n_det), dtype=bool)
    best_gt_of_detection = np.argmax(ious, axis=0)  # (n_det,)
    best_detection_of_gt = np.argmax(ious, axis=1)  # (n_gt,)
    return (
        (ious >= iou_thresh)
        & (np.arange(n_gt)[:, None] == best_gt_of_detection[None, :])
        & (np.arange(n_det)[None, :] == best_detection_of_gt[:, None])
    )


def evaluate_detections(
    annotations: Sequence[SceneAnnotation],
    detections: Mapping[str, np.ndarray],
    det_thresh: float = 0.5,
    iou_thresh: float = 0.5,
) -> DetectionResult:
    """Detection AP and recall of ``detections[name]`` ``(n, 5)`` (x1 y1 x2 y2 score) against
    the GT boxes of ``annotations`` (every person box, labeled or not)."""
    Predictions(detections)  # checks shapes and values
    is_true_positive: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    num_gt = 0
    for annotation in annotations:
        if annotation.name not in detections:
            raise PredictionsError(f"no detections for image {annotation.name!r}")
        kept = detections[annotation.name]
        kept = kept[kept[:, 4] >= det_thresh]
        num_gt += len(annotation.boxes)
        ious = iou_matrix(annotation.boxes, kept[:, :4])
        is_true_positive.append(mutual_best_matches(ious, iou_thresh).any(axis=0))
        scores.append(kept[:, 4])
    if num_gt == 0:
        raise ValueError("no ground-truth boxes to evaluate detections against")
    labels = np.concatenate([np.zeros(0, dtype=bool), *is_true_positive])
    all_scores = np.concatenate([np.zeros(0), *scores])
    num_true_positives = int(labels.sum())
    recall = num_true_positives / num_gt
    return DetectionResult(
        average_precision=average_precision(labels, all_scores) * recall,
        recall=recall,
        num_gt=num_gt,
        num_detections=len(labels),
        num_true_positives=num_true_positives,
        det_thresh=det_thresh,
        iou_thresh=iou_thresh,
    )
