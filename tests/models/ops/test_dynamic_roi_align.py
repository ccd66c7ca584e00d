"""dynamic_roi_align: RoIAlign with a learned (dx, dy) per bin, in units of the RoI's size."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.ops.dynamic_roi_align import dynamic_roi_align, dynamic_roi_align_op
from models.ops.reference.roi import dynamic_roi_align_reference
from models.ops.roi_align import roi_align


def ramp(height: int = 8, width: int = 12, along: str = "x") -> torch.Tensor:
    """(1, 1, H, W) map equal to x (or y): bilinear sampling returns the coordinate itself."""
    values = torch.arange(width if along == "x" else height, dtype=torch.float64)
    grid = values.expand(height, width) if along == "x" else values[:, None].expand(height, width)
    return grid.reshape(1, 1, height, width).clone()


def random_rois(generator, num_rois, batch_size, image_height, image_width):
    """RoIs (K, 5) in image pixels: inside, partly outside, zero-area and sub-pixel boxes."""
    extent = torch.tensor([image_width, image_height], dtype=torch.float64)
    corner = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 1.4 * extent
    corner = corner - 0.2 * extent
    size = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64)
    kind = torch.randint(0, 4, (num_rois, 1), generator=generator)
    scale = torch.where(kind == 0, 0.0, 0.6 * extent.max())  # zero-area or up to 0.6 x image
    scale = torch.where(kind == 1, 0.3, scale)  # sub-pixel
    batch_index = torch.randint(0, batch_size, (num_rois, 1), generator=generator)
    return torch.cat((batch_index.double(), corner, corner + size * scale), dim=1)


def gradients(output, inputs, grad_output):
    """Gradients of ``(output * grad_output).sum()``; zero for inputs the output ignores (the
    reference loops build no graph at all when every sample falls off the map)."""
    if not output.requires_grad:
        return [torch.zeros_like(tensor) for tensor in inputs]
    return torch.autograd.grad(
        output, inputs, grad_output, allow_unused=True, materialize_grads=True
    )


ONE_ROI = torch.tensor([[0.0, 2, 1, 6, 5]], dtype=torch.float64)  # 4 x 4 pixels


def test_dx_moves_every_sample_right_by_a_fraction_of_the_roi_width():
    """Without offsets the bins of box x in [2, 6] average x = 2.5 and 4.5 (see roi_align).
    dx = 0.25 moves each bin by 0.25 * roi_w = 0.25 * 4 = 1 pixel: 3.5 and 5.5."""
    offsets = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    offsets[..., 0] = 0.25
    out = dynamic_roi_align(ramp(along="x"), ONE_ROI, offsets, (1, 2), sampling_ratio=2)
    assert out.flatten().tolist() == [3.5, 5.5]


def test_offsets_are_dx_then_dy():
    """On f = y only dy matters: dy = -0.25 moves the bin up by one pixel (box y in [1, 5],
    one bin, mean y 2.5 -> 1.5); dx changes nothing."""
    offsets = torch.tensor([[[[0.3, -0.25]]]], dtype=torch.float64)
    out = dynamic_roi_align(ramp(along="y"), ONE_ROI, offsets, 1, sampling_ratio=2)
    assert out.item() == 1.5


def test_each_bin_moves_on_its_own():
    offsets = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    offsets[0, 1, 0, 0] = 0.5  # bin (ph=1, pw=0) by half the RoI width = 2 pixels
    moved = dynamic_roi_align(ramp(), ONE_ROI, offsets, 2, sampling_ratio=2)
    still = roi_align(ramp(), ONE_ROI, 2, sampling_ratio=2)
    assert (moved - still).flatten().tolist() == [0.0, 0.0, 2.0, 0.0]


def test_with_aligned_false_the_unit_is_the_roi_size_raised_to_one_pixel():
    """A zero-area box at (3, 2) becomes 1 x 1 with aligned=False; its sample at x = 3.5 moves
    by dx * 1 = 2 pixels."""
    offsets = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)
    zero_area = torch.tensor([[0.0, 3, 2, 3, 2]], dtype=torch.float64)
    out = dynamic_roi_align(ramp(), zero_area, offsets, 1, sampling_ratio=1, aligned=False)
    assert out.item() == 5.5


def test_offsets_that_push_every_sample_off_the_map_read_zero_and_have_no_gradient():
    offsets = torch.full((1, 2, 2, 2), 3.0, dtype=torch.float64, requires_grad=True)
    out = dynamic_roi_align(ramp() + 1, ONE_ROI, offsets, 2, sampling_ratio=2)
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), offsets)
    assert torch.equal(grad, torch.zeros_like(grad))


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    aligned=st.booleans(),
    sampling_ratio=st.sampled_from([-1, 1, 2]),
    spatial_scale=st.sampled_from([1.0, 0.5]),
)
def test_zero_offsets_give_exactly_roi_align(seed, aligned, sampling_ratio, spatial_scale):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 6, 7, generator=generator)
    rois = random_rois(generator, 5, 2, 6 / spatial_scale, 7 / spatial_scale).float()
    args = ((3, 2), spatial_scale, sampling_ratio, aligned)
    zero = torch.zeros(5, 3, 2, 2)
    assert torch.equal(
        dynamic_roi_align(features, rois, zero, *args), roi_align(features, rois, *args)
    )


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    aligned=st.booleans(),
    sampling_ratio=st.sampled_from([-1, 1, 2]),
    spatial_scale=st.sampled_from([1.0, 0.5, 1 / 3]),
    offset_scale=st.sampled_from([0.1, 0.5, 2.0]),
)
def test_matches_the_reference_loops_forward_and_backward(
    seed, aligned, sampling_ratio, spatial_scale, offset_scale
):
    """Offsets up to 2 RoI sizes push many samples off the map or into the clamped border."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 2, 5, 6, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 3, 2, 5 / spatial_scale, 6 / spatial_scale)
    offsets = torch.randn(3, 2, 3, 2, generator=generator, dtype=torch.float64) * offset_scale
    args = ((2, 3), spatial_scale, sampling_ratio, aligned)

    fast_inputs = [features.clone().requires_grad_(), offsets.clone().requires_grad_()]
    slow_inputs = [features.clone().requires_grad_(), offsets.clone().requires_grad_()]
    fast = dynamic_roi_align(fast_inputs[0], rois, fast_inputs[1], *args)
    slow = dynamic_roi_align_reference(slow_inputs[0], rois, slow_inputs[1], *args)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)

    grad_output = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
    for fast_grad, slow_grad in zip(
        gradients(fast, fast_inputs, grad_output),
        gradients(slow, slow_inputs, grad_output),
        strict=True,
    ):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=1e-11)


def test_matches_the_reference_in_float32():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 3, 6, 6, generator=generator)
    rois = random_rois(generator, 4, 1, 12, 12).float()
    offsets = torch.randn(4, 2, 2, 2, generator=generator) * 0.3
    fast = dynamic_roi_align(features, rois, offsets, 2, 0.5)
    slow = dynamic_roi_align_reference(features, rois, offsets, 2, 0.5)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_gradcheck_wrt_input_and_offsets():
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 2, 5, 5, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 3, 2, 10, 10)
    offsets = torch.randn(3, 2, 2, 2, generator=generator, dtype=torch.float64) * 0.2
    features.requires_grad_()
    offsets.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, o: dynamic_roi_align(x, rois, o, 2, 0.5, -1, True), (features, offsets)
    )


def test_empty_roi_set_gives_an_empty_output_and_zero_gradients():
    features = torch.randn(1, 3, 5, 5, requires_grad=True)
    offsets = torch.zeros(0, 2, 3, 2, requires_grad=True)
    out = dynamic_roi_align(features, torch.zeros(0, 5), offsets, (2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    assert offsets.grad.shape == (0, 2, 3, 2)


@pytest.mark.parametrize(
    ("offsets", "error", "message"),
    [
        (torch.zeros(2, 2, 2, 2), ValueError, r"\(K, oh, ow, 2\)"),
        (torch.zeros(1, 3, 2, 2), ValueError, r"\(K, oh, ow, 2\)"),
        (torch.zeros(1, 2, 2, 2, dtype=torch.float64), TypeError, "dtype"),
        (torch.full((1, 2, 2, 2), float("inf")), ValueError, "infinite"),
    ],
)
def test_bad_offsets_are_rejected_with_a_clear_message(offsets, error, message):
    rois = torch.tensor([[0.0, 0, 0, 2, 2]])
    with pytest.raises(error, match=message):
        dynamic_roi_align(torch.zeros(1, 1, 4, 4), rois, offsets, 2)


def test_torch_export_keeps_the_op_with_a_dynamic_number_of_rois():
    class Pool(torch.nn.Module):
        def forward(self, features, rois, offsets):
            return dynamic_roi_align(features, rois, offsets, (2, 2), 0.5, 2, True)

    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, 3, 8, 8, generator=generator)
    rois = random_rois(generator, 6, 2, 16, 16).float()
    offsets = torch.randn(6, 2, 2, 2, generator=generator) * 0.2
    num_rois = torch.export.Dim("num_rois")
    exported = torch.export.export(
        Pool(),
        (features, rois[:3], offsets[:3]),
        dynamic_shapes={"features": None, "rois": {0: num_rois}, "offsets": {0: num_rois}},
    )
    targets = [node.target for node in exported.graph.nodes]
    assert torch.ops.psearch.dynamic_roi_align.default in targets
    expected = Pool()(features, rois, offsets)
    assert torch.equal(exported.module()(features, rois, offsets), expected)


def test_op_registration_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT tracing agree with
    the eager kernel, for a channels-last input too."""
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(2, 3, 6, 7, generator=generator).to(memory_format=torch.channels_last)
    rois = random_rois(generator, 4, 2, 12, 14).float()
    offsets = torch.randn(4, 2, 3, 2, generator=generator) * 0.2
    args = (features.requires_grad_(), rois, offsets.requires_grad_(), 0.5, -1, True)
    torch.library.opcheck(dynamic_roi_align_op, args)
