"""Triton deformable convolution kernels, run in Triton's interpreter, against the PyTorch op."""

from dataclasses import dataclass

import pytest
import torch

from export.kernels.deform_conv import (
    IM2COL_BLOCK_C,
    deform_conv2d_triton,
    deform_gemm,
)
from models.ops.deform_conv import deform_conv2d


def ramp_image(height: int = 3, width: int = 4) -> torch.Tensor:
    """(1, 1, H, W) with value x + 10 * y: bilinear interpolation reproduces it exactly where
    all four neighbours are inside the image."""
    y = torch.arange(height, dtype=torch.float32).view(height, 1)
    x = torch.arange(width, dtype=torch.float32)
    return (x + 10 * y).view(1, 1, height, width)


def sample_ramp(dy: float, dx: float, mask: float | None = None) -> torch.Tensor:
    """A 1x1 deformable convolution with weight 1 moving every sample by (dy, dx): (3, 4)."""
    offset = torch.tensor([dy, dx]).view(1, 2, 1, 1).expand(1, 2, 3, 4)
    modulation = None if mask is None else torch.full((1, 1, 3, 4), mask)
    out = deform_conv2d_triton(
        ramp_image(), offset, torch.ones(1, 1, 1, 1), None, (1, 1), (0, 0), (1, 1), modulation
    )
    return out[0, 0]


def test_samples_are_bilinear_over_a_zero_padded_image():
    out = sample_ramp(0.5, 0.25)
    # Output pixel (oy, ox) samples (oy + 0.5, ox + 0.25).
    assert out[0, 0].item() == pytest.approx(0.25 + 10 * 0.5)  # all neighbours inside
    # (1.5, 3.25): the right neighbours (x = 4) are outside and read 0, so only the left column
    # (weight 0.75) counts: 0.75 * (3 + 10 * 1.5) = 13.5.
    assert out[1, 3].item() == pytest.approx(13.5)
    # (2.5, 3.25): only the top-left neighbour (2, 3) is inside: 0.5 * 0.75 * 23 = 8.625.
    assert out[2, 3].item() == pytest.approx(8.625)


def test_the_mask_scales_samples_and_far_offsets_read_zero():
    assert sample_ramp(0.5, 0.25, mask=0.5)[0, 0].item() == pytest.approx(0.5 * 5.25)
    assert sample_ramp(-1.0, 0.0).tolist()[0] == [0.0] * 4  # row -1 is padding
    assert sample_ramp(0.0, 1e6).abs().max().item() == 0.0


@dataclass(frozen=True)
class Case:
    """The shapes and options of one call; offsets are standard normal times ``offset_scale``."""

    batch: int = 1
    in_channels: int = 4
    out_channels: int = 6
    size: tuple[int, int] = (5, 6)
    kernel: tuple[int, int] = (3, 3)
    groups: int = 1
    offset_groups: int = 1
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    with_mask: bool = True

    def output_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, kernel, stride, pad, dilation in zip(
                self.size, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )

    def arguments(self, seed: int, dtype: torch.dtype = torch.float32) -> tuple:
        """Random arguments for deform_conv2d, positional, in its order."""
        generator = torch.Generator().manual_seed(seed)
        taps = self.kernel[0] * self.kernel[1]
        per_pixel = (self.batch, self.offset_groups * taps, *self.output_size())
        input = torch.randn(self.batch, self.in_channels, *self.size, generator=generator)
        offset = torch.randn(per_pixel[0], 2 * per_pixel[1], *per_pixel[2:], generator=generator)
        weight_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel)
        weight = torch.randn(weight_shape, generator=generator)
        bias = torch.randn(self.out_channels, generator=generator)
        mask = torch.rand(per_pixel, generator=generator) if self.with_mask else None
        tensors = [input, offset * self.offset_scale, weight, bias, mask]
        input, offset, weight, bias, mask = (
            None if tensor is None else tensor.to(dtype) for tensor in tensors
        )
        return input, offset, weight, bias, self.stride, self.padding, self.dilation, mask


CASES = {
    "v1": Case(in_channels=3, out_channels=4, with_mask=False),
    "v2, groups, offset groups, strided, dilated": Case(
        batch=2,
        size=(7, 6),
        kernel=(3, 2),
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        offset_scale=1.5,
    ),
    "large offsets, mostly off the image": Case(
        in_channels=2,
        out_channels=3,
        size=(4, 5),
        kernel=(2, 2),
        offset_groups=2,
        stride=(1, 2),
        dilation=(2, 1),
        offset_scale=6.0,
    ),
    # Two channel blocks and two pixel blocks of the im2col kernel.
    "channel and pixel tails": Case(
        in_channels=IM2COL_BLOCK_C + 2,
        out_channels=2,
        size=(9, 9),
        kernel=(1, 1),
        padding=(0, 0),
        offset_scale=0.7,
    ),
}
GROUPED = CASES["v2, groups, offset groups, strided, dilated"]


@pytest.mark.parametrize("name", CASES)
def test_matches_the_pytorch_op(name):
    args = CASES[name].arguments(seed=len(name))
    torch.testing.assert_close(
        deform_conv2d_triton(*args), deform_conv2d(*args), rtol=1e-5, atol=1e-5
    )


def test_the_all_triton_path_matches_the_pytorch_op():
    args = GROUPED.arguments(seed=3)
    torch.testing.assert_close(
        deform_conv2d_triton(*args, gemm="triton"), deform_conv2d(*args), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("gemm", ["torch", "triton"])
def test_float16_is_sampled_in_float32(gemm):
    half = GROUPED.arguments(seed=4, dtype=torch.float16)

    out = deform_conv2d_triton(*half, gemm=gemm)

    assert out.dtype == torch.float16
    # The exact answer for these (float16) values; the columns and the output are rounded to
    # float16 (relative error 2^-11 each), the sums of up to 12 products are not.
    exact = deform_conv2d(*(arg.float() if isinstance(arg, torch.Tensor) else arg for arg in half))
    torch.testing.assert_close(out.float(), exact, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_gemm_kernel_multiplies_each_group_over_several_tiles(dtype):
    generator = torch.Generator().manual_seed(5)
    batch, groups, out_per_group, reduction, length = 2, 2, 20, 40, 37
    weight = torch.randn(groups * out_per_group, reduction, 1, 1, generator=generator)
    columns = torch.randn(batch, groups * reduction, length, generator=generator)
    bias = torch.randn(groups * out_per_group, generator=generator)
    weight, columns, bias = weight.to(dtype), columns.to(dtype), bias.to(dtype)

    # 16 x 16 x 16 tiles: 2 x 3 output tiles per group, 3 steps over the reduction.
    out = deform_gemm(weight, columns, bias, groups, block_sizes=(16, 16, 16))

    grouped = weight.float().view(groups, out_per_group, reduction)
    expected = grouped @ columns.float().view(batch, groups, reduction, length)
    expected = expected.view(batch, -1, length) + bias.float().view(1, -1, 1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3  # float16: the output's rounding
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_bad_inputs_raise_clear_errors():
    args = CASES["v1"].arguments(seed=6)
    doubles = CASES["v1"].arguments(seed=6, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32 or float16"):
        deform_conv2d_triton(*doubles)
    with pytest.raises(ValueError, match="gemm must be"):
        deform_conv2d_triton(*args, gemm="cublas")
    with pytest.raises(ValueError, match="offset must have shape"):
        deform_conv2d_triton(args[0], args[1][:, :, :-1], *args[2:])
