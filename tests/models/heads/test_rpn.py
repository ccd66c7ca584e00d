"""The RPN: proposal selection per image (clip, size, own extent, NMS, top-N), the head's output
order, and the loss on a case worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.heads.anchors import AnchorConfig
from models.heads.rpn import ProposalConfig, RegionProposalNetwork, RPNConfig

# One square anchor of side 16 per location, at stride 16: centres (16 x, 16 y).
SQUARE = AnchorConfig(sizes=((16,),), aspect_ratios=(1.0,))


def _rpn(**changes) -> RegionProposalNetwork:
    config = RPNConfig(anchors=SQUARE, **changes)
    return RegionProposalNetwork(config, in_channels=4, stride=16, size_divisor=32).eval()


def _anchors(rpn: RegionProposalNetwork, height: int, width: int) -> torch.Tensor:
    return rpn.anchor_generator([(height, width)], [16])


def test_proposals_are_the_best_clipped_anchors_after_nms():
    """A 2 x 3 map: anchors (-8, -8, 8, 8) shifted to centres x 0, 16, 32 and y 0, 16; zero
    deltas; an image of 24 x 40 pixels. Clipped to it, anchor 5 (centre (32, 16)) is
    (24, 8, 40, 24). Every centre lies in the image's own padded extent (32 x 64), and no two
    of these boxes overlap, so NMS keeps all six; the 4 best by objectness remain."""
    rpn = _rpn(test=ProposalConfig(pre_nms_top_n=6, post_nms_top_n=4))
    anchors = _anchors(rpn, 2, 3)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 4.0]])
    proposals = rpn.propose(
        anchors, logits, torch.zeros(1, 6, 4), torch.tensor([[24.0, 40.0]]), rpn.config.test
    )
    assert proposals.scores.shape == (1, 4)
    torch.testing.assert_close(proposals.scores[0], torch.tensor([4.0, 3.0, 2.0, 1.0]).sigmoid())
    assert proposals.boxes[0].tolist() == [
        [24, 8, 40, 24],  # anchor 5 at (32, 16), clipped at y = 24
        [8, 0, 24, 8],  # anchor 1 at (16, 0)
        [0, 8, 8, 24],  # anchor 3 at (0, 16)
        [24, 0, 40, 8],  # anchor 2 at (32, 0)
    ]


def test_nms_removes_overlapping_proposals():
    """Deltas that move anchors 1 and 0 onto the same box: only the better one remains."""
    rpn = _rpn(test=ProposalConfig(pre_nms_top_n=6, post_nms_top_n=6))
    anchors = _anchors(rpn, 1, 2)  # centres x = 0 and 16
    deltas = torch.zeros(1, 2, 4)
    deltas[0, 0, 0] = 1.0  # anchor 0 moves right by one width (16 px): onto anchor 1
    logits = torch.tensor([[5.0, 1.0]])
    proposals = rpn.propose(anchors, logits, deltas, torch.tensor([[64.0, 64.0]]), rpn.config.test)
    assert (proposals.scores[0] > 0).sum() == 1
    assert proposals.boxes[0, 0].tolist() == [8, 0, 24, 8]


def test_tiny_proposals_and_anchors_outside_the_images_extent_are_dropped():
    """Image 0 is 24 x 24 in a larger batch: its own extent (rounded up to 32) is 32 x 32, so of
    the anchors centred at x, y in 0, 16, 32, ... only the four at x, y < 32 are its. The one at
    (0, 0) is shrunk below min_size (1e-3 px) by its deltas: three proposals remain."""
    rpn = _rpn(test=ProposalConfig(pre_nms_top_n=50, post_nms_top_n=50))
    anchors = _anchors(rpn, 4, 6)  # centres x in 0..80, y in 0..48
    deltas = torch.zeros(1, 24, 4)
    deltas[0, 0, 2] = -20.0  # anchor (0, 0): width x exp(-20 / 1), far below 1e-3 px
    proposals = rpn.propose(
        anchors, torch.zeros(1, 24), deltas, torch.tensor([[24.0, 24.0]]), rpn.config.test
    )
    kept = proposals.boxes[0][proposals.scores[0] > 0]
    # Centres (16, 0), (0, 16), (16, 16): inside 32 x 32 and not squashed.
    assert sorted(kept.tolist()) == [[0, 8, 8, 24], [8, 0, 24, 8], [8, 8, 24, 24]]


def test_an_images_proposals_do_not_depend_on_its_batch():
    """A 64 x 80 image is padded to 64 x 96 alone (a 4 x 6 map at stride 16) and to the batch's
    size next to a larger image: its proposals are the same."""
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(RPNConfig(), in_channels=8, stride=16).eval()
    alone = torch.randn(1, 8, 4, 6)
    alone[..., 5] = 0  # the padding column (80 to 96 pixels)
    batch = torch.zeros(2, 8, 7, 9)
    batch[0, :, :4, :6] = alone[0]
    batch[1] = torch.randn(8, 7, 9)
    with torch.no_grad():
        single, _ = rpn(alone, torch.tensor([[64.0, 80.0]]))
        batched, _ = rpn(batch, torch.tensor([[64.0, 80.0], [112.0, 144.0]]))
    assert (single.scores > 0).sum() > 10
    torch.testing.assert_close(batched.scores[:1], single.scores)
    torch.testing.assert_close(batched.boxes[:1], single.boxes)


def test_the_loss_on_a_hand_worked_case():
    """One GT box equal to the anchor centred at (16, 16) of a 3 x 3 map: IoU 1, the only
    positive. Squares of side 16 placed 16 apart do not overlap: the 8 others have IoU 0 and
    are negatives. With 256 samples all 9 are drawn: loss_rpn_cls is the mean BCE over them;
    the positive's deltas equal its targets (zero), so loss_rpn_reg is 0."""
    rpn = _rpn().train()
    anchors = _anchors(rpn, 3, 3)
    gt = anchors[4:5].clone()  # centre (16, 16)
    logits = torch.arange(9.0).view(1, 9) / 4
    losses = rpn.loss(anchors, logits, torch.zeros(1, 9, 4), [{"boxes": gt}])
    labels = torch.zeros(9)
    labels[4] = 1.0
    expected = F.binary_cross_entropy_with_logits(logits[0], labels)
    torch.testing.assert_close(losses["loss_rpn_cls"], expected)
    assert losses["loss_rpn_reg"].item() == 0.0


def test_the_box_loss_is_smooth_l1_over_the_drawn_anchors():
    """The positive's dx is off by 0.05 (< beta 1/9): 0.5 * 0.05^2 / beta, over 9 drawn."""
    rpn = _rpn().train()
    anchors = _anchors(rpn, 3, 3)
    deltas = torch.zeros(1, 9, 4)
    deltas[0, 4, 0] = 0.05
    losses = rpn.loss(anchors, torch.zeros(1, 9), deltas, [{"boxes": anchors[4:5].clone()}])
    expected = 0.5 * 0.05**2 / (1 / 9) / 9
    assert math.isclose(losses["loss_rpn_reg"].item(), expected, rel_tol=1e-5)


def test_the_head_predicts_one_objectness_and_four_deltas_per_anchor():
    rpn = RegionProposalNetwork(RPNConfig(), in_channels=8, stride=16)
    logits, deltas = rpn.head(torch.randn(2, 8, 3, 4))
    assert logits.shape == (2, 15, 3, 4) and deltas.shape == (2, 60, 3, 4)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        ProposalConfig(pre_nms_top_n=10, post_nms_top_n=20)
    with pytest.raises(ValueError, match="one feature level"):
        RegionProposalNetwork(
            RPNConfig(anchors=AnchorConfig(sizes=((32,), (64,)))), in_channels=8, stride=16
        )
