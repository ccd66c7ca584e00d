"""CrowdHuman's MR^-2, AP and recall, with the rules of the CrowdHuman evaluation toolkit."""

from pathlib import Path

import numpy as np
import pytest

from training.datasets.base import SceneAnnotation
from training.evaluation.miss_rate import (
    FALSE_POSITIVE,
    IGNORED,
    TRUE_POSITIVE,
    caltech_match,
    evaluate_pedestrian_detection,
    log_average_miss_rate,
)


def scene(name: str, people: list[list[float]], ignore: list[list[float]] | None = None):
    boxes = np.array(people, dtype=np.float32).reshape(-1, 4)
    return SceneAnnotation(
        name,
        Path(name),
        boxes,
        np.full(len(boxes), -1, dtype=np.int64),
        ignore_boxes=np.array(ignore or [], dtype=np.float32).reshape(-1, 4),
    )


def box(x: float, score: float | None = None) -> list[float]:
    """A 50 x 100 box at x (with a score for a detection)."""
    return [x, 0.0, x + 50.0, 100.0] + ([] if score is None else [score])


# Two images, four people (P1, P2 in "a"; P3, P4 in "b") and an ignore region R in "b".
#   a: d1 0.9 on P1 (TP), d2 0.8 on nobody (FP), d3 0.6 on P2 (TP)
#   b: d4 0.85 inside R (ignored), d5 0.7 on P3 (TP), d6 0.5 on nobody (FP); P4 is missed.
WORKED_ANNOTATIONS = [
    scene("a", [box(0), box(100)]),
    scene("b", [box(0), box(100)], ignore=[[300, 0, 500, 200]]),
]
WORKED_DETECTIONS = {
    "a": np.array([box(0, 0.9), box(600, 0.8), box(100, 0.6)]),
    "b": np.array([box(350, 0.85), box(0, 0.7), box(800, 0.5)]),
}


def test_worked_example_mr2_ap_and_recall():
    # Ranked, ignored detection removed: TP .9, FP .8, TP .7, TP .6, FP .5; 4 GT, 2 images.
    #   after:   1     2     3     4     5
    #   recall  1/4   1/4   2/4   3/4   3/4
    #   FPPI     0    1/2   1/2   1/2    1
    #   prec.    1    1/2   2/3   3/4   3/5
    # Reference FPPIs 0.01 .. 0.3162 (seven of them) first reach FPPI 1/2 at point 2: miss 3/4.
    # 0.5623 and 1.0 first reach FPPI 1 at point 5: miss 1/4.
    result = evaluate_pedestrian_detection(WORKED_ANNOTATIONS, WORKED_DETECTIONS)
    assert result.log_average_miss_rate == pytest.approx(0.75 ** (7 / 9) * 0.25 ** (2 / 9))
    # Trapezoids between consecutive points: only where recall grows (2->3 and 3->4).
    expected_ap = 0.25 * (1 / 2 + 2 / 3) / 2 + 0.25 * (2 / 3 + 3 / 4) / 2
    assert result.average_precision == pytest.approx(expected_ap)
    assert result.recall == pytest.approx(3 / 4)
    assert (result.num_gt, result.num_ignore_regions, result.num_counted_detections) == (4, 1, 5)


def test_mr_samples_the_first_point_whose_fppi_reaches_each_reference():
    # The toolkit's rule: at reference FPPI 0.01 it takes the point at FPPI 0.02 (miss 0.3), not
    # the last point at or below 0.01 (miss 0.6). Every reference samples 0.3 here.
    assert log_average_miss_rate([0.005, 0.02], [0.6, 0.3]) == pytest.approx(0.3)
    # References beyond the curve's end take its last point: all nine sample 0.5.
    assert log_average_miss_rate([0.0, 0.001], [0.9, 0.5]) == pytest.approx(0.5)


def test_without_detections_everything_is_missed():
    result = evaluate_pedestrian_detection(
        WORKED_ANNOTATIONS, {"a": np.zeros((0, 5)), "b": np.zeros((0, 5))}
    )
    assert result.log_average_miss_rate == 1.0
    assert (result.average_precision, result.recall) == (0.0, 0.0)


def test_caltech_matching_is_greedy_by_score_and_strict_at_the_threshold():
    people = np.array([box(0), box(100)])
    ignore = np.array([[300, 0, 500, 200]])
    detections = np.array(
        [
            box(0, 0.5),  # on P1, but visited after the duplicate below: a false positive
            box(0, 0.9),  # on P1 first: true positive
            box(100, 0.4),  # on P2: true positive
            box(320, 0.8),  # inside the ignore region (IoA 1): ignored
            box(480, 0.7),  # IoA 20/50 = 0.4 with the ignore region: false positive
        ]
    )
    labels = caltech_match(people, ignore, detections, iou_thresh=0.5)
    expected = [FALSE_POSITIVE, TRUE_POSITIVE, TRUE_POSITIVE, IGNORED, FALSE_POSITIVE]
    np.testing.assert_array_equal(labels, expected)
    # IoU exactly 0.5 does not match (the toolkit wants more than the threshold): a box that
    # covers half of P1 is a false positive.
    half = np.array([[0, 0, 50, 50, 0.9]])
    assert caltech_match(people[:1], ignore[:0], half, 0.5).tolist() == [FALSE_POSITIVE]


def test_a_person_match_wins_over_an_ignore_region():
    # The detection on P1 also lies inside an ignore region that covers P1: still a TP.
    labels = caltech_match(
        np.array([box(0)]), np.array([[0, 0, 60, 110]]), np.array([box(0, 0.9)]), 0.5
    )
    assert labels.tolist() == [TRUE_POSITIVE]


def test_image_sizes_clip_boxes_like_the_toolkit():
    # A person cut by the left border: annotated (-50, 0, 50, 100) in a 100 x 100 image. The
    # detection (0, 0, 50, 100) has IoU 5000 / 10000 = 0.5 with the raw box (not a match) and
    # IoU 1 with the clipped box (0, 0, 50, 100).
    annotations = [scene("a", [[-50, 0, 50, 100]])]
    detections = {"a": np.array([[0, 0, 50, 100, 0.9]])}
    assert evaluate_pedestrian_detection(annotations, detections).recall == 0.0
    clipped = evaluate_pedestrian_detection(annotations, detections, image_sizes={"a": (100, 100)})
    assert clipped.recall == 1.0
