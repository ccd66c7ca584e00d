"""Loss-aware label assignment: the cost terms of eq. 1-4 and top-K selection, by hand."""

import math

import pytest
import torch
from pydantic import TypeAdapter

from models.assigners import (
    AssignerConfig,
    LLAAssigner,
    LLAConfig,
    assign_lowest_costs,
    build_assigner,
)

# Focal loss of logit 0 as a positive: alpha 0.25 x (1 - 0.5)^2 x ln 2.
FOCAL_AT_ZERO = 0.25 * 0.25 * math.log(2.0)


def test_each_gt_takes_its_k_cheapest_anchors_and_conflicts_go_to_the_lowest_cost():
    costs = torch.tensor(
        [
            [1.0, 5.0, 2.0, 9.0, 9.0],  # GT 0 picks anchors 0 (1) and 2 (2)
            [9.0, 3.0, 1.0, 4.0, 9.0],  # GT 1 picks anchors 2 (1) and 1 (3)
        ]
    )
    # Anchor 2 is picked by both: cost 2 for GT 0, 1 for GT 1 -> GT 1.
    assert assign_lowest_costs(costs, top_k=2).tolist() == [0, 1, 1, -1, -1]


def test_an_anchor_several_gts_chose_goes_to_the_cheapest_gt_of_its_column():
    # As the released code resolves conflicts: among all GTs, even one that did not choose it.
    costs = torch.tensor(
        [
            [1.0, 5.0, 9.0, 9.0],  # GT 0 picks anchors 0 and 1
            [2.0, 6.0, 9.0, 9.0],  # GT 1 picks anchors 0 and 1
            [0.5, 0.1, 0.2, 9.0],  # GT 2 picks anchors 1 and 2, not 0
        ]
    )
    # Anchor 0 (chosen by GTs 0 and 1) is cheapest for GT 2; anchor 1 (all three) too.
    assert assign_lowest_costs(costs, top_k=2).tolist() == [2, 2, 2, -1]


def test_k_larger_than_the_number_of_anchors_takes_them_all():
    costs = torch.tensor([[3.0, 1.0, 2.0]])
    assert assign_lowest_costs(costs, top_k=10).tolist() == [0, 0, 0]


def test_no_gt_or_no_anchor_gives_no_positive():
    assert assign_lowest_costs(torch.zeros(0, 4), top_k=3).tolist() == [-1] * 4
    assert assign_lowest_costs(torch.zeros(2, 0), top_k=3).shape == (0,)


def test_anchor_outside_the_box_pays_the_inbox_cost():
    # Same score (logit 0) and the same perfect box (IoU loss -log 1 = 0) for both anchors; only
    # the anchor point differs: (5, 5) is inside GT (0, 0, 10, 10), (15, 5) is not.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    costs = LLAAssigner(LLAConfig(inbox_cost=100.0)).cost_matrix(
        points=torch.tensor([[5.0, 5.0], [15.0, 5.0]]),
        gt_boxes=gt,
        cls_logits=torch.zeros(2),
        pred_boxes=gt.expand(2, 4),
    )
    torch.testing.assert_close(costs, torch.tensor([[FOCAL_AT_ZERO, FOCAL_AT_ZERO + 100.0]]))


def test_defaults_are_the_released_codes():
    # The paper: lambda 1.3 for FCOS, C_inbox 10^2; the authors' released LLA.FCOS: 1.5, 10^3.
    config = LLAConfig()
    assert (config.top_k, config.reg_weight, config.inbox_cost) == (10, 1.5, 1000.0)
    assert config.reg_cost == "iou"


def test_cost_adds_lambda_times_the_iou_loss():
    # Predicted (0, 0, 10, 5) against GT (0, 0, 10, 10): IoU 1/2, IoU loss -log(1/2) = ln 2.
    costs = LLAAssigner(LLAConfig(reg_weight=1.3)).cost_matrix(
        points=torch.tensor([[5.0, 2.0]]),
        gt_boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        cls_logits=torch.zeros(1),
        pred_boxes=torch.tensor([[0.0, 0.0, 10.0, 5.0]]),
    )
    assert costs.item() == pytest.approx(FOCAL_AT_ZERO + 1.3 * math.log(2.0), rel=1e-6)


def test_no_center_prior_a_confident_off_center_anchor_beats_a_poor_central_one():
    # Anchor 0 sits at the box center but scores badly and predicts a poor box; anchor 1 is near
    # a corner (like a visible head of an occluded person) with a good score and a perfect box.
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    assigned = LLAAssigner(LLAConfig(top_k=1))(
        points=torch.tensor([[50.0, 50.0], [5.0, 5.0]]),
        gt_boxes=gt,
        cls_logits=torch.tensor([-5.0, 5.0]),
        pred_boxes=torch.tensor([[40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 100.0, 100.0]]),
        strides=torch.tensor([8.0, 8.0]),
        level_ids=torch.tensor([0, 0]),
    )
    assert assigned.tolist() == [-1, 0]


def test_inbox_term_is_a_penalty_not_a_ban():
    # A GT (21, 21, 23, 23) that holds no anchor point still gets its K cheapest anchors: the
    # penalty is equal for all of them, so the best box wins.
    points = torch.tensor([[20.0, 20.0], [28.0, 20.0], [100.0, 100.0]])
    assigned = LLAAssigner(LLAConfig(top_k=1))(
        points=points,
        gt_boxes=torch.tensor([[21.0, 21.0, 23.0, 23.0]]),
        cls_logits=torch.zeros(3),
        pred_boxes=torch.tensor(
            [[0.0, 0.0, 1.0, 1.0], [21.0, 21.0, 23.0, 23.0], [21.0, 21.0, 22.0, 22.0]]
        ),
    )
    assert assigned.tolist() == [-1, 0, -1]


def test_assignment_does_not_track_gradients():
    logits = torch.zeros(2, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 8.0, 8.0]], requires_grad=True)
    assigner = LLAAssigner(LLAConfig())
    assigned = assigner(
        points=torch.tensor([[5.0, 5.0], [6.0, 6.0]]),
        gt_boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        cls_logits=logits,
        pred_boxes=boxes,
    )
    assert assigned.tolist() == [0, 0] and not assigned.requires_grad


def test_config_selects_the_assigner_by_name():
    adapter = TypeAdapter(AssignerConfig)
    lla = adapter.validate_python({"name": "lla", "top_k": 5})
    center = adapter.validate_python({"name": "center_sampling", "radius": 2.0})
    assert isinstance(build_assigner(lla), LLAAssigner) and lla.top_k == 5
    assert type(build_assigner(center)).__name__ == "CenterSamplingAssigner"
    with pytest.raises(ValueError, match="atss"):
        adapter.validate_python({"name": "atss"})
