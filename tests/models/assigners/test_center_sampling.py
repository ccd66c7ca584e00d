"""FCOS center sampling: the clipped center square, the level's size range, smallest area wins."""

import pytest
import torch

from models.assigners import CenterSamplingAssigner, CenterSamplingConfig


def _grid(stride: int, height: int, width: int) -> torch.Tensor:
    """Location centers of a stride-`stride` map covering height x width pixels: (P, 2) x, y."""
    ys, xs = torch.meshgrid(
        torch.arange(0, height, stride) + stride // 2,
        torch.arange(0, width, stride) + stride // 2,
        indexing="ij",
    )
    return torch.stack((xs.flatten(), ys.flatten()), dim=1).float()


def _assign(assigner, points, gt_boxes, strides, level_ids=None):
    strides = torch.as_tensor(strides, dtype=torch.float).expand(points.shape[0])
    if level_ids is None:
        level_ids = torch.zeros(points.shape[0], dtype=torch.long)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float)
    return assigner(points=points, strides=strides, level_ids=level_ids, gt_boxes=gt_boxes)


def test_positives_are_the_locations_in_the_center_square():
    # Box (0, 0, 64, 128): center (32, 64); radius 1.5 x stride 8 = 12 pixels, so the region is
    # x in (20, 44), y in (52, 76). Stride-8 centers are 4, 12, 20, ...: x in {28, 36} and
    # y in {60, 68} -> 4 positives.
    points = _grid(8, 160, 96)
    assigned = _assign(
        CenterSamplingAssigner(CenterSamplingConfig()), points, [[0, 0, 64, 128.0]], 8
    )
    positives = points[assigned == 0]
    assert sorted(positives.tolist()) == [[28, 60], [28, 68], [36, 60], [36, 68]]
    assert (assigned[assigned != 0] == -1).all()


def test_center_square_is_clipped_to_the_box():
    # A narrow box (30, 30, 34, 40): the unclipped square (32 +- 12, 35 +- 12) would take (29, 35)
    # and (32, 41), but both lie outside the box.
    points = torch.tensor([[32.0, 35.0], [29.0, 35.0], [32.0, 41.0]])
    assigned = _assign(
        CenterSamplingAssigner(CenterSamplingConfig()), points, [[30, 30, 34, 40.0]], 8
    )
    assert assigned.tolist() == [0, -1, -1]


def test_size_ranges_send_each_box_to_one_level():
    # Two levels split at 64 pixels. The same point (20, 20) exists on level 0 (stride 8) and
    # level 1 (stride 16). Box 0 (0, 0, 40, 40): largest distance 20 <= 64 -> level 0.
    # Box 1 (-180, -180, 220, 220) is centred on (20, 20) too: largest distance 200 -> level 1.
    assigner = CenterSamplingAssigner(CenterSamplingConfig(size_ranges=(64.0,)))
    points = torch.tensor([[20.0, 20.0], [20.0, 20.0]])
    strides = torch.tensor([8.0, 16.0])
    level_ids = torch.tensor([0, 1])
    small = _assign(assigner, points, [[0, 0, 40, 40.0]], strides, level_ids)
    large = _assign(assigner, points, [[-180, -180, 220, 220.0]], strides, level_ids)
    assert small.tolist() == [0, -1]
    assert large.tolist() == [-1, 0]


def test_location_claimed_by_two_boxes_goes_to_the_smaller_one():
    points = torch.tensor([[50.0, 50.0]])
    gt_boxes = [[0, 0, 100, 100.0], [40, 40, 60, 60.0]]  # areas 10000 and 400
    assert _assign(
        CenterSamplingAssigner(CenterSamplingConfig()), points, gt_boxes, 8
    ).tolist() == [1]


def test_image_without_boxes_has_only_negatives():
    points = _grid(8, 32, 32)
    assigned = _assign(CenterSamplingAssigner(CenterSamplingConfig()), points, torch.zeros(0, 4), 8)
    assert assigned.shape == (16,) and (assigned == -1).all()


def test_a_level_without_a_size_range_is_a_clear_error():
    assigner = CenterSamplingAssigner(CenterSamplingConfig(size_ranges=(64.0,)))
    with pytest.raises(ValueError, match="2 levels"):
        _assign(assigner, torch.tensor([[4.0, 4.0]]), [[0, 0, 8, 8.0]], 32, torch.tensor([2]))


def test_size_ranges_must_ascend():
    with pytest.raises(ValueError, match="ascending"):
        CenterSamplingConfig(size_ranges=(128.0, 64.0))
