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

The PyTorch implementation is im2col-style: it computes every sampling position and its
bilinear weights at once, gathers each of the four neighbours of all of them at once (folding
the mask into the weights), and contracts the resulting columns with the weight in one batched
matmul over the convolution groups. It runs on any device PyTorch does.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["DeformConv2d", "DeformConvPack", "deform_conv2d"]

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
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    _check_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
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
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
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


def _pair(value: IntPair | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_arguments(
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
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
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
# Sampling geometry
#
# Every sampling point is indexed [N, L, K, og]: batch, output pixel (L = oH * oW), kernel tap
# (K = kh * kw) and offset group. The input is read from a channels-last table
# [N * og * H * W, Cin / og], so that one sample copies one contiguous row of channels and the
# sampled columns come out as [N, L, K, og, Cin / og] = [N, L, K * Cin]: one row per output
# pixel, in the order of ``weight.permute(0, 2, 3, 1)`` (taps, then channels).


class _Geometry(NamedTuple):
    """Static sizes of one call, derived from the tensor shapes."""

    groups: int
    offset_groups: int
    kernel: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]


def _geometry(input: Tensor, offset: Tensor, weight: Tensor) -> _Geometry:
    kh, kw = weight.shape[2], weight.shape[3]
    return _Geometry(
        groups=input.shape[1] // weight.shape[1],
        offset_groups=offset.shape[1] // (2 * kh * kw),
        kernel=(kh, kw),
        out_size=(offset.shape[2], offset.shape[3]),
    )


class _Corners(NamedTuple):
    """The four bilinear neighbours of every sampling point.

    Corner ``q`` is ``(y0, x0)``, ``(y0, x0 + 1)``, ``(y0 + 1, x0)``, ``(y0 + 1, x0 + 1)`` for
    ``q = 0..3``; all tensors are ``[4, N, L, K, og]``. Neighbours outside the image have zero
    weights (and a row clamped into the image, so gathering stays in bounds).
    """

    row: Tensor  # row of the channels-last input table
    weight: Tensor  # bilinear weight, 0 outside the image
    d_weight_dy: Tensor  # derivative of ``weight`` w.r.t. the sampling row
    d_weight_dx: Tensor  # derivative of ``weight`` w.r.t. the sampling column


def _sampling_points(
    offset: Tensor,
    geometry: _Geometry,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Rows and columns sampled by every tap: two ``[N, L, K, og]`` tensors."""
    batch = offset.shape[0]
    (kh, kw), (out_h, out_w) = geometry.kernel, geometry.out_size
    options = {"dtype": offset.dtype, "device": offset.device}
    # Undeformed positions, broadcast against [N, og, kh, kw, oH, oW].
    tap_rows = torch.arange(kh, **options).view(kh, 1, 1, 1) * dilation[0]
    tap_cols = torch.arange(kw, **options).view(kw, 1, 1) * dilation[1]
    out_rows = torch.arange(out_h, **options).view(out_h, 1) * stride[0] - padding[0]
    out_cols = torch.arange(out_w, **options) * stride[1] - padding[1]
    # offset [N, og * kh * kw * 2, oH, oW] -> [N, og, kh, kw, 2, oH, oW]
    shifts = offset.view(batch, geometry.offset_groups, kh, kw, 2, out_h, out_w)
    rows = tap_rows + out_rows + shifts[:, :, :, :, 0]
    cols = tap_cols + out_cols + shifts[:, :, :, :, 1]

    def to_sample_major(points: Tensor) -> Tensor:  # [N, og, kh, kw, oH, oW] -> [N, L, K, og]
        sample_major = points.permute(0, 4, 5, 2, 3, 1)
        return sample_major.reshape(batch, out_h * out_w, geometry.taps, geometry.offset_groups)

    return to_sample_major(rows), to_sample_major(cols)


def _bilinear_corners(rows: Tensor, cols: Tensor, height: int, width: int) -> _Corners:
    """Neighbours, weights and weight derivatives for sampling points ``[N, L, K, og]``."""
    row0, col0 = rows.floor(), cols.floor()
    frac_y, frac_x = rows - row0, cols - col0
    # Corner order along the leading dimension: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1,
    # x0 + 1).
    step_y = rows.new_tensor([0.0, 0.0, 1.0, 1.0]).view(4, 1, 1, 1, 1)
    step_x = rows.new_tensor([0.0, 1.0, 0.0, 1.0]).view(4, 1, 1, 1, 1)
    corner_rows, corner_cols = row0 + step_y, col0 + step_x
    # Weight of a corner along one axis: 1 - frac for the lower, frac for the upper neighbour;
    # its derivative is -1 or +1 respectively.
    sign_y, sign_x = 2 * step_y - 1, 2 * step_x - 1
    weight_y = 1 - step_y + sign_y * frac_y
    weight_x = 1 - step_x + sign_x * frac_x
    inside = (
        (corner_rows >= 0) & (corner_rows < height) & (corner_cols >= 0) & (corner_cols < width)
    ).to(rows.dtype)
    # Each (image, offset group) owns height * width consecutive rows of the table.
    batch, offset_groups = rows.shape[0], rows.shape[-1]
    image = torch.arange(batch * offset_groups, device=rows.device).view(batch, 1, 1, offset_groups)
    pixel = corner_rows.clamp(0, height - 1).long() * width + corner_cols.clamp(0, width - 1).long()
    return _Corners(
        row=image * (height * width) + pixel,
        weight=weight_y * weight_x * inside,
        d_weight_dy=sign_y * weight_x * inside,
        d_weight_dx=weight_y * sign_x * inside,
    )


def _modulate(corner_weight: Tensor, mask: Tensor | None, geometry: _Geometry) -> Tensor:
    """Fold the v2 mask ``[N, og * K, oH, oW]`` into corner weights ``[4, N, L, K, og]``."""
    if mask is None:
        return corner_weight
    return corner_weight * _sample_major_mask(mask, geometry)


def _sample_major_mask(mask: Tensor, geometry: _Geometry) -> Tensor:
    """``[N, og * K, oH, oW] -> [N, L, K, og]``."""
    length = mask.shape[2] * mask.shape[3]
    per_group = mask.view(mask.shape[0], geometry.offset_groups, geometry.taps, length)
    return per_group.permute(0, 3, 2, 1).contiguous()


def _input_table(input: Tensor, offset_groups: int) -> Tensor:
    """``[N, Cin, H, W] -> [N * og * H * W, Cin / og]``: one row per pixel and offset group."""
    batch, channels, height, width = input.shape
    per_group = input.reshape(batch, offset_groups, channels // offset_groups, height * width)
    return per_group.transpose(2, 3).reshape(-1, channels // offset_groups)


def _gather_corners(table: Tensor, rows: Tensor) -> Iterator[Tensor]:
    """Yield the table rows of each corner in turn, ``[N, L, K, og, Cin / og]``.

    The four gathers share one buffer, so each yielded tensor is only valid until the next:
    allocating a fresh columns-sized tensor per corner costs more (first touch of new memory)
    than the gather itself.
    """
    buffer = table.new_empty(rows[0].numel(), table.shape[1])
    for corner_rows in rows:
        torch.index_select(table, 0, corner_rows.flatten(), out=buffer)
        yield buffer.view(*corner_rows.shape, table.shape[1])


def _columns(table: Tensor, corners: _Corners, corner_weight: Tensor) -> Tensor:
    """Sampled input ``[N, L, K, og, Cin / og]``: the corners' rows times their weights."""
    columns = None
    for values, weight in zip(
        _gather_corners(table, corners.row), corner_weight.unsqueeze(-1), strict=True
    ):
        if columns is None:
            columns = values * weight
        else:
            columns.addcmul_(values, weight)
    return columns


def _grouped_columns(columns: Tensor, groups: int) -> Tensor:
    """``[N, L, K, og, Cin / og] -> [N, groups, L, K * Cin / groups]`` (a view if groups is 1)."""
    batch, length, taps, offset_groups, channels = columns.shape
    in_per_group = offset_groups * channels // groups
    per_group = columns.reshape(batch, length, taps, groups, in_per_group).permute(0, 3, 1, 2, 4)
    return per_group.reshape(batch, groups, length, taps * in_per_group)


def _grouped_weight(weight: Tensor, groups: int) -> Tensor:
    """``[Cout, Cin / groups, kh, kw] -> [groups, Cout / groups, kh * kw * Cin / groups]``."""
    out_channels, in_per_group = weight.shape[:2]
    taps_last = weight.view(groups, out_channels // groups, in_per_group, -1).transpose(2, 3)
    return taps_last.reshape(groups, out_channels // groups, -1)


# --------------------------------------------------------------------------------------------
# The custom op


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
    geometry = _geometry(input, offset, weight)
    rows, cols = _sampling_points(offset, geometry, stride, padding, dilation)
    corners = _bilinear_corners(rows, cols, input.shape[2], input.shape[3])
    table = _input_table(input, geometry.offset_groups)
    columns = _columns(table, corners, _modulate(corners.weight, mask, geometry))
    # [groups, Cout / groups, K * Cin / groups] @ [N, groups, K * Cin / groups, L]
    grouped = _grouped_columns(columns, geometry.groups).transpose(2, 3)
    out = _grouped_weight(weight, geometry.groups) @ grouped
    out = out.view(input.shape[0], weight.shape[0], *geometry.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


@_deform_conv2d_op.register_fake
def _(input, offset, weight, bias, stride, padding, dilation, mask):
    return input.new_empty(input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def _setup_context(ctx, inputs, output) -> None:
    input, offset, weight, _, stride, padding, dilation, mask = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.stride, ctx.padding, ctx.dilation = stride, padding, dilation


def _backward(ctx, grad_out: Tensor):
    input, offset, weight, mask = ctx.saved_tensors
    need_input, need_offset, need_weight, need_bias = ctx.needs_input_grad[:4]
    need_mask = ctx.needs_input_grad[7]
    geometry = _geometry(input, offset, weight)
    rows, cols = _sampling_points(offset, geometry, ctx.stride, ctx.padding, ctx.dilation)
    corners = _bilinear_corners(rows, cols, input.shape[2], input.shape[3])
    corner_weight = _modulate(corners.weight, mask, geometry)
    table = _input_table(input, geometry.offset_groups)
    batch, out_channels = input.shape[0], weight.shape[0]
    # [N, groups, Cout / groups, L]
    length = geometry.out_size[0] * geometry.out_size[1]
    grad_out = grad_out.reshape(batch, geometry.groups, out_channels // geometry.groups, length)

    grad_input = grad_offset = grad_weight = grad_bias = grad_mask = None
    if need_bias:
        grad_bias = grad_out.sum((0, 3)).flatten()
    if need_weight:
        columns = _grouped_columns(_columns(table, corners, corner_weight), geometry.groups)
        grad_weight = _weight_grad((grad_out @ columns).sum(0), weight)
    if need_input or need_offset or need_mask:
        grad_columns = _columns_grad(grad_out, weight, geometry)
    if need_input:
        grad_input = _input_grad(grad_columns, corners.row, corner_weight, input)
    if need_offset or need_mask:
        # Gradient reaching each corner's weight: [4, N, L, K, og]
        corner_grad = torch.stack(
            [(grad_columns * values).sum(-1) for values in _gather_corners(table, corners.row)]
        )
        if need_offset:
            grad_offset = _offset_grad(corner_grad, corners, mask, geometry).view_as(offset)
        if need_mask:
            grad_mask = (corner_grad * corners.weight).sum(0).permute(0, 3, 2, 1).reshape_as(mask)
    return grad_input, grad_offset, grad_weight, grad_bias, None, None, None, grad_mask


def _weight_grad(grouped_grad: Tensor, weight: Tensor) -> Tensor:
    """``[groups, Cout / groups, K * Cin / groups]`` back to the layout of ``weight``."""
    out_channels, in_per_group, kh, kw = weight.shape
    return grouped_grad.view(out_channels, kh, kw, in_per_group).permute(0, 3, 1, 2).contiguous()


def _columns_grad(grad_out: Tensor, weight: Tensor, geometry: _Geometry) -> Tensor:
    """Gradient w.r.t. the sampled columns: ``[N, L, K, og, Cin / og]``."""
    batch, groups, _, length = grad_out.shape
    in_channels = weight.shape[1] * groups
    # [N, groups, L, Cout / groups] @ [groups, Cout / groups, K * Cin / groups]
    grouped = grad_out.transpose(2, 3) @ _grouped_weight(weight, groups)
    per_group = grouped.view(batch, groups, length, geometry.taps, weight.shape[1])
    return per_group.permute(0, 2, 3, 1, 4).reshape(
        batch, length, geometry.taps, geometry.offset_groups, in_channels // geometry.offset_groups
    )


def _input_grad(
    grad_columns: Tensor, table_rows: Tensor, corner_weight: Tensor, input: Tensor
) -> Tensor:
    """Add each column's gradient to its four corners, scaled by their weights."""
    channels = grad_columns.shape[-1]
    grad_table = input.new_zeros(input.numel() // channels, channels)
    for rows, weight in zip(table_rows, corner_weight.unsqueeze(-1), strict=True):
        grad_table.index_add_(0, rows.flatten(), (grad_columns * weight).reshape(-1, channels))
    batch, _, height, width = input.shape
    # [N * og * H * W, Cin / og] -> [N, og, Cin / og, H * W] -> [N, Cin, H, W]
    offset_groups = input.shape[1] // channels
    per_group = grad_table.view(batch, offset_groups, height * width, channels).transpose(2, 3)
    return per_group.reshape(input.shape)


def _offset_grad(
    corner_grad: Tensor, corners: _Corners, mask: Tensor | None, geometry: _Geometry
) -> Tensor:
    """Gradient w.r.t. ``offset``, ``[N, og, K, 2, L]`` (its memory layout)."""
    grad = torch.stack(
        [(corner_grad * corners.d_weight_dy).sum(0), (corner_grad * corners.d_weight_dx).sum(0)],
        dim=-1,
    )  # [N, L, K, og, 2]
    if mask is not None:
        grad = grad * _sample_major_mask(mask, geometry).unsqueeze(-1)
    return grad.permute(0, 3, 2, 4, 1).contiguous()


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
