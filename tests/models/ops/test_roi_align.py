"""roi_align: torchvision's semantics, checked by hand on analytic maps and against the loops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.ops.reference.roi import roi_align_reference
from models.ops.roi_align import RoIAlign, roi_align, roi_align_op


def column_ramp(height: int = 8, width: int = 10, start: float = 0.0) -> torch.Tensor:
    """(1, 1, H, W) map whose value is ``start + x``: bilinear sampling of it returns x exactly."""
    ramp = start + torch.arange(width, dtype=torch.float64)
    return ramp.expand(height, width).reshape(1, 1, height, width).clone()


def rois_of(*boxes: tuple[float, float, float, float], batch_index: int = 0) -> torch.Tensor:
    return torch.tensor([(batch_index, *box) for box in boxes], dtype=torch.float64)


def gradients(output, inputs, grad_output):
    """Gradients of ``(output * grad_output).sum()``; zero for inputs the output ignores (the
    reference loops build no graph at all when every sample falls off the map)."""
    if not output.requires_grad:
        return [torch.zeros_like(tensor) for tensor in inputs]
    return torch.autograd.grad(
        output, inputs, grad_output, allow_unused=True, materialize_grads=True
    )


def random_rois(generator, num_rois, batch_size, image_height, image_width):
    """RoIs (K, 5) in image pixels: inside, partly or completely outside, zero-area, sub-pixel
    and inverted boxes, spread over the batch."""
    corner = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64)
    corner = corner * torch.tensor([image_width, image_height]) * 1.6 - 0.3 * torch.tensor(
        [image_width, image_height]
    )
    size = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64)
    kind = torch.randint(0, 5, (num_rois, 1), generator=generator)
    scale = torch.where(kind == 0, 0.0, 1.0)  # zero-area
    scale = torch.where(kind == 1, 0.3, scale)  # sub-pixel
    scale = torch.where(kind == 2, -0.2, scale)  # inverted
    scale = torch.where(kind >= 3, 0.7 * max(image_height, image_width), scale)
    batch_index = torch.randint(0, batch_size, (num_rois, 1), generator=generator)
    return torch.cat((batch_index.double(), corner, corner + size * scale), dim=1)


def test_aligned_true_samples_pixel_centres_on_a_ramp():
    """On f(y, x) = x every bin returns the mean x of its samples. With aligned=True the box
    [2, 6] covers feature pixels 2..5 whose centres sit at 2..5 (after the -0.5 shift the box
    spans [1.5, 5.5]): two bins of width 2 average to 2.5 and 4.5."""
    out = roi_align(column_ramp(), rois_of((2, 1, 6, 5)), (1, 2), sampling_ratio=2, aligned=True)
    assert out.flatten().tolist() == [2.5, 4.5]


def test_aligned_false_keeps_the_legacy_half_pixel_offset():
    """Without the shift the box spans [2, 6]: bins [2, 4] and [4, 6] average to 3.0 and 5.0."""
    out = roi_align(column_ramp(), rois_of((2, 1, 6, 5)), (1, 2), sampling_ratio=2, aligned=False)
    assert out.flatten().tolist() == [3.0, 5.0]


def test_spatial_scale_maps_image_pixels_to_the_feature_map():
    """Box y in [4, 12] image pixels at scale 0.5 is y in [2, 6] -> [1.5, 5.5] after the shift;
    on f = y the two bins average to 2.5 and 4.5."""
    row_ramp = column_ramp(height=10, width=8).transpose(2, 3).contiguous()
    out = roi_align(row_ramp, rois_of((0, 4, 8, 12)), (2, 1), spatial_scale=0.5, sampling_ratio=2)
    assert out.flatten().tolist() == [2.5, 4.5]


def test_samples_within_one_pixel_outside_read_the_edge_and_farther_ones_read_zero():
    """f = 10 + x, box x in [-2.5, 0.5] -> [-3, 0] after the shift, one bin. Adaptive sampling
    takes ceil(3 / 1) = 3 samples along x, at -2.5, -1.5 (below -1: read 0) and -0.5 (in
    [-1, 0]: clamped to x = 0, reads 10); the average still divides by 3: 10 / 3."""
    out = roi_align(column_ramp(start=10.0), rois_of((-2.5, 1, 0.5, 2)), 1)
    assert out.item() == pytest.approx(10 / 3, abs=1e-12)


def test_samples_past_the_last_pixel_read_the_last_pixel_until_one_pixel_outside():
    """W = 10, f = 10 + x: box x in [9.5, 11.5] -> [9, 11], two samples at 9.5 (clamped to the
    last column, 19) and 10.5 (> W: 0), average 9.5."""
    out = roi_align(column_ramp(start=10.0), rois_of((9.5, 1, 11.5, 2)), 1, sampling_ratio=2)
    assert out.item() == pytest.approx(9.5, abs=1e-12)


def test_aligned_false_raises_tiny_rois_to_one_pixel():
    """A zero-area box at (3, 2): aligned=False makes it 1 x 1, so its one sample sits at
    x = 3.5; aligned=True keeps it empty and adaptive sampling then takes no sample at all."""
    zero_area = rois_of((3, 2, 3, 2))
    assert roi_align(column_ramp(), zero_area, 1, aligned=False).item() == 3.5
    assert roi_align(column_ramp(), zero_area, 1, aligned=True).item() == 0.0


def test_rois_pick_their_image_by_batch_index():
    features = torch.stack((column_ramp()[0], column_ramp(start=100.0)[0]))
    out = roi_align(features, rois_of((2, 1, 6, 5), batch_index=1), (1, 2), sampling_ratio=2)
    assert out.flatten().tolist() == [102.5, 104.5]


def test_a_list_of_boxes_per_image_equals_the_k_by_5_form():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=generator, dtype=torch.float64)
    boxes = [torch.tensor([[0.5, 1.0, 4.0, 5.0]]), torch.tensor([[1, 1, 3, 2], [0, 0, 6, 5.5]])]
    boxes = [b.double() for b in boxes]
    as_rows = torch.cat(
        [torch.cat((torch.full((len(b), 1), i), b), 1) for i, b in enumerate(boxes)]
    )
    assert torch.equal(roi_align(features, boxes, 3), roi_align(features, as_rows.double(), 3))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    aligned=st.booleans(),
    sampling_ratio=st.sampled_from([-1, 0, 1, 2, 3]),
    spatial_scale=st.sampled_from([1.0, 0.5, 1 / 3]),
)
def test_matches_the_reference_loops_forward_and_backward(
    seed, aligned, sampling_ratio, spatial_scale
):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 4, 2, 5 / spatial_scale, 6 / spatial_scale)
    args = ((2, 3), spatial_scale, sampling_ratio, aligned)

    fast_input = features.clone().requires_grad_()
    slow_input = features.clone().requires_grad_()
    fast = roi_align(fast_input, rois, *args)
    slow = roi_align_reference(slow_input, rois, *args)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)

    grad_output = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
    (fast_grad,) = gradients(fast, [fast_input], grad_output)
    (slow_grad,) = gradients(slow, [slow_input], grad_output)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=1e-12)


def test_matches_the_reference_in_float32():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 7, 5, generator=generator)
    rois = random_rois(generator, 6, 2, 14, 10).float()
    fast = roi_align(features, rois, 3, 0.5, -1, True)
    slow = roi_align_reference(features, rois, 3, 0.5, -1, True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_gradcheck_wrt_input():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 2, 5, 4, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 3, 2, 10, 8)
    features.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, 2, 0.5, -1, True), (features,))


def test_empty_roi_set_gives_an_empty_output_and_a_zero_gradient():
    features = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = roi_align(features, torch.zeros(0, 5), (4, 2))
    assert out.shape == (0, 3, 4, 2)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_module_applies_its_configuration():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 2, 6, 6, generator=generator)
    rois = torch.tensor([[0.0, 1.0, 1.0, 9.0, 7.0]])
    module = RoIAlign((2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=False)
    assert torch.equal(module(features, rois), roi_align(features, rois, (2, 3), 0.5, 2, False))
    assert "spatial_scale=0.5" in repr(module)


@pytest.mark.parametrize(
    ("rois", "error", "message"),
    [
        (torch.zeros(3, 4), ValueError, r"\(K, 5\)"),
        (torch.tensor([[2.0, 0, 0, 1, 1]]), ValueError, "batch indices"),
        (torch.tensor([[0.5, 0, 0, 1, 1]]), ValueError, "batch indices"),
        (torch.tensor([[0.0, 0, float("nan"), 1, 1]]), ValueError, "NaN"),
        (torch.zeros(1, 5, dtype=torch.float64), TypeError, "dtype"),
    ],
)
def test_bad_rois_are_rejected_with_a_clear_message(rois, error, message):
    with pytest.raises(error, match=message):
        roi_align(torch.zeros(2, 1, 4, 4), rois, 2)


def test_bad_output_size_is_rejected():
    with pytest.raises(ValueError, match="output_size"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (0, 2))


def test_torch_export_keeps_the_op_with_a_dynamic_number_of_rois():
    class Pool(torch.nn.Module):
        def forward(self, features, rois):
            return roi_align(features, rois, (2, 2), 0.5, 2, True)

    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 3, 8, 8, generator=generator)
    rois = random_rois(generator, 7, 2, 16, 16).float()
    num_rois = torch.export.Dim("num_rois")
    exported = torch.export.export(
        Pool(), (features, rois[:3]), dynamic_shapes={"features": None, "rois": {0: num_rois}}
    )
    targets = [node.target for node in exported.graph.nodes]
    assert torch.ops.psearch.roi_align.default in targets
    assert torch.equal(exported.module()(features, rois), Pool()(features, rois))


def test_op_registration_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT tracing agree with
    the eager kernel, for a channels-last input too."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 3, 6, 7, generator=generator).to(memory_format=torch.channels_last)
    rois = random_rois(generator, 4, 2, 12, 14).float()
    args = (features.requires_grad_(), rois, 0.5, 2, 3, -1, True)
    torch.library.opcheck(roi_align_op, args)
