"""Box utilities: overlaps computed by hand, degenerate boxes, conversions and the box coder."""

import math

import pytest
import torch

from models.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_scale,
    box_xyxy_to_cxcywh,
    clip_boxes_to_image,
    decode_boxes,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    encode_boxes,
    generalized_box_iou,
)

A = [0.0, 0.0, 2.0, 2.0]
B = [1.0, 1.0, 3.0, 3.0]  # overlaps A in [1, 2] x [1, 2]
FAR = [2.0, 0.0, 3.0, 1.0]  # 1 x 1, disjoint from the unit box at the origin


def test_area_treats_inverted_boxes_as_empty():
    boxes = torch.tensor([[0.0, 0, 2, 3], [1, 1, 1, 5], [3, 0, 1, 2]])
    assert box_area(boxes).tolist() == [6.0, 0.0, 0.0]


def test_iou_and_giou_of_overlapping_squares():
    """Intersection 1, union 4 + 4 - 1 = 7: IoU 1/7. Enclosing box [0, 3]^2 has area 9:
    GIoU = 1/7 - (9 - 7)/9."""
    boxes1, boxes2 = torch.tensor([A], dtype=torch.float64), torch.tensor([B], dtype=torch.float64)
    assert box_iou(boxes1, boxes2).item() == pytest.approx(1 / 7)
    assert generalized_box_iou(boxes1, boxes2).item() == pytest.approx(1 / 7 - 2 / 9)


def test_giou_of_disjoint_boxes_is_negative():
    """Unit box at the origin and [2, 3] x [0, 1]: IoU 0, union 2, enclosing [0, 3] x [0, 1]
    area 3: GIoU = 0 - (3 - 2)/3 = -1/3."""
    unit, far = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([FAR])
    assert box_iou(unit, far).item() == 0.0
    assert generalized_box_iou(unit, far).item() == pytest.approx(-1 / 3)


def test_identical_boxes_have_iou_and_giou_one():
    boxes = torch.tensor([A, B])
    assert torch.diagonal(box_iou(boxes, boxes)).tolist() == [1.0, 1.0]
    assert torch.diagonal(generalized_box_iou(boxes, boxes)).tolist() == [1.0, 1.0]


def test_pairwise_overlaps_have_one_row_per_first_box():
    boxes1 = torch.tensor([A, B, FAR])
    boxes2 = torch.tensor([B, A])
    iou = box_iou(boxes1, boxes2)
    assert iou.shape == (3, 2)
    assert iou[0, 1].item() == 1.0 and iou[1, 0].item() == 1.0


def test_zero_area_boxes_give_zero_iou_finite_giou_and_finite_gradients():
    """A point box has union 0 with itself (0 / 0) and enclosing area 0: both ratios count 0."""
    point = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1]], requires_grad=True)
    line = torch.tensor([[0.0, 0, 0, 5], [4, 0, 4, 5]])  # zero width, apart: enclosing area 20
    iou = elementwise_box_iou(point, point)
    giou = elementwise_generalized_box_iou(point, point)
    assert iou.tolist() == [0.0, 0.0] and giou.tolist() == [0.0, 0.0]
    assert elementwise_generalized_box_iou(line[:1], line[1:]).item() == -1.0
    (iou.sum() + giou.sum()).backward()
    assert torch.isfinite(point.grad).all()


def test_elementwise_overlaps_equal_the_diagonal_of_the_pairwise_ones():
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(6, 2, generator=generator) * 10
    boxes1 = torch.cat((corner, corner + torch.rand(6, 2, generator=generator) * 5), 1)
    boxes2 = boxes1 + torch.randn(6, 4, generator=generator)
    torch.testing.assert_close(
        elementwise_box_iou(boxes1, boxes2), torch.diagonal(box_iou(boxes1, boxes2))
    )
    torch.testing.assert_close(
        elementwise_generalized_box_iou(boxes1, boxes2),
        torch.diagonal(generalized_box_iou(boxes1, boxes2)),
    )


def test_center_size_conversion_by_hand_and_back():
    xyxy = torch.tensor([[1.0, 2, 5, 8]])
    assert box_xyxy_to_cxcywh(xyxy).tolist() == [[3.0, 5.0, 4.0, 6.0]]
    assert torch.equal(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)


def test_clip_keeps_x_within_the_width_and_y_within_the_height():
    boxes = torch.tensor([[-5.0, -1, 50, 30], [3, 4, 5, 6]])
    clipped = clip_boxes_to_image(boxes, (20, 40))  # height 20, width 40
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 20.0], [3.0, 4.0, 5.0, 6.0]]


def test_clip_takes_a_size_per_image():
    boxes = torch.tensor([[-5.0, -1, 50, 30]]).expand(2, 1, 4)  # (B, N, 4)
    clipped = clip_boxes_to_image(boxes, torch.tensor([[[20, 40]], [[10, 60]]]))  # (B, 1, 2)
    assert clipped.tolist() == [[[0.0, 0.0, 40.0, 20.0]], [[0.0, 0.0, 50.0, 10.0]]]


def test_box_scale_turns_height_width_into_per_coordinate_factors():
    assert box_scale(torch.tensor([[20, 40], [10, 60]])).tolist() == [
        [40, 20, 40, 20],
        [60, 10, 60, 10],
    ]


def test_encode_by_hand_with_weights():
    """Proposal centre (5, 10), size 10 x 20; target centre (10, 10), size 20 x 10.
    dx = 10 * (10 - 5) / 10 = 5, dy = 0, dw = 5 * log(2), dh = 5 * log(1/2)."""
    proposal = torch.tensor([[0.0, 0, 10, 20]], dtype=torch.float64)
    target = torch.tensor([[0.0, 5, 20, 15]], dtype=torch.float64)
    deltas = encode_boxes(target, proposal, weights=(10.0, 10.0, 5.0, 5.0))
    expected = [5.0, 0.0, 5 * math.log(2), 5 * math.log(0.5)]
    assert deltas.flatten().tolist() == pytest.approx(expected)


def test_decode_inverts_encode():
    generator = torch.Generator().manual_seed(1)
    corner = torch.rand(8, 2, generator=generator, dtype=torch.float64) * 100
    proposals = torch.cat((corner, corner + 1 + torch.rand(8, 2, generator=generator) * 50), 1)
    jitter = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    centre_size = box_xyxy_to_cxcywh(proposals)
    targets = box_cxcywh_to_xyxy(
        torch.cat(
            (centre_size[:, :2] + 3 * jitter[:, :2], centre_size[:, 2:] * jitter[:, 2:].exp()), 1
        )
    )
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = encode_boxes(targets, proposals, weights)
    torch.testing.assert_close(decode_boxes(deltas, proposals, weights), targets)


def test_decode_clamps_the_predicted_scale_at_1000_over_16():
    """A huge dw is clamped to log(1000 / 16): the 10-pixel-wide box grows to 625 pixels."""
    proposal = torch.tensor([[0.0, 0, 10, 10]])
    decoded = decode_boxes(torch.tensor([[0.0, 0, 100.0, 0]]), proposal)
    width = (decoded[0, 2] - decoded[0, 0]).item()
    assert width == pytest.approx(625.0)


def test_encode_rejects_proposals_without_area():
    with pytest.raises(ValueError, match="positive width and height"):
        encode_boxes(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[0.0, 0, 0, 1]]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: box_iou(torch.zeros(2, 3), torch.zeros(2, 4)), r"\(N, 4\)"),
        (lambda: elementwise_box_iou(torch.zeros(2, 4), torch.zeros(3, 4)), "same shape"),
        (lambda: box_area(torch.zeros(5)), r"\(\.\.\., 4\)"),
    ],
)
def test_bad_shapes_are_rejected_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Two 400 x 400 boxes shifted by 40 pixels: IoU 360 * 400 / (2 * 160000 - 144000) = 9 / 11.
# Each area, 160000, is above float16's largest value (65504).
LARGE = [[100.0, 100.0, 500.0, 500.0], [140.0, 100.0, 540.0, 500.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_are_measured_in_float32(dtype):
    boxes = torch.tensor(LARGE, dtype=dtype)
    assert box_area(boxes).tolist() == [160000.0, 160000.0]
    iou = box_iou(boxes, boxes)
    assert iou.dtype == torch.float32
    assert iou[0, 1].item() == pytest.approx(9 / 11)
    # The enclosing box (440 x 400) holds no area beyond the union: GIoU = IoU, finite.
    giou = elementwise_generalized_box_iou(boxes[:1], boxes[1:])
    assert giou.item() == pytest.approx(9 / 11)
    assert elementwise_box_iou(boxes[:1], boxes[1:]).item() == pytest.approx(9 / 11)
    assert generalized_box_iou(boxes, boxes).isfinite().all()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_narrow_integer_boxes_are_measured_in_int32(dtype):
    """120 x 100 = 12000 overflows int8 and int16 (and 120 + 100 does int8's range)."""
    boxes = torch.tensor([[0, 0, 120, 100], [20, 0, 120, 100]], dtype=dtype)
    assert box_area(boxes).tolist() == [12000, 10000]
    assert box_area(boxes).dtype == torch.int32
    assert box_iou(boxes, boxes)[0, 1].item() == pytest.approx(10000 / 12000)
    assert box_xyxy_to_cxcywh(boxes)[0].tolist() == [60.0, 50.0, 120.0, 100.0]


def test_half_precision_deltas_decode_beyond_float16_s_range():
    """exp(4) * 1500 pixels = 81897 is above 65504: decoded in float32, the box stays finite."""
    proposal = torch.tensor([[0.0, 0.0, 1500.0, 100.0]], dtype=torch.float16)
    decoded = decode_boxes(torch.tensor([[0.0, 0.0, 4.0, 0.0]], dtype=torch.float16), proposal)
    assert decoded.dtype == torch.float32 and decoded.isfinite().all()
    assert (decoded[0, 2] - decoded[0, 0]).item() == pytest.approx(1500 * math.exp(4), rel=1e-3)
    deltas = encode_boxes(decoded.half(), proposal)
    assert deltas.dtype == torch.float32 and deltas.isfinite().all()


def test_float32_and_float64_boxes_keep_their_dtype():
    for dtype in (torch.float32, torch.float64):
        boxes = torch.tensor(LARGE, dtype=dtype)
        assert box_iou(boxes, boxes).dtype == box_area(boxes).dtype == dtype
