"""Triplet term of the triplet-aided OIM (AlignPS eq. 3) on hand-built 2-D points."""

import math

import pytest
import torch

from models.losses import OIMLoss, lut_triplet_loss

# One batch feature and one LUT centre per identity (margin 1 below):
#   identity 0: feature a = (0, 0), centre v0 = (2, 0)
#   identity 1: feature b = (0, 1), centre v1 = (3, 1)
# Distances: a-b 1, a-v0 2, a-v1 sqrt(10), b-v0 sqrt(5), b-v1 3, v0-v1 sqrt(2).
FEATURES = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
PIDS = torch.tensor([0, 1])
LUT = torch.tensor([[2.0, 0.0], [3.0, 1.0]])


def test_triplet_term_is_zero_when_every_positive_is_closer_than_negatives_by_the_margin():
    features = torch.tensor([[0.0, 0.0], [0.0, 0.2], [5.0, 0.0]])
    pids = torch.tensor([0, 0, 1])
    lut = torch.tensor([[0.1, 0.1], [5.0, 0.1]])
    # Within an identity all distances are below 0.3, across identities above 4.7: with margin
    # 1, M + D_pos - D_neg < 0 for every triplet.
    for mining in ("all", "hardest"):
        loss = lut_triplet_loss(features, pids, lut, margin=1.0, mining=mining)
        assert loss.item() == 0.0


def test_triplet_term_is_positive_when_a_negative_comes_within_the_margin():
    features = torch.tensor([[0.0, 0.0], [0.0, 0.2], [0.5, 0.0]])
    pids = torch.tensor([0, 0, 1])
    lut = torch.tensor([[0.1, 0.1], [0.5, 0.1]])
    # The identity-1 feature now lies 0.5 from the first feature, nearer than the margin 1 allows.
    for mining in ("all", "hardest"):
        assert lut_triplet_loss(features, pids, lut, margin=1.0, mining=mining).item() > 0


def test_hardest_mining_takes_the_farthest_positive_and_closest_negative_per_anchor():
    loss = lut_triplet_loss(FEATURES, PIDS, LUT, margin=1.0, mining="hardest")
    # anchor a: 1 + 2 - 1 = 2;            anchor b: 1 + 3 - 1 = 3
    # anchor v0: 1 + 2 - sqrt(2);         anchor v1: 1 + 3 - sqrt(2)
    expected = (2 + 3 + (3 - math.sqrt(2)) + (4 - math.sqrt(2))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hardest_mining_adds_one_lut_row_per_feature_as_the_released_code():
    # Identity 0 has two features, a1 = (0, 0) and a2 = (1, 0), so its centre v0 = (2, 0) is an
    # anchor twice; identity 1 has b = (0, 1) and v1 = (3, 1). Per anchor, margin 1:
    #   a1: farthest positive v0 (2), closest negative b (1)             -> 2
    #   a2: farthest positive a1 or v0 (1), closest negative b (sqrt 2)  -> 2 - sqrt 2
    #   b:  v1 (3), a1 (1)                                               -> 3
    #   v0 (twice): a1 (2), v1 (sqrt 2)                                  -> 3 - sqrt 2
    #   v1: b (3), v0 (sqrt 2)                                           -> 4 - sqrt 2
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = lut_triplet_loss(features, torch.tensor([0, 0, 1]), LUT, margin=1.0, mining="hardest")
    expected = (2 + (2 - math.sqrt(2)) + 3 + 2 * (3 - math.sqrt(2)) + (4 - math.sqrt(2))) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_all_mining_averages_the_hinge_over_every_valid_triplet():
    loss = lut_triplet_loss(FEATURES, PIDS, LUT, margin=1.0, mining="all")
    # Each anchor has one positive and two negatives: 8 triplets.
    hinges = [
        1 + 2 - 1, max(0.0, 1 + 2 - math.sqrt(10)),  # anchor a (pos v0; negs b, v1)
        1 + 3 - 1, 1 + 3 - math.sqrt(5),  # anchor b (pos v1; negs a, v0)
        1 + 2 - math.sqrt(5), 1 + 2 - math.sqrt(2),  # anchor v0 (pos a; negs b, v1)
        1 + 3 - math.sqrt(10), 1 + 3 - math.sqrt(2),  # anchor v1 (pos b; negs a, v0)
    ]  # fmt: skip
    assert loss.item() == pytest.approx(sum(hinges) / 8, rel=1e-6)


def test_triplets_are_weighted_by_their_anchor_and_a_centre_by_its_feature():
    weights = torch.tensor([2.0, 0.0])
    loss = lut_triplet_loss(FEATURES, PIDS, LUT, margin=1.0, mining="hardest", weights=weights)
    # Anchors a and v0 (identity 0, weight 2) count twice, b and v1 (weight 0) not at all.
    expected = (2 * 2 + 0 * 3 + 2 * (3 - math.sqrt(2)) + 0 * (4 - math.sqrt(2))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_a_single_identity_has_no_negatives_and_gives_a_zero_connected_to_the_features():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    for mining in ("all", "hardest"):
        loss = lut_triplet_loss(features, torch.tensor([0, 0]), LUT, margin=1.0, mining=mining)
        assert loss.item() == 0.0
        loss.backward()
        torch.testing.assert_close(features.grad, torch.zeros(2, 2))


def test_unknown_mining_mode_is_refused():
    with pytest.raises(ValueError, match="mining"):
        lut_triplet_loss(FEATURES, PIDS, LUT, margin=1.0, mining="semi-hard")


def test_oim_loss_adds_the_weighted_triplet_term_with_its_lut_and_ignores_unlabeled_samples():
    oim = OIMLoss(2, 2, 2, triplet_weight=0.5, triplet_margin=1.0, triplet_mining="hardest")
    oim.lut.copy_(LUT)
    # An unlabeled feature right on top of a takes no part in the triplets.
    features = torch.cat([FEATURES, torch.tensor([[0.0, 0.0]])])
    losses = oim(features, torch.tensor([0, 1, -1]))
    expected = 0.5 * (2 + 3 + (3 - math.sqrt(2)) + (4 - math.sqrt(2))) / 4
    assert set(losses) == {"loss_oim", "loss_triplet"}
    assert losses["loss_triplet"].item() == pytest.approx(expected, rel=1e-6)


def test_plain_oim_has_no_triplet_term():
    assert set(OIMLoss(2, 2, 2)(FEATURES, PIDS)) == {"loss_oim"}
