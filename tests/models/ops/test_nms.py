"""nms / batched_nms: greedy suppression by decreasing score, checked by hand and against loops."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.ops.nms import batched_nms, batched_nms_op, nms, nms_op
from models.ops.reference.roi import batched_nms_reference, nms_reference

# The package exports a function named `nms`, which shadows the submodule as an attribute.
nms_module = importlib.import_module("models.ops.nms")


def grid_boxes(generator, num_boxes, dtype=torch.float64):
    """Boxes on a coarse integer grid: many duplicates, exact ties and IoUs like 1/2 or 1/3."""
    corner = torch.randint(0, 12, (num_boxes, 2), generator=generator)
    size = torch.randint(0, 6, (num_boxes, 2), generator=generator)  # zero-area boxes included
    return torch.cat((corner, corner + size), dim=1).to(dtype)


def test_keeps_the_best_box_of_an_overlapping_pair_and_the_separate_one():
    """Box 0 and 1 overlap with IoU 81 / 119 ~ 0.68 > 0.5; box 2 is elsewhere."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.8, 0.9, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 2]


def test_an_iou_equal_to_the_threshold_does_not_suppress():
    """[0, 0, 2, 1] and [0, 0, 1, 1]: intersection 1, union 2, IoU exactly 0.5."""
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1]])
    scores = torch.tensor([1.0, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_the_threshold_is_compared_in_float64_like_torchvision():
    """[0, 0, 10, 1] vs [0, 0, 3, 1]: IoU 3 / 10. In float32 that is float32(0.3) =
    0.30000001192..., which is > 0.3, so the second box goes (torch's own float32 comparison
    would round 0.3 to that same value and keep it). In float64 3 / 10 == 0.3: it stays."""
    boxes = torch.tensor([[0.0, 0, 10, 1], [0, 0, 3, 1]])
    scores = torch.tensor([1.0, 0.5])
    assert nms(boxes.float(), scores.float(), 0.3).tolist() == [0]
    assert nms(boxes.double(), scores.double(), 0.3).tolist() == [0, 1]


def test_equal_scores_are_visited_in_input_order_so_the_first_duplicate_survives():
    boxes = torch.tensor([[0.0, 0, 4, 4], [5, 5, 9, 9], [0, 0, 4, 4], [0, 0, 4, 4]])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 0]


def test_zero_area_boxes_overlap_nothing_and_never_make_nan():
    boxes = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 2, 2]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.0).tolist() == [0, 1, 2]


def test_a_suppressed_box_does_not_suppress_others():
    """A chain: 0 suppresses 1, 1 would suppress 2, but 1 is gone, so 2 stays."""
    boxes = torch.tensor([[0.0, 0, 4, 1], [2, 0, 6, 1], [4, 0, 8, 1]])  # neighbours: IoU 1/3
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_boxes=st.integers(0, 60),
    iou_threshold=st.sampled_from([0.0, 1 / 3, 0.5, 0.7, 1.0]),
    block_size=st.sampled_from([4, 256]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_matches_the_reference_loop(seed, num_boxes, iou_threshold, block_size, dtype):
    """Blocks of 4 make the cross-block and within-block paths both run on small inputs."""
    generator = torch.Generator().manual_seed(seed)
    boxes = grid_boxes(generator, num_boxes, dtype)
    scores = torch.randint(0, 4, (num_boxes,), generator=generator).to(dtype)  # many ties
    categories = torch.randint(0, 3, (num_boxes,), generator=generator)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nms_module, "_BLOCK_SIZE", block_size)
        kept = nms(boxes, scores, iou_threshold)
        kept_per_category = batched_nms(boxes, scores, categories, iou_threshold)
    assert kept.tolist() == nms_reference(boxes, scores, iou_threshold).tolist()
    expected = batched_nms_reference(boxes, scores, categories, iou_threshold)
    assert kept_per_category.tolist() == expected.tolist()


def test_long_suppression_chains_across_many_blocks_match_the_reference():
    """Boxes sliding by one pixel, scores falling along the row: every box's fate hangs on its
    predecessor's, through 600 boxes and three blocks."""
    steps = torch.arange(600, dtype=torch.float64)
    boxes = torch.stack((steps, torch.zeros(600), steps + 3, torch.ones(600)), dim=1)
    scores = 1 - steps / 600
    kept = nms(boxes, scores, 0.4)  # neighbours: IoU 2 / 4 = 0.5; two apart: 1 / 5
    assert kept.tolist() == nms_reference(boxes, scores, 0.4).tolist() == list(range(0, 600, 2))


def test_batched_nms_never_suppresses_across_categories():
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4]])
    scores = torch.tensor([0.7, 0.9, 0.8])
    # Visited 1 (category 1), 2 (category 0), 0 (category 0, suppressed by 2).
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 2]


def test_empty_input_gives_no_indices():
    kept = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert kept.dtype == torch.int64 and kept.shape == (0,)


@pytest.mark.parametrize(
    ("boxes", "scores", "threshold", "error", "message"),
    [
        (torch.zeros(3, 5), torch.zeros(3), 0.5, ValueError, r"\(N, 4\)"),
        (torch.zeros(3, 4), torch.zeros(2), 0.5, ValueError, "scores"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3), 0.5, TypeError, "floating"),
        (torch.zeros(1, 4), torch.tensor([float("nan")]), 0.5, ValueError, "NaN"),
        (torch.zeros(1, 4), torch.zeros(1), -0.1, ValueError, "iou_threshold"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(boxes, scores, threshold, error, message):
    with pytest.raises(error, match=message):
        nms(boxes, scores, threshold)


def test_batched_nms_rejects_float_categories():
    with pytest.raises(TypeError, match="idxs"):
        batched_nms(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2), 0.5)


def test_torch_export_handles_the_data_dependent_number_of_kept_boxes():
    class Suppress(torch.nn.Module):
        def forward(self, boxes, scores):
            return nms(boxes, scores, 0.5)

    generator = torch.Generator().manual_seed(0)
    boxes = grid_boxes(generator, 40, torch.float32)
    scores = torch.rand(40, generator=generator)
    num_boxes = torch.export.Dim("num_boxes")
    exported = torch.export.export(
        Suppress(),
        (boxes[:10], scores[:10]),
        dynamic_shapes={"boxes": {0: num_boxes}, "scores": {0: num_boxes}},
    )
    assert torch.ops.psearch.nms.default in [node.target for node in exported.graph.nodes]
    assert torch.equal(exported.module()(boxes, scores), nms(boxes, scores, 0.5))


def test_op_registrations_pass_torch_library_opcheck():
    generator = torch.Generator().manual_seed(1)
    boxes = grid_boxes(generator, 30, torch.float32)
    scores = torch.rand(30, generator=generator)
    categories = torch.randint(0, 3, (30,), generator=generator)
    torch.library.opcheck(nms_op, (boxes, scores, 0.5))
    torch.library.opcheck(batched_nms_op, (boxes, scores, categories, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_precision_boxes_still_suppress_each_other(dtype):
    """Areas of 160000 pixels overflow float16: the overlaps are computed in float32, so the
    second box (IoU 9 / 11 with the first) is suppressed, as in float32."""
    boxes = torch.tensor([[100, 100, 500, 500], [140, 100, 540, 500], [600, 0, 700, 90]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes.to(dtype), scores.to(dtype), 0.5).tolist() == [0, 2]
    idxs = torch.tensor([0, 0, 1])
    assert batched_nms(boxes.to(dtype), scores.to(dtype), idxs, 0.5).tolist() == [0, 2]
