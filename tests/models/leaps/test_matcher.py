"""Hungarian matching (detection) and diverse re-id sample matching (re-id) on hand-built cases.

Boxes of the DRSM cases share the ground truth's left, right and top edges, so that the IoU of a
box (0, 0, 100, h) with the ground truth (0, 0, 100, 100) is simply h / 100.
"""

import pytest
import torch

from models.leaps.matcher import (
    Match,
    diverse_reid_samples,
    drsm_weight,
    focal_cost,
    hungarian_match,
)

COSTS = {
    "class_weight": 2.0,
    "l1_weight": 5.0,
    "giou_weight": 2.0,
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
}
GT = torch.tensor([[0.0, 0.0, 100.0, 100.0]])


def _box_of_height(height: float) -> list[float]:
    return [0.0, 0.0, 100.0, height]


def test_hungarian_match_pairs_each_target_with_the_box_on_it():
    # Proposal 0 sits on target 1, proposal 2 on target 0, proposal 1 on neither.
    targets = torch.tensor([[10.0, 10.0, 40.0, 90.0], [60.0, 20.0, 90.0, 95.0]])
    boxes = torch.tensor([[60.0, 20.0, 90.0, 95.0], [0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 40.0, 90.0]])
    match = hungarian_match(torch.zeros(3), boxes, targets, (100, 100), **COSTS)
    assert match.proposals.tolist() == [0, 2]
    assert match.targets.tolist() == [1, 0]


def test_hungarian_match_prefers_the_confident_proposal_between_two_equal_boxes():
    boxes = torch.tensor([[10.0, 10.0, 40.0, 90.0], [10.0, 10.0, 40.0, 90.0]])
    logits = torch.tensor([-3.0, 3.0])
    match = hungarian_match(logits, boxes, boxes[:1], (100, 100), **COSTS)
    assert match.proposals.tolist() == [1]


def test_hungarian_match_without_targets_matches_nothing():
    match = hungarian_match(torch.zeros(4), torch.rand(4, 4), torch.zeros(0, 4), (50, 50), **COSTS)
    assert match.proposals.numel() == 0 and match.targets.numel() == 0


def test_hungarian_match_with_more_targets_than_proposals_matches_every_proposal():
    targets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0, 50, 10]])
    match = hungarian_match(torch.zeros(2), targets[:2], targets, (64, 64), **COSTS)
    assert sorted(match.proposals.tolist()) == [0, 1]


def test_hungarian_match_measures_l1_relative_to_the_images_own_size():
    """One target; proposal 0 is 10 pixels off in x, proposal 1 10 pixels off in y. In a wide
    image (height 100, width 1000) the x error is the smaller one, in a tall image the y error."""
    target = torch.tensor([[100.0, 20.0, 140.0, 80.0]])
    boxes = target + torch.tensor([[10.0, 0.0, 10.0, 0.0], [0.0, 10.0, 0.0, 10.0]])
    l1_only = {**COSTS, "class_weight": 0.0, "giou_weight": 0.0}
    for size, closest in (([100, 1000], 0), ([1000, 100], 1)):
        match = hungarian_match(torch.zeros(2), boxes, target, torch.tensor(size), **l1_only)
        assert match.proposals.tolist() == [closest]


def test_focal_cost_is_lower_for_a_more_confident_person():
    costs = focal_cost(torch.tensor([-2.0, 0.0, 2.0]), alpha=0.25, gamma=2.0)
    assert costs[0] > costs[1] > costs[2]


@pytest.mark.parametrize(("iou", "weight"), [(0.7, 0.5), (0.85, 1.0), (1.0, 1.5)])
def test_drsm_weight_follows_the_paper_formula(iou, weight):
    # W = (IoU - 0.7) / 0.3 + 0.5
    assert drsm_weight(torch.tensor(iou), 0.7).item() == pytest.approx(weight, abs=1e-6)


def test_drsm_assigns_proposals_above_the_threshold_with_their_weights():
    # Proposal 0 is the one-to-one match (IoU 1.0); 1 has IoU 0.85; 2 has exactly 0.7 (not
    # strictly above: not assigned); 3 has 0.5.
    rois = torch.tensor([_box_of_height(h) for h in (100.0, 85.0, 70.0, 50.0)])
    match = Match(torch.tensor([0]), torch.tensor([0]))
    samples = diverse_reid_samples(rois, GT, torch.tensor([4]), match)
    assert samples.proposals.tolist() == [0, 1]
    assert samples.pids.tolist() == [4, 4]
    assert samples.weights.tolist() == pytest.approx([1.5, 1.0], abs=1e-5)


def test_drsm_keeps_a_poorly_placed_match_at_the_lowest_weight():
    # The matched proposal overlaps its target by IoU 0.4 only: it stays, weighing 0.5 (as if
    # its IoU were the threshold); proposal 1 (IoU 0.9) is a diverse sample of weight 7/6.
    rois = torch.tensor([_box_of_height(40.0), _box_of_height(90.0)])
    match = Match(torch.tensor([0]), torch.tensor([0]))
    samples = diverse_reid_samples(rois, GT, torch.tensor([4]), match)
    assert samples.proposals.tolist() == [0, 1]
    assert samples.weights.tolist() == pytest.approx([0.5, 0.2 / 0.3 + 0.5], abs=1e-5)


def test_drsm_adds_no_samples_around_unlabeled_persons():
    # Target 0 is unlabeled: its matched proposal 0 is kept (pid -1, for the queue), proposal 1
    # around it is not added. Proposal 2 overlaps the labeled target 1 by 0.9 but the unlabeled
    # target even more (IoU 1): it is not given the labeled identity.
    targets = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 90.0]])
    rois = torch.tensor([_box_of_height(100.0), _box_of_height(95.0), _box_of_height(100.0)])
    match = Match(torch.tensor([0]), torch.tensor([0]))
    samples = diverse_reid_samples(rois, targets, torch.tensor([-1, 3]), match)
    assert samples.proposals.tolist() == [0]
    assert samples.pids.tolist() == [-1]


def test_drsm_never_reassigns_a_matched_proposal():
    # Proposal 0 is matched to target 1 although it overlaps target 0 perfectly.
    targets = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 80.0]])
    rois = torch.tensor([_box_of_height(100.0)])
    match = Match(torch.tensor([0]), torch.tensor([1]))
    samples = diverse_reid_samples(rois, targets, torch.tensor([7, 8]), match)
    assert samples.proposals.tolist() == [0]
    assert samples.pids.tolist() == [8]


def test_without_drsm_only_the_matched_proposal_trains_re_id_at_weight_one():
    rois = torch.tensor([_box_of_height(h) for h in (100.0, 85.0)])
    match = Match(torch.tensor([0]), torch.tensor([0]))
    samples = diverse_reid_samples(rois, GT, torch.tensor([4]), match, diverse=False)
    assert samples.proposals.tolist() == [0]
    assert samples.weights.tolist() == [1.0]


def test_drsm_without_weighting_gives_every_sample_weight_one():
    rois = torch.tensor([_box_of_height(h) for h in (100.0, 85.0)])
    match = Match(torch.tensor([0]), torch.tensor([0]))
    samples = diverse_reid_samples(rois, GT, torch.tensor([4]), match, weighting=False)
    assert samples.proposals.tolist() == [0, 1]
    assert samples.weights.tolist() == [1.0, 1.0]


def test_drsm_on_an_image_without_persons_gives_no_samples():
    empty = Match(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    samples = diverse_reid_samples(
        torch.rand(3, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), empty
    )
    assert samples.proposals.numel() == samples.pids.numel() == samples.weights.numel() == 0
