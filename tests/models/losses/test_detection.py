"""Focal and IoU losses, checked against values worked out by hand."""

import math

import pytest
import torch

from models.losses.detection import iou_loss, sigmoid_focal_loss

LN2 = math.log(2.0)


def test_focal_loss_at_even_odds_weighs_positives_by_alpha_and_negatives_by_one_minus_alpha():
    # logit 0 -> p = 0.5: cross entropy ln 2, modulating factor (1 - 0.5)^2 = 0.25.
    losses = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]))
    expected = torch.tensor([0.25 * 0.25 * LN2, 0.75 * 0.25 * LN2])
    torch.testing.assert_close(losses, expected)


def test_focal_loss_without_focusing_or_alpha_is_binary_cross_entropy():
    logits = torch.tensor([-2.0, 0.5, 3.0])
    targets = torch.tensor([0.0, 1.0, 1.0])
    losses = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
    # BCE: -log(1 - sigmoid(-2)) = log(1 + e^-2), -log(sigmoid(0.5)) = log(1 + e^-0.5), ...
    expected = torch.log1p(torch.exp(torch.tensor([-2.0, -0.5, -3.0])))
    torch.testing.assert_close(losses, expected)


def test_focal_loss_down_weights_easy_examples():
    # p = sigmoid(4) = 0.982 for a positive: (1 - p)^2 = 3.2e-4 times a small cross entropy.
    easy = sigmoid_focal_loss(torch.tensor([4.0]), torch.tensor([1.0]))
    hard = sigmoid_focal_loss(torch.tensor([-4.0]), torch.tensor([1.0]))
    p = 1 / (1 + math.exp(-4.0))
    assert easy.item() == pytest.approx(0.25 * (1 - p) ** 2 * -math.log(p), rel=1e-5)
    assert hard.item() == pytest.approx(0.25 * p**2 * -math.log(1 - p), rel=1e-5)


def test_focal_loss_reductions():
    logits, targets = torch.zeros(4), torch.tensor([1.0, 1.0, 0.0, 0.0])
    per_element = 0.25 * LN2 * torch.tensor([0.25, 0.25, 0.75, 0.75])
    total = sigmoid_focal_loss(logits, targets, reduction="sum")
    mean = sigmoid_focal_loss(logits, targets, reduction="mean")
    torch.testing.assert_close(total, per_element.sum())
    torch.testing.assert_close(mean, per_element.mean())


def test_focal_loss_rejects_mismatched_shapes_and_unknown_reduction():
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), reduction="max")


# pred (0, 0, 2, 2) and target (1, 1, 3, 3): intersection 1, union 4 + 4 - 1 = 7, IoU = 1/7;
# the enclosing box (0, 0, 3, 3) has area 9, so GIoU = 1/7 - (9 - 7)/9.
PRED = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
TARGET = torch.tensor([[1.0, 1.0, 3.0, 3.0]])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("iou", math.log(7.0)),
        ("linear_iou", 1 - 1 / 7),
        ("giou", 1 - (1 / 7 - 2 / 9)),
    ],
)
def test_iou_losses_of_two_overlapping_squares(kind, expected):
    loss = iou_loss(PRED, TARGET, kind=kind)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["iou", "linear_iou", "giou"])
def test_iou_losses_vanish_on_a_perfect_match(kind):
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(iou_loss(boxes, boxes.clone(), kind=kind), torch.zeros(2))


def test_giou_loss_keeps_pulling_boxes_that_do_not_overlap():
    # Disjoint unit squares 1 apart: IoU 0, enclosing box 3 x 1, union 2 -> GIoU = -1/3.
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    loss = iou_loss(pred, target, kind="giou")
    assert loss.item() == pytest.approx(1 + 1 / 3)
    loss.sum().backward()
    assert pred.grad[0, 2] < 0  # growing x2 towards the target lowers the loss


@pytest.mark.parametrize("kind", ["iou", "linear_iou", "giou"])
def test_degenerate_boxes_give_finite_losses_and_gradients(kind):
    # A point, an inverted box and an empty target: every IoU is 0, nothing may be NaN or inf.
    pred = torch.tensor(
        [[5.0, 5.0, 5.0, 5.0], [4.0, 4.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]], requires_grad=True
    )
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
    loss = iou_loss(pred, target, kind=kind)
    assert torch.isfinite(loss).all()
    if kind == "iou":
        torch.testing.assert_close(loss, torch.full((3,), -math.log(1e-6)))
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_iou_loss_weights_scale_each_pair_and_mean_of_no_pairs_is_zero():
    pred = torch.cat([PRED, TARGET])
    target = torch.cat([TARGET, TARGET])
    # Pair 0 has loss 6/7 and weight 2; pair 1 is a perfect match.
    weighted = iou_loss(pred, target, kind="linear_iou", weights=torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(weighted, torch.tensor([12 / 7, 0.0]))
    empty = iou_loss(torch.zeros(0, 4), torch.zeros(0, 4), kind="giou", reduction="mean")
    assert empty.item() == 0.0


def test_iou_loss_rejects_unknown_kind_and_misshapen_weights():
    with pytest.raises(ValueError, match="kind"):
        iou_loss(PRED, TARGET, kind="diou")
    with pytest.raises(ValueError, match="weights"):
        iou_loss(PRED, TARGET, weights=torch.ones(2))
