"""The max-IoU matcher: thresholds, the ignored band, low-quality matches, no GT."""

import pytest
import torch

from models.assigners import IGNORED, NEGATIVE, MaxIoUConfig, MaxIoUMatcher

RPN = MaxIoUConfig(positive_iou=0.7, negative_iou=(0.0, 0.3), low_quality_matches=True)
FAST_RCNN = MaxIoUConfig(positive_iou=0.5, negative_iou=(0.0, 0.5))


def test_each_candidate_takes_its_best_gt_and_is_labelled_by_that_iou():
    """Two GT boxes, five candidates. Best IoU per candidate: 0.8 (GT 1), 0.5 (GT 0), 0.49,
    0.2, 0.0. Fast R-CNN (>= 0.5 positive, < 0.5 negative): GT 1, GT 0, then three negatives.
    """
    iou = torch.tensor(
        [
            [0.1, 0.5, 0.49, 0.0, 0.0],
            [0.8, 0.3, 0.1, 0.2, 0.0],
        ]
    )
    assert MaxIoUMatcher(FAST_RCNN)(iou).tolist() == [1, 0, NEGATIVE, NEGATIVE, NEGATIVE]


def test_the_rpn_ignores_the_band_between_its_thresholds():
    """RPN: 0.8 positive; 0.5 and 0.3 between 0.3 and 0.7, ignored; 0.29 and 0 negative."""
    iou = torch.tensor([[0.8, 0.5, 0.3, 0.29, 0.0]])
    matches = MaxIoUMatcher(RPN.model_copy(update={"low_quality_matches": False}))(iou)
    assert matches.tolist() == [0, IGNORED, IGNORED, NEGATIVE, NEGATIVE]


def test_low_quality_matches_give_every_gt_its_best_candidates_ties_included():
    """GT 0's best IoU is 0.4 (candidates 1 and 2, a tie), below 0.7: both become positives.
    Candidate 2 overlaps GT 1 more (0.6) and keeps GT 1 as its match (torchvision's rule).
    GT 1's own best is candidate 0 (0.9), already positive."""
    iou = torch.tensor(
        [
            [0.0, 0.4, 0.4, 0.1],
            [0.9, 0.0, 0.6, 0.1],
        ]
    )
    assert MaxIoUMatcher(RPN)(iou).tolist() == [1, 0, 1, NEGATIVE]


def test_a_gt_box_that_overlaps_nothing_claims_nothing():
    """torchvision would make every IoU-0 candidate a positive of such a box."""
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.75, 0.1]])
    assert MaxIoUMatcher(RPN)(iou).tolist() == [NEGATIVE, 1, NEGATIVE]


def test_a_negative_range_above_zero_ignores_the_far_background():
    """The decoupled method's RoI head: negatives have IoU in [0.1, 0.5); IoU 0.05 is ignored."""
    config = MaxIoUConfig(positive_iou=0.5, negative_iou=(0.1, 0.5))
    iou = torch.tensor([[0.05, 0.1, 0.45, 0.5]])
    assert MaxIoUMatcher(config)(iou).tolist() == [IGNORED, NEGATIVE, NEGATIVE, 0]


def test_without_gt_boxes_every_candidate_is_background():
    matches = MaxIoUMatcher(RPN)(torch.zeros(0, 4))
    assert matches.tolist() == [NEGATIVE] * 4


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="negative_iou"):
        MaxIoUConfig(positive_iou=0.5, negative_iou=(0.0, 0.6))
