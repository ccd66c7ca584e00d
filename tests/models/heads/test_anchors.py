"""Anchors: base shapes and their order, placement on one or several levels, the order of a
head's flattened outputs, and the box coder."""

import math

import pytest
import torch

from models.heads.anchors import AnchorConfig, AnchorGenerator, BoxCoder, flatten_anchor_maps


def test_base_anchors_of_one_size_worked_out_by_hand():
    """Size 32, ratios (h / w) 0.5, 1, 2: area 32^2 each.

    ratio 0.5: w = 32 / sqrt(0.5) = 45.25, h = 32 * sqrt(0.5) = 22.63; half-sides 22.63 and
    11.31, rounded to 23 and 11 -> (-23, -11, 23, 11).
    ratio 1: (-16, -16, 16, 16).  ratio 2: the transpose of ratio 0.5 -> (-11, -23, 11, 23).
    """
    generator = AnchorGenerator(AnchorConfig(sizes=((32,),)))
    expected = [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    assert generator.base_anchors(0).tolist() == expected


def test_base_anchors_are_ratio_major_over_sizes_times_scales():
    """Sizes (32, 64) x scales (1, 2) = sizes 32, 64, 64, 128 per ratio; ratio-major order:
    all four square anchors come between the four wide and the four tall ones."""
    config = AnchorConfig(sizes=((32, 64),), scales=(1.0, 2.0), round_corners=False)
    base = AnchorGenerator(config).base_anchors(0)
    assert config.num_anchors == 12 and base.shape == (12, 4)
    squares = base[4:8]
    assert squares[:, 2].tolist() == [16, 32, 32, 64]  # half widths of 32, 64, 64, 128
    widths, heights = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    assert (widths[:4] > heights[:4]).all() and (widths[8:] < heights[8:]).all()
    torch.testing.assert_close(widths * heights, torch.tensor([32.0, 64, 64, 128] * 3) ** 2)


def test_retinanet_octave_scales_without_rounding():
    """RetinaNet's 9 anchors: one size, scales 2^0, 2^(1/3), 2^(2/3), three ratios."""
    scales = tuple(2 ** (i / 3) for i in range(3))
    config = AnchorConfig(sizes=((32,),), scales=scales, round_corners=False)
    base = AnchorGenerator(config).base_anchors(0)
    assert config.num_anchors == 9
    areas = (base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])
    expected = torch.tensor([(32 * s) ** 2 for s in scales] * 3)
    torch.testing.assert_close(areas, expected)


def test_anchors_are_placed_location_major_at_the_cells_corner():
    """A 1 x 2 map of stride 16, one size: location (0, 0) at (0, 0), location (0, 1) at
    (16, 0); each location's three anchors follow each other."""
    generator = AnchorGenerator(AnchorConfig(sizes=((32,),)))
    anchors = generator([(1, 2)], [16])
    assert anchors.tolist() == [
        [-23, -11, 23, 11],
        [-16, -16, 16, 16],
        [-11, -23, 11, 23],
        [-7, -11, 39, 11],
        [0, -16, 32, 16],
        [5, -23, 27, 23],
    ]


def test_several_levels_follow_each_other_with_their_own_sizes_and_offset():
    """Two levels (strides 8 and 16), one square anchor each, centred in their cells."""
    config = AnchorConfig(sizes=((8,), (32,)), aspect_ratios=(1.0,), offset=0.5)
    anchors = AnchorGenerator(config)([(2, 2), (1, 1)], [8, 16])
    assert anchors.shape == (5, 4)
    assert anchors[:4].tolist() == [[0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]]
    assert anchors[4].tolist() == [-8, -8, 24, 24]


def test_a_heads_outputs_flatten_in_the_anchors_order():
    """Output channel a * V + v of location (y, x) is value v of anchor a there."""
    batch, num_anchors, height, width = 1, 3, 2, 2
    deltas = torch.arange(batch * num_anchors * 4 * height * width).float()
    deltas = deltas.view(batch, num_anchors * 4, height, width)
    flat = flatten_anchor_maps([deltas], 4)  # (1, 12, 4)
    # Anchor index n = (y * W + x) * A + a.
    y, x, a = 1, 0, 2
    n = (y * width + x) * num_anchors + a
    assert flat[0, n].tolist() == [deltas[0, a * 4 + v, y, x].item() for v in range(4)]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trips(weights):
    coder = BoxCoder(weights)
    references = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 45.0, 25.0]])
    boxes = torch.tensor([[2.0, 1.0, 12.0, 25.0], [0.0, 10.0, 40.0, 30.0]])
    deltas = coder.encode(boxes, references)
    torch.testing.assert_close(coder.decode(deltas, references), boxes)


def test_box_coder_weights_scale_the_deltas():
    """A box shifted right by half a reference width: dx = wx * 0.5; doubled in size:
    dw = ww * log 2."""
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # centre +5 (half the width), twice the size
    deltas = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(box, reference)
    torch.testing.assert_close(deltas, torch.tensor([[5.0, 5.0, 5 * math.log(2), 5 * math.log(2)]]))


def test_invalid_anchor_configs_are_refused():
    with pytest.raises(ValueError, match="same number of sizes"):
        AnchorConfig(sizes=((32, 64), (128,)))
    with pytest.raises(ValueError, match="positive"):
        AnchorConfig(aspect_ratios=(0.0, 1.0))
    with pytest.raises(ValueError, match="configured for 1 levels"):
        AnchorGenerator(AnchorConfig())([(2, 2), (1, 1)], [16, 32])
