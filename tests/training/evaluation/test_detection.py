"""Detection AP and recall with the person search papers' mutual-best matching."""

from pathlib import Path

import numpy as np
import pytest

from training.datasets.base import SceneAnnotation
from training.evaluation.detection import evaluate_detections, mutual_best_matches
from training.evaluation.predictions import PredictionsError


def scene(name: str, boxes: list[list[float]]) -> SceneAnnotation:
    array = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return SceneAnnotation(name, Path(name), array, np.full(len(array), -1, dtype=np.int64))


def detections(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


# GT A and GT B overlap (B is A shifted right by 2). det1 covers A exactly; det2 is A shifted by 5.
#   IoU(det1, A) = 1,      IoU(det1, B) = 80 / 120 = 0.667
#   IoU(det2, A) = 50/150, IoU(det2, B) = 70 / 130 = 0.538
GT_A, GT_B = [0, 0, 10, 10], [2, 0, 12, 10]
DET_1, DET_2 = [0, 0, 10, 10, 0.9], [5, 0, 15, 10, 0.8]


def test_matching_is_mutual_best_by_iou_not_greedy_by_score():
    # Greedy matching by score would give det1 -> A and then det2 -> B (IoU 0.538 >= 0.5): two
    # true positives. Mutual best: B's best detection is det1 (0.667 > 0.538), which prefers A,
    # so B stays unmatched and det2 is a false positive.
    result = evaluate_detections([scene("a", [GT_A, GT_B])], {"a": detections([DET_1, DET_2])})
    assert result.num_true_positives == 1
    assert result.recall == pytest.approx(1 / 2)
    # Ranked by score: det1 (TP), det2 (FP): step-wise AP 1, scaled by recall 1/2.
    assert result.average_precision == pytest.approx(1 / 2)


def test_mutual_best_matches_keeps_pairs_that_choose_each_other():
    ious = np.array([[0.9, 0.6], [0.7, 0.55]])  # rows: GT, columns: detections
    # GT 0 and det 0 choose each other; GT 1's best is det 0 (taken by GT 0), det 1's best is
    # GT 0: no other pair survives.
    expected = np.array([[True, False], [False, False]])
    np.testing.assert_array_equal(mutual_best_matches(ious, 0.5), expected)
    # The pair must still reach the IoU threshold.
    assert not mutual_best_matches(ious, 0.95).any()


def test_gt_boxes_of_images_without_detections_count_against_recall():
    # Image "a": one GT found. Image "b": one GT, no detection at all.
    annotations = [scene("a", [GT_A]), scene("b", [GT_A])]
    result = evaluate_detections(annotations, {"a": detections([DET_1]), "b": detections([])})
    assert result.num_gt == 2
    assert result.recall == pytest.approx(1 / 2)
    assert result.average_precision == pytest.approx(1 / 2)


def test_detections_below_det_thresh_are_dropped():
    # The detection on B (IoU 1 with B) scores 0.4: found at det_thresh 0.3, dropped at 0.5.
    annotations = [scene("a", [GT_A, [20, 20, 30, 40]])]
    dets = {"a": detections([DET_1, [20, 20, 30, 40, 0.4]])}
    assert evaluate_detections(annotations, dets, det_thresh=0.5).recall == pytest.approx(1 / 2)
    assert evaluate_detections(annotations, dets, det_thresh=0.3).recall == pytest.approx(1.0)


def test_ap_ranks_all_images_detections_together():
    # a: TP 0.9, FP 0.5 (nothing there); b: TP 0.7. Ranked: TP, TP, FP -> AP 1, recall 1.
    # c: FP 0.95 on an image without people puts a false positive first:
    # precisions at the TPs 1/2 and 2/3 -> AP (1/2 + 2/3) / 2.
    annotations = [scene("a", [GT_A]), scene("b", [GT_A]), scene("c", [])]
    dets = {
        "a": detections([DET_1, [50, 50, 60, 60, 0.5]]),
        "b": detections([[0, 0, 10, 10, 0.7]]),
        "c": detections([]),
    }
    assert evaluate_detections(annotations, dets).average_precision == pytest.approx(1.0)
    dets["c"] = detections([[0, 0, 10, 10, 0.95]])
    expected = (1 / 2 + 2 / 3) / 2
    assert evaluate_detections(annotations, dets).average_precision == pytest.approx(expected)


def test_missing_image_or_malformed_detections_are_errors():
    with pytest.raises(PredictionsError, match="no detections for image 'b'"):
        evaluate_detections([scene("a", [GT_A]), scene("b", [])], {"a": detections([DET_1])})
    with pytest.raises(PredictionsError, match=r"\(n, 5\)"):
        evaluate_detections([scene("a", [GT_A])], {"a": np.zeros((1, 4))})
