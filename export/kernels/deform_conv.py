"""Triton forward kernels of ``psearch::deform_conv2d`` (DCN v1 and v2, torchvision semantics).

The op is two kernels, as in im2col convolution:

1. :func:`deform_im2col_kernel` samples the input bilinearly at every kernel tap's deformed
   position (times the v2 mask) and writes the columns ``[N, Cin * kh * kw, L]`` (``L = oH * oW``;
   row ``c * kh * kw + tap``, the order of ``weight.view(Cout, -1)``), in the input dtype.
2. :func:`deform_gemm_kernel` multiplies, per image and convolution group, the group's weight
   ``[Cout / groups, Cin / groups * kh * kw]`` with the group's columns and adds the bias.

In PyTorch the second step may be ``torch.matmul`` instead (cuBLAS), which is what
:func:`deform_conv2d_triton` does by default; the TensorRT plugin runs both Triton kernels.
Positions, bilinear weights and sums are FP32 whatever the input dtype (FP32 or FP16). The GEMM
multiplies FP32 in full FP32 (``input_precision="ieee"``: no TF32, like PyTorch's default) and
FP16 on tensor cores, accumulating in FP32.

Launch parameters (the TensorRT plugin needs the same), 1-D blocks of ``num_warps * 32`` threads:

- im2col: grid ``(cdiv(L, BLOCK_L), N * offset_groups * kh * kw, cdiv(Cin / offset_groups,
  BLOCK_C))``.
- GEMM: grid ``(cdiv(Cout / groups, BLOCK_M) * cdiv(L, BLOCK_N), N * groups)``.

Their shared memory is in the compiled kernels' metadata (:mod:`export.kernels.compile`).
"""

from collections.abc import Sequence
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.ops.deform_conv import as_pair, check_deform_conv_arguments

IM2COL_BLOCK_L = 64
IM2COL_BLOCK_C = 16
IM2COL_NUM_WARPS = 4
GEMM_BLOCK_M = 64
GEMM_BLOCK_N = 64
GEMM_BLOCK_K = 32
GEMM_NUM_WARPS = 4
# Full FP32 products (no TF32), like PyTorch's default; FP16 runs on tensor cores regardless.
GEMM_INPUT_PRECISION = "ieee"
SUPPORTED_DTYPES = (torch.float32, torch.float16)


@triton.jit
def _corner(plane_ptrs, row, col, height, width, weight, channel_valid):
    """One bilinear neighbour of BLOCK_L sampling points in BLOCK_C channel planes, weighted.

    A neighbour outside the image reads 0 (the zero padding of the sampled image).
    """
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    mask = channel_valid[:, None] & inside[None, :]
    value = tl.load(plane_ptrs + (row * width + col)[None, :], mask=mask, other=0.0)
    return weight[None, :] * value.to(tl.float32)


@triton.jit
def deform_im2col_kernel(
    input_ptr,  # [N, Cin, H, W]
    offset_ptr,  # [N, offset_groups * kh * kw * 2, oH, oW]: (dy, dx) per tap
    mask_ptr,  # [N, offset_groups * kh * kw, oH, oW]; not read unless HAS_MASK
    columns_ptr,  # [N, Cin * kh * kw, oH * oW]
    channels,
    height,
    width,
    out_w,
    length,  # oH * oW
    kernel_h,
    kernel_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    offset_groups,
    HAS_MASK: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    sampler = tl.program_id(1)  # (image, offset group, tap) = ((n * og) + group) * taps + tap
    channel_block = tl.program_id(2)
    taps = kernel_h * kernel_w
    tap = sampler % taps
    group = (sampler // taps) % offset_groups
    image = sampler // (taps * offset_groups)

    # Sampling positions of this tap for BLOCK_L output pixels.
    pixel = pixel_block * BLOCK_L + tl.arange(0, BLOCK_L)
    pixel_valid = pixel < length
    out_row = pixel // out_w
    out_col = pixel % out_w
    base_row = (tap // kernel_w) * dilation_h + out_row * stride_h - pad_h
    base_col = (tap % kernel_w) * dilation_w + out_col * stride_w - pad_w
    # ``sampler`` is also the (image, group, tap) row of the offset pairs and of the mask.
    offset_ptrs = offset_ptr + sampler.to(tl.int64) * 2 * length + pixel
    dy = tl.load(offset_ptrs, mask=pixel_valid, other=0.0).to(tl.float32)
    dx = tl.load(offset_ptrs + length, mask=pixel_valid, other=0.0).to(tl.float32)
    # Beyond one pixel outside the image every neighbour reads 0: clamping there changes
    # nothing and keeps the float-to-int conversion in range.
    y = tl.minimum(tl.maximum(base_row.to(tl.float32) + dy, -2.0), height + 1.0)
    x = tl.minimum(tl.maximum(base_col.to(tl.float32) + dx, -2.0), width + 1.0)
    y_floor = tl.floor(y)
    x_floor = tl.floor(x)
    ly = y - y_floor
    lx = x - x_floor
    hy = 1.0 - ly
    hx = 1.0 - lx
    if HAS_MASK:
        mask_ptrs = mask_ptr + sampler.to(tl.int64) * length + pixel
        modulation = tl.load(mask_ptrs, mask=pixel_valid, other=0.0).to(tl.float32)
    else:
        modulation = tl.full([BLOCK_L], 1.0, tl.float32)
    row0 = y_floor.to(tl.int32)
    col0 = x_floor.to(tl.int32)

    # The offset group's channels, BLOCK_C at a time: (BLOCK_C, 1) pointers to their planes.
    channels_per_group = channels // offset_groups
    local_channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = local_channel < channels_per_group
    channel = (image * channels + group * channels_per_group + local_channel).to(tl.int64)
    plane_ptrs = input_ptr + (channel * (height * width))[:, None]
    value = _corner(plane_ptrs, row0, col0, height, width, hy * hx * modulation, channel_valid)
    value += _corner(plane_ptrs, row0, col0 + 1, height, width, hy * lx * modulation, channel_valid)
    value += _corner(plane_ptrs, row0 + 1, col0, height, width, ly * hx * modulation, channel_valid)
    value += _corner(
        plane_ptrs, row0 + 1, col0 + 1, height, width, ly * lx * modulation, channel_valid
    )

    column_row = channel * taps + tap  # (BLOCK_C,)
    column_ptrs = columns_ptr + (column_row * length)[:, None] + pixel[None, :]
    store_mask = channel_valid[:, None] & pixel_valid[None, :]
    tl.store(column_ptrs, value.to(columns_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def deform_gemm_kernel(
    weight_ptr,  # [Cout, Cin / groups * kh * kw]
    columns_ptr,  # [N, Cin * kh * kw, L]
    bias_ptr,  # [Cout]; not read unless HAS_BIAS
    output_ptr,  # [N, Cout, L]
    out_per_group,  # M: Cout / groups
    reduction,  # K: Cin / groups * kh * kw
    length,  # N: oH * oW
    groups,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    image_group = tl.program_id(1)  # image * groups + group
    group = image_group % groups
    tiles_n = tl.cdiv(length, BLOCK_N)
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < out_per_group
    col_valid = cols < length
    out_channel = group * out_per_group + rows

    # The group's weight rows and the image's group block of columns.
    weight_rows = weight_ptr + (out_channel.to(tl.int64) * reduction)[:, None]
    column_block = columns_ptr + image_group.to(tl.int64) * reduction * length + cols[None, :]
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for first in range(0, reduction, BLOCK_K):
        k = first + tl.arange(0, BLOCK_K)
        k_valid = k < reduction
        a = tl.load(weight_rows + k[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(
            column_block + (k * length)[:, None],
            mask=k_valid[:, None] & col_valid[None, :],
            other=0.0,
        )
        accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + out_channel, mask=row_valid, other=0.0)
        accumulator += bias.to(tl.float32)[:, None]

    output_rows = (image_group.to(tl.int64) * out_per_group + rows) * length
    output_ptrs = output_ptr + output_rows[:, None] + cols[None, :]
    out_mask = row_valid[:, None] & col_valid[None, :]
    tl.store(output_ptrs, accumulator.to(output_ptr.dtype.element_ty), mask=out_mask)


def im2col_grid(
    batch: int, in_channels: int, offset_groups: int, taps: int, length: int
) -> tuple[int, int, int]:
    """Grid of :func:`deform_im2col_kernel`: (pixel block, (image, offset group, tap), channels)."""
    return (
        triton.cdiv(length, IM2COL_BLOCK_L),
        batch * offset_groups * taps,
        triton.cdiv(in_channels // offset_groups, IM2COL_BLOCK_C),
    )


def gemm_grid(
    batch: int, groups: int, out_per_group: int, length: int, block_m: int, block_n: int
) -> tuple[int, int]:
    """Grid of :func:`deform_gemm_kernel`: (output tile, (image, group))."""
    return triton.cdiv(out_per_group, block_m) * triton.cdiv(length, block_n), batch * groups


def deform_im2col(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Sampled columns ``[N, Cin * kh * kw, oH * oW]`` (input dtype) by the im2col kernel."""
    batch, channels, height, width = input.shape
    out_h, out_w = offset.shape[2], offset.shape[3]
    taps = kernel_size[0] * kernel_size[1]
    offset_groups = offset.shape[1] // (2 * taps)
    length = out_h * out_w
    columns = input.new_empty(batch, channels * taps, length)
    offset = offset.contiguous()
    deform_im2col_kernel[im2col_grid(batch, channels, offset_groups, taps, length)](
        input.contiguous(),
        offset,
        offset if mask is None else mask.contiguous(),  # any pointer: not read without a mask
        columns,
        channels,
        height,
        width,
        out_w,
        length,
        *kernel_size,
        *stride,
        *padding,
        *dilation,
        offset_groups,
        HAS_MASK=mask is not None,
        BLOCK_L=IM2COL_BLOCK_L,
        BLOCK_C=IM2COL_BLOCK_C,
        num_warps=IM2COL_NUM_WARPS,
        enable_fp_fusion=False,  # as compiled ahead of time (export.kernels.compile)
    )
    return columns


def deform_gemm(
    weight: Tensor,
    columns: Tensor,
    bias: Tensor | None,
    groups: int,
    block_sizes: tuple[int, int, int] = (GEMM_BLOCK_M, GEMM_BLOCK_N, GEMM_BLOCK_K),
) -> Tensor:
    """Grouped ``weight @ columns (+ bias)`` by the GEMM kernel: ``[N, Cout, L]``.

    Args:
        weight: ``[Cout, Cin / groups, kh, kw]``.
        columns: ``[N, Cin * kh * kw, L]`` from :func:`deform_im2col`.
        bias: ``[Cout]`` or None.
        groups: the convolution groups.
        block_sizes: the kernel's ``(BLOCK_M, BLOCK_N, BLOCK_K)`` tile, each at least 16.
    """
    batch, _, length = columns.shape
    out_channels = weight.shape[0]
    out_per_group = out_channels // groups
    block_m, block_n, block_k = block_sizes
    output = columns.new_empty(batch, out_channels, length)
    deform_gemm_kernel[gemm_grid(batch, groups, out_per_group, length, block_m, block_n)](
        weight.contiguous(),
        columns.contiguous(),
        weight if bias is None else bias.contiguous(),  # any pointer: not read without a bias
        output,
        out_per_group,
        weight[0].numel(),
        length,
        groups,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        INPUT_PRECISION=GEMM_INPUT_PRECISION,
        num_warps=GEMM_NUM_WARPS,
        enable_fp_fusion=False,  # as compiled ahead of time (export.kernels.compile)
    )
    return output


def deform_conv2d_triton(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Tensor | None,
    *,
    gemm: Literal["torch", "triton"] = "torch",
) -> Tensor:
    """``psearch::deform_conv2d`` with Triton kernels (the op's signature, plus ``gemm``).

    Args:
        input, offset, weight, bias, stride, padding, dilation, mask: as in
            :func:`models.ops.deform_conv.deform_conv2d`; float32 or float16.
        gemm: ``"torch"`` contracts the columns with ``torch.matmul``, ``"triton"`` with
            :func:`deform_gemm_kernel` (what the TensorRT plugin runs).

    Returns:
        ``[N, Cout, oH, oW]`` in the dtype of ``input``.
    """
    stride, padding, dilation = (
        as_pair(stride, "stride"),
        as_pair(padding, "padding"),
        as_pair(dilation, "dilation"),
    )
    check_deform_conv_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float32 or float16 tensors, got {input.dtype}")
    if gemm not in ("torch", "triton"):
        raise ValueError(f"gemm must be 'torch' or 'triton', got {gemm!r}")
    kernel_size = (weight.shape[2], weight.shape[3])
    columns = deform_im2col(input, offset, mask, kernel_size, stride, padding, dilation)
    groups = input.shape[1] // weight.shape[1]
    if gemm == "triton":
        output = deform_gemm(weight, columns, bias, groups)
    else:
        output = _grouped_matmul(weight, columns, bias, groups)
    return output.view(input.shape[0], weight.shape[0], *offset.shape[2:])


def _grouped_matmul(weight: Tensor, columns: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``[groups, Cout / groups, R] @ [N, groups, R, L] (+ bias) -> [N, Cout, L]``."""
    batch, _, length = columns.shape
    grouped_weight = weight.reshape(groups, weight.shape[0] // groups, -1)
    grouped_columns = columns.view(batch, groups, -1, length)
    output = (grouped_weight @ grouped_columns).view(batch, weight.shape[0], length)
    if bias is not None:
        output = output + bias.view(1, -1, 1)
    return output
