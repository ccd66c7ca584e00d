"""The Triton dynamic RoIAlign kernel (run in Triton's interpreter) against the PyTorch op."""

import pytest
import torch

from export.kernels.dynamic_roi_align import BLOCK_C, BLOCK_S, dynamic_roi_align_triton
from models.ops.dynamic_roi_align import dynamic_roi_align_op
from models.ops.roi_align import roi_align_op


def ramp_map(height: int = 6, width: int = 8, channels: int = 1) -> torch.Tensor:
    """(1, C, H, W) with value x + 10 * y + c: bilinear interpolation reproduces it exactly, so
    a bin's value is the value at the mean of its sample positions (inside the map)."""
    y = torch.arange(height, dtype=torch.float32).view(height, 1)
    x = torch.arange(width, dtype=torch.float32)
    c = torch.arange(channels, dtype=torch.float32).view(channels, 1, 1)
    return (x + 10 * y + c).unsqueeze(0)


# RoI (x1, y1, x2, y2) = (1.5, 1.5, 5.5, 3.5) with the half-pixel shift starts at (1, 1) and is
# 4 wide and 2 high; cut into 1 x 2 bins of 2 x 2 pixels with 2 x 2 samples per bin, the samples
# of bin 0 sit at x in {1.5, 2.5}, y in {1.5, 2.5} (mean (2, 2): value 22) and those of bin 1 at
# x in {3.5, 4.5} (mean (4, 2): 24). An offset (dx, dy) moves a bin by (4 dx, 2 dy) pixels.
RAMP_ROI = torch.tensor([[0.0, 1.5, 1.5, 5.5, 3.5]])


def pool_ramp(offsets: list[list[float]], channels: int = 1) -> torch.Tensor:
    """The two bins of RAMP_ROI, given the (dx, dy) of each: (C, 2)."""
    offsets = torch.tensor([[offsets]])  # (1, 1, 2, 2)
    out = dynamic_roi_align_triton(ramp_map(channels=channels), RAMP_ROI, offsets, 1.0, 2, True)
    return out[0, :, 0, :]


def test_bins_average_their_samples_and_move_by_offsets_in_roi_units():
    # Zero offsets: 22 and 24 (see RAMP_ROI). Bin 0 moved by dy = -0.25: half a pixel up, mean
    # y 1.5 -> 2 + 15 = 17. Bin 1 moved by dx = 0.25: one pixel right, mean x 5 -> 5 + 20 = 25.
    assert pool_ramp([[0.0, 0.0], [0.0, 0.0]]).tolist() == [[22.0, 24.0]]
    assert pool_ramp([[0.0, -0.25], [0.25, 0.0]]).tolist() == [[17.0, 25.0]]


def test_samples_past_the_last_pixel_are_clamped_and_beyond_one_pixel_read_zero():
    # Bin 1 with dx = 0.75 starts at x = 3 + 3 = 6: samples at x = 6.5 and 7.5; 7.5 lies within
    # one pixel of the last column (7) and is clamped onto it: mean x (6.5 + 7) / 2 = 6.75,
    # value 26.75.
    assert pool_ramp([[0.0, 0.0], [0.75, 0.0]])[0, 1].item() == pytest.approx(26.75)
    # With dx = 1 the samples sit at x = 7.5 (clamped to 7) and 8.5 (> W = 8: reads 0); the zeros
    # count in the average: (7 + 15 + 7 + 25 + 0 + 0) / 4 = 13.5.
    assert pool_ramp([[0.0, 0.0], [1.0, 0.0]])[0, 1].item() == pytest.approx(13.5)
    # dx = 2 moves bin 0 eight pixels right: every sample is off the map.
    assert pool_ramp([[2.0, 0.0], [0.0, 0.0]])[0, 0].item() == 0.0


def test_channels_beyond_one_block_are_pooled_too():
    channels = BLOCK_C + 6  # a full block and a partial one
    out = pool_ramp([[0.0, 0.0], [0.0, 0.0]], channels=channels)
    # Channel c adds c to the ramp: (22 + c, 24 + c).
    expected = torch.tensor([22.0, 24.0]) + torch.arange(channels, dtype=torch.float32)[:, None]
    torch.testing.assert_close(out, expected)


def adversarial_rois() -> torch.Tensor:
    """RoIs on two 10 x 12 maps at spatial scale 0.5 (boxes in a 20 x 24 image)."""
    return torch.tensor(
        [
            [0, 3.0, 2.0, 15.0, 11.0],  # inside
            [1, -9.0, -4.0, 6.0, 7.0],  # partly left of and above the map
            [0, 30.0, 26.0, 44.0, 40.0],  # entirely outside
            [1, 10.0, 9.0, 7.0, 5.0],  # inverted: no samples when adaptive and aligned
            [1, 1.0, 1.0, 1.6, 1.4],  # smaller than a pixel: sizes raised to 1 unless aligned
            [0, 0.0, 0.0, 24.0, 20.0],  # the whole map: see below
        ]
    )


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 3])
def test_matches_the_pytorch_op_on_adversarial_rois_and_offsets(sampling_ratio, aligned):
    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    features = torch.randn(2, 3, 10, 12, generator=generator)
    rois = adversarial_rois()
    offsets = torch.randn(len(rois), 1, 2, 2, generator=generator) * 0.4
    offsets[0, 0, 1] = torch.tensor([3.0, -2.5])  # pushes a bin far off the map
    # The whole-map RoI's 1 x 2 bins are 6 x 10 feature pixels: with the adaptive grid, 60
    # samples per bin, taken in several chunks of BLOCK_S.
    assert 2 * BLOCK_S < 6 * 10

    args = (features, rois, offsets, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(
        dynamic_roi_align_triton(*args), dynamic_roi_align_op(*args), rtol=1e-5, atol=1e-5
    )


def test_zero_offsets_give_plain_roi_align():
    features = torch.randn(1, 2, 7, 9, generator=torch.Generator().manual_seed(1))
    rois = torch.tensor([[0, 1.0, 0.5, 7.0, 6.0], [0, -2.0, 3.0, 4.0, 9.0]])
    offsets = torch.zeros(2, 2, 1, 2)
    expected = roi_align_op(features, rois, 1.0, 2, 1, -1, True)
    torch.testing.assert_close(
        dynamic_roi_align_triton(features, rois, offsets, 1.0, -1, True),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )


def test_float16_input_is_computed_in_float32_and_rounded_once():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 10, 12, generator=generator).half()
    rois = adversarial_rois()[:3].half()
    offsets = (torch.randn(3, 1, 2, 2, generator=generator) * 0.4).half()

    out = dynamic_roi_align_triton(features, rois, offsets, 0.5, -1, True)

    assert out.dtype == torch.float16
    # The exact answer for these (float16) values: only the final rounding to float16 differs.
    exact = dynamic_roi_align_op(features.float(), rois.float(), offsets.float(), 0.5, -1, True)
    torch.testing.assert_close(out.float(), exact, rtol=1e-3, atol=1e-3)


def test_no_rois_give_an_empty_output():
    out = dynamic_roi_align_triton(
        torch.randn(1, 4, 5, 5), torch.zeros(0, 5), torch.zeros(0, 2, 3, 2), 1.0, -1, True
    )
    assert out.shape == (0, 4, 2, 3)


def test_bad_inputs_raise_clear_errors():
    features, rois, offsets = torch.randn(1, 2, 5, 5), RAMP_ROI, torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match="float32 or float16"):
        dynamic_roi_align_triton(features.double(), rois.double(), offsets.double(), 1, -1, True)
    with pytest.raises(ValueError, match="offsets must have shape"):
        dynamic_roi_align_triton(features, rois, torch.zeros(1, 1, 2, 3), 1.0, -1, True)
    with pytest.raises(ValueError, match="NaN"):
        dynamic_roi_align_triton(features, rois, torch.full_like(offsets, torch.nan), 1, -1, True)
    with pytest.raises(ValueError, match="batch indices"):
        dynamic_roi_align_triton(
            features, rois + torch.tensor([1.0, 0, 0, 0, 0]), offsets, 1, -1, 1
        )
