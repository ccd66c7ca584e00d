"""Deformable convolution, v1 (offsets) and v2 (offsets and a modulation mask).

The semantics are torchvision's ``deform_conv2d``, which ONNX ``DeformConv`` (opset 19) shares:

- ``offset`` is ``[N, 2 * offset_groups * kh * kw, oH, oW]``; for offset group ``g`` and kernel
  tap ``k = i * kw + j`` channel ``g * 2 * kh * kw + 2 * k`` holds the vertical shift ``dy`` and
  the next channel the horizontal shift ``dx``.
- ``mask`` (v2) is ``[N, offset_groups * kh * kw, oH, oW]``, channel ``g * kh * kw + k``.
- Input channels are split into ``offset_groups`` contiguous blocks, each moved by its own
  offsets; the convolution groups are inferred from ``weight``, as in ``conv2d``.
- Tap ``(i, j)`` of output pixel ``(oy, ox)`` samples the input at
  ``y = oy * stride_h - pad_h + i * dilation_h + dy`` and ``x = ... + dx`` with bilinear
  interpolation over a zero-padded image: a neighbour outside the image reads 0, so a sample
  with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` is 0.

The PyTorch implementation is im2col-style: ``grid_sample`` samples every tap of every output
pixel in one call (its zero padding is exactly the rule above), the mask scales the sampled
columns, and one batched matmul over the convolution groups contracts them with the weight.
Its gradients are ``grid_sample``'s native backward, about 2x faster on CPU than gathering and
scattering the four neighbours by hand (``benchmarks/ops.py``). It runs on any device PyTorch
does, takes tensors of any memory layout, computes half-precision tensors in float32 and, under
autocast, casts the mixed dtypes to float32 (``models.ops.precision``).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ops.precision import compute_in_float32_under_autocast, in_compute_dtype

__all__ = [
    "DeformConv2d",
    "DeformConvPack",
    "as_pair",
    "check_deform_conv_arguments",
    "deform_conv2d",
]

IntPair = int | tuple[int, int]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution with torchvision's semantics (see the module docstring).

    Args:
        input: ``[N, Cin, H, W]``.
        offset: ``[N, 2 * offset_groups * kh * kw, oH, oW]``, ``(dy, dx)`` per kernel tap.
        weight: ``[Cout, Cin / groups, kh, kw]``.
        bias: ``[Cout]`` or None.
        stride, padding, dilation: an int or an ``(h, w)`` pair.
        mask: ``[N, offset_groups * kh * kw, oH, oW]`` modulation (DCNv2), or None (DCNv1).

    Returns:
        ``[N, Cout, oH, oW]``, where ``oH = (H + 2 * pad_h - dilation_h * (kh - 1) - 1)
        // stride_h + 1`` (and likewise ``oW``).
    """
    stride, padding, dilation = (
        as_pair(stride, "stride"),
        as_pair(padding, "padding"),
        as_pair(dilation, "dilation"),
    )
    check_deform_conv_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
    return torch.ops.psearch.deform_conv2d(
        input, offset, weight, bias, stride, padding, dilation, mask
    )


class DeformConv2d(nn.Module):
    """A deformable convolution layer whose offsets (and optional mask) are given to ``forward``.

    Its parameters are named and shaped like ``nn.Conv2d``'s (``weight``, ``bias``), so a
    convolution's state dict loads into it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Conv2d``, so both start from the same distribution."""
        reference = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, groups=self.groups
        )
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            if self.bias is not None:
                self.bias.copy_(reference.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [N, Cin, H, W]``, ``offset``/``mask`` as in :func:`deform_conv2d`."""
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )


class DeformConvPack(DeformConv2d):
    """A deformable convolution that predicts its own offsets (and, modulated, its mask) from x.

    ``conv_offset`` is a plain convolution with the main one's kernel, stride, padding and
    dilation, initialised to zero. At initialisation the offsets are therefore zero:

    - ``modulated=False`` (DCNv1) equals a plain convolution with ``weight`` and ``bias``;
    - ``modulated=True`` (DCNv2) predicts the mask as ``sigmoid`` of the logits, as in the DCNv2
      paper, so it starts at 0.5 and the layer starts as a plain convolution with
      ``weight / 2`` and ``bias``.

    ``conv_offset.weight`` and ``conv_offset.bias`` are the only parameters ``nn.Conv2d`` lacks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
        modulated: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        if in_channels % offset_groups:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})"
            )
        self.offset_groups = offset_groups
        self.modulated = modulated
        taps = self.kernel_size[0] * self.kernel_size[1]
        # Per offset group and tap: (dy, dx), plus one mask logit when modulated.
        channels_per_tap = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(
            in_channels,
            offset_groups * taps * channels_per_tap,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
        self.init_offset()

    def init_offset(self) -> None:
        """Zero the offset predictor: no deformation until training moves it."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """``x [N, Cin, H, W] -> [N, Cout, oH, oW]``."""
        prediction = self.conv_offset(x)
        if not self.modulated:
            return super().forward(x, prediction)
        offset_channels = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask_logits = prediction.split(
            [offset_channels, prediction.shape[1] - offset_channels], dim=1
        )
        return super().forward(x, offset, torch.sigmoid(mask_logits))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, offset_groups={self.offset_groups}, "
            f"modulated={self.modulated}"
        )


# --------------------------------------------------------------------------------------------
# Argument checks


def as_pair(value: IntPair | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints (an int is both); ``name`` is for the error."""
    if isinstance(value, int):
        return value, value
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_deform_conv_arguments(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> None:
    """Raise a ValueError that names the problem for any inconsistent argument."""
    named = {"input": input, "offset": offset, "weight": weight, "mask": mask}
    for name, tensor in named.items():
        if tensor is not None and tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(tensor.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}"
        )
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    # Under autocast the op casts them to one dtype (float32) itself, as torchvision does.
    mixed_precision = torch.is_autocast_enabled(input.device.type) and all(
        t.is_floating_point() for t in tensors
    )
    dtypes = {t.dtype for t in tensors}
    if (len(dtypes) != 1 and not mixed_precision) or len({t.device for t in tensors}) != 1:
        raise ValueError(
            "input, offset, weight, bias and mask must share one dtype and device, got "
            f"{[(t.dtype, str(t.device)) for t in tensors]}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
            f"padding={padding}, dilation={dilation}"
        )

    batch, in_channels, height, width = input.shape
    out_channels, in_per_group, kh, kw = weight.shape
    if in_per_group == 0 or in_channels % in_per_group:
        raise ValueError(
            f"weight's second dimension ({in_per_group}) must divide the input channels "
            f"({in_channels}): groups = in_channels / weight.shape[1]"
        )
    groups = in_channels // in_per_group
    if out_channels % groups:
        raise ValueError(
            f"weight's output channels ({out_channels}) must be divisible by groups ({groups})"
        )

    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps):
        raise ValueError(
            f"offset must have 2 * offset_groups * kh * kw channels (a multiple of {2 * taps}), "
            f"got {offset.shape[1]}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups:
        raise ValueError(
            f"input channels ({in_channels}) must be divisible by the offset groups "
            f"({offset_groups}, from {offset.shape[1]} offset channels)"
        )

    out_h = _output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = _output_size(width, kw, stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be empty ({out_h}x{out_w}): input {height}x{width} is too small "
            f"for kernel {kh}x{kw} with padding={padding}, dilation={dilation}"
        )
    expected_offset = (batch, 2 * offset_groups * taps, out_h, out_w)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(f"offset must have shape {expected_offset}, got {tuple(offset.shape)}")
    expected_mask = (batch, offset_groups * taps, out_h, out_w)
    if mask is not None and tuple(mask.shape) != expected_mask:
        raise ValueError(f"mask must have shape {expected_mask}, got {tuple(mask.shape)}")


# --------------------------------------------------------------------------------------------
# The computation
#
# Sampling is ``grid_sample``'s bilinear interpolation with zero padding and aligned corners,
# which reads exactly torchvision's rule: each of the four neighbours outside the image counts
# as 0. The input is first padded with zeros: one pixel on the top and left, and on the bottom
# and right up to a side of 2^k + 1 pixels. Then every side has normalised coordinates (with
# aligned corners a side of one pixel has none), and the pixel -> [-1, 1] -> pixel round trip
# scales by powers of two, so it is exact for positions with few significant bits: a sample on
# a pixel row stays on it and takes its derivative from the right, as torchvision's does,
# instead of landing an ulp below and taking it from the left. All taps of all output pixels
# are sampled in one call as a grid of K * L points; the columns come out as [N, Cin, K, L], the
# layout of ``weight.view(Cout, Cin * K)``, so the convolution is one (grouped) matmul.


def _deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Tensor | None,
) -> Tensor:
    """The op's computation in differentiable PyTorch (its gradients are autograd's), in
    float32 for half-precision tensors (models.ops.precision); returns the input's dtype."""
    dtype = input.dtype
    input, offset, weight = (
        in_compute_dtype(input),
        in_compute_dtype(offset),
        in_compute_dtype(weight),
    )
    bias = None if bias is None else in_compute_dtype(bias)
    mask = None if mask is None else in_compute_dtype(mask)
    batch, in_channels, height, width = input.shape
    out_channels, in_per_group, kh, kw = weight.shape
    taps = kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    out_h, out_w = offset.shape[2], offset.shape[3]
    length = out_h * out_w

    padded_h, padded_w = _padded_side(height), _padded_side(width)
    padded = F.pad(input, (1, padded_w - width - 1, 1, padded_h - height - 1))
    options = {"dtype": offset.dtype, "device": offset.device}
    # Undeformed positions in the padded image, broadcast against [N, og, kh, kw, oH, oW].
    tap_rows = torch.arange(kh, **options).view(kh, 1, 1, 1) * dilation[0]
    tap_cols = torch.arange(kw, **options).view(kw, 1, 1) * dilation[1]
    out_rows = torch.arange(out_h, **options).view(out_h, 1) * stride[0] - padding[0] + 1
    out_cols = torch.arange(out_w, **options) * stride[1] - padding[1] + 1
    # offset [N, og * kh * kw * 2, oH, oW] -> [N, og, kh, kw, 2, oH, oW]
    shifts = offset.reshape(batch, offset_groups, kh, kw, 2, out_h, out_w)
    rows = tap_rows + out_rows + shifts[:, :, :, :, 0]
    cols = tap_cols + out_cols + shifts[:, :, :, :, 1]
    # Pixel -> [-1, 1] with aligned corners; grid points are (x, y).
    grid = torch.stack(
        [cols * (2 / (padded_w - 1)) - 1, rows * (2 / (padded_h - 1)) - 1], dim=-1
    ).reshape(batch * offset_groups, taps * length, 1, 2)
    # reshape, not view: the input, offsets and mask may come in any memory layout.
    per_group = padded.reshape(
        batch * offset_groups, in_channels // offset_groups, *padded.shape[2:]
    )
    columns = F.grid_sample(
        per_group, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    ).reshape(batch, offset_groups, in_channels // offset_groups, taps, length)
    if mask is not None:
        columns = columns * mask.reshape(batch, offset_groups, 1, taps, length)
    groups = in_channels // in_per_group
    # [groups, Cout / groups, Cin / groups * K] @ [N, groups, Cin / groups * K, L]
    out = weight.reshape(groups, out_channels // groups, in_per_group * taps) @ columns.reshape(
        batch, groups, in_per_group * taps, length
    )
    out = out.reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.to(dtype)


def _padded_side(size: int) -> int:
    """The smallest 2^k + 1 that holds ``size`` pixels and a zero pixel on each side."""
    return 2 ** math.ceil(math.log2(size + 1)) + 1


# --------------------------------------------------------------------------------------------
# The custom op: one node for export (ONNX DeformConv, the TensorRT plugin); its backward
# recomputes the forward under autograd, which keeps no columns alive between the passes.


@torch.library.custom_op("psearch::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Tensor | None,
) -> Tensor:
    return _deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


@_deform_conv2d_op.register_fake
def _(input, offset, weight, bias, stride, padding, dilation, mask):
    return input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def _setup_context(ctx, inputs, output) -> None:
    input, offset, weight, bias, stride, padding, dilation, mask = inputs
    ctx.save_for_backward(input, offset, weight, bias, mask)
    ctx.stride, ctx.padding, ctx.dilation = stride, padding, dilation


def _backward(ctx, grad_out: Tensor):
    saved = ctx.saved_tensors  # input, offset, weight, bias, mask
    wanted = [ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 7)]
    # The recomputation runs in the saved tensors' dtype even if backward() is called under
    # autocast: the forward ran with autocast off (models.ops.precision).
    with torch.enable_grad(), torch.autocast(saved[0].device.type, enabled=False):
        leaves = [
            None if tensor is None else tensor.detach().requires_grad_(need)
            for tensor, need in zip(saved, wanted, strict=True)
        ]
        input, offset, weight, bias, mask = leaves
        out = _deform_conv2d(
            input, offset, weight, bias, ctx.stride, ctx.padding, ctx.dilation, mask
        )
        targets = [leaf for leaf, need in zip(leaves, wanted, strict=True) if need]
        grads = iter(torch.autograd.grad(out, targets, grad_out, allow_unused=True))
    input_grad, offset_grad, weight_grad, bias_grad, mask_grad = (
        next(grads) if need else None for need in wanted
    )
    return input_grad, offset_grad, weight_grad, bias_grad, None, None, None, mask_grad


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
compute_in_float32_under_autocast("deform_conv2d", result_dtype_of=0)
