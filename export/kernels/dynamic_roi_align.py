"""Triton forward kernel of ``psearch::dynamic_roi_align`` (and of plain RoIAlign: zero offsets).

One program computes one output bin of one RoI for a block of ``BLOCK_C`` channels: it works out
the RoI's geometry (spatial scale, half-pixel shift, bin size, the bin's learned offset), walks
the bin's ``gh x gw`` sample grid (``sampling_ratio``, or ``ceil(bin size)`` when it is ``<= 0``)
and averages the bilinear samples, with the border rules of :mod:`models.ops.roi_align`: a sample
more than one pixel outside the feature map reads 0, one closer is clamped onto the border.

Coordinates and sums are computed in FP32 whatever the input dtype (FP32 or FP16); the result is
stored in the input dtype.

Launch (the TensorRT plugin needs the same): grid ``(K * oh * ow, cdiv(C, BLOCK_C))``, 1-D blocks
of ``num_warps * 32`` threads, the shared memory the compiled kernel's metadata names (for the
sum over samples; see :mod:`export.kernels.compile`). Tensors are contiguous: input
``(N, C, H, W)``, rois ``(K, 5)``, offsets ``(K, oh, ow, 2)`` holding ``(dx, dy)``, output
``(K, C, oh, ow)``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.ops.dynamic_roi_align import check_dynamic_roi_values

BLOCK_C = 64
BLOCK_S = 16
NUM_WARPS = 4
SUPPORTED_DTYPES = (torch.float32, torch.float16)


@triton.jit
def _neighbours(coord, size):
    """RoIAlign's rules along one axis for a coordinate in [-1, size]: (low, high, fraction).

    The coordinate is clamped onto [0, size - 1] first, which is what the rules amount to (and
    keeps the float-to-int conversion in range).
    """
    clamped = tl.minimum(tl.maximum(coord, 0.0), (size - 1).to(tl.float32))
    low = clamped.to(tl.int32)  # floor: clamped is not negative
    at_end = low >= size - 1
    high = tl.where(at_end, low, low + 1)
    fraction = tl.where(at_end, 0.0, clamped - low.to(tl.float32))
    return low, high, fraction


@triton.jit
def _bilinear_samples(plane_ptrs, y, x, height, width, channel_valid):
    """Samples at ``(y, x)`` (BLOCK_S,) of BLOCK_C channel planes: (BLOCK_S, BLOCK_C) in FP32.

    A sample out of range reads 0.
    """
    y_low, y_high, ly = _neighbours(y, height)
    x_low, x_high, lx = _neighbours(x, width)
    hy = 1.0 - ly
    hx = 1.0 - lx
    row_low = (y_low * width)[:, None]
    row_high = (y_high * width)[:, None]
    # The neighbours are always inside the map: only the channel tail needs masking.
    mask = channel_valid[None, :]
    v00 = tl.load(plane_ptrs + row_low + x_low[:, None], mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(plane_ptrs + row_low + x_high[:, None], mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(plane_ptrs + row_high + x_low[:, None], mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(plane_ptrs + row_high + x_high[:, None], mask=mask, other=0.0).to(tl.float32)
    value = (
        (hy * hx)[:, None] * v00
        + (hy * lx)[:, None] * v01
        + (ly * hx)[:, None] * v10
        + (ly * lx)[:, None] * v11
    )
    in_range = (y >= -1.0) & (y <= height.to(tl.float32))
    in_range = in_range & (x >= -1.0) & (x <= width.to(tl.float32))
    return tl.where(in_range[:, None], value, 0.0)


@triton.jit
def dynamic_roi_align_kernel(
    input_ptr,  # (N, C, H, W)
    rois_ptr,  # (K, 5): batch index, x1, y1, x2, y2 in input pixels
    offsets_ptr,  # (K, oh, ow, 2): (dx, dy) in units of the RoI's width / height
    output_ptr,  # (K, C, oh, ow)
    channels,
    height,
    width,
    pooled_h,
    pooled_w,
    spatial_scale,  # fp32
    sampling_ratio,  # samples per bin along each axis, <= 0: adaptive
    aligned,  # 1: half-pixel shift, 0: RoI sizes raised to at least 1
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    bin_index = tl.program_id(0)  # roi * oh * ow + bin_y * ow + bin_x
    channel_block = tl.program_id(1)
    bins_per_roi = pooled_h * pooled_w
    roi = bin_index // bins_per_roi
    bin_y = (bin_index % bins_per_roi) // pooled_w
    bin_x = bin_index % pooled_w

    # RoI geometry on the feature map, in the reference's order of operations.
    roi_ptr = rois_ptr + roi * 5
    batch = tl.load(roi_ptr).to(tl.int32)
    shift = tl.where(aligned != 0, 0.5, 0.0)
    start_x = tl.load(roi_ptr + 1).to(tl.float32) * spatial_scale - shift
    start_y = tl.load(roi_ptr + 2).to(tl.float32) * spatial_scale - shift
    roi_w = (tl.load(roi_ptr + 3).to(tl.float32) * spatial_scale - shift) - start_x
    roi_h = (tl.load(roi_ptr + 4).to(tl.float32) * spatial_scale - shift) - start_y
    roi_w = tl.where(aligned != 0, roi_w, tl.maximum(roi_w, 1.0))
    roi_h = tl.where(aligned != 0, roi_h, tl.maximum(roi_h, 1.0))
    bin_w = roi_w / pooled_w.to(tl.float32)
    bin_h = roi_h / pooled_h.to(tl.float32)
    # An empty or inverted RoI gets no samples (and its bins read 0).
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.maximum(tl.ceil(bin_h), 0.0))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.maximum(tl.ceil(bin_w), 0.0))
    grid_h = grid_h.to(tl.int32)
    grid_w = grid_w.to(tl.int32)

    # The learned offset moves the whole bin; its sample grid keeps its size.
    dx = tl.load(offsets_ptr + bin_index * 2).to(tl.float32)
    dy = tl.load(offsets_ptr + bin_index * 2 + 1).to(tl.float32)
    bin_start_x = start_x + bin_x.to(tl.float32) * bin_w + dx * roi_w
    bin_start_y = start_y + bin_y.to(tl.float32) * bin_h + dy * roi_h

    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_valid = channel < channels
    plane_size = height * width
    # (1, BLOCK_C) pointers to the channel planes of the RoI's image
    plane_ptrs = input_ptr + ((batch.to(tl.int64) * channels + channel) * plane_size)[None, :]

    # The bin's gh x gw samples, BLOCK_S at a time, at the centres of its sub-grid.
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    num_samples = grid_h * grid_w
    for first in range(0, num_samples, BLOCK_S):
        sample = first + tl.arange(0, BLOCK_S)
        sample_y = (sample // grid_w).to(tl.float32)
        sample_x = (sample % grid_w).to(tl.float32)
        y = bin_start_y + (sample_y + 0.5) * bin_h / grid_h.to(tl.float32)
        x = bin_start_x + (sample_x + 0.5) * bin_w / grid_w.to(tl.float32)
        value = _bilinear_samples(plane_ptrs, y, x, height, width, channel_valid)
        value = tl.where((sample < num_samples)[:, None], value, 0.0)
        total += tl.sum(value, axis=0)
    # Samples that read 0 count in the average; a bin without samples divides by 1.
    average = total / tl.maximum(grid_h * grid_w, 1).to(tl.float32)

    output_ptrs = output_ptr + ((roi.to(tl.int64) * channels + channel) * bins_per_roi)
    output_ptrs += bin_y * pooled_w + bin_x
    tl.store(output_ptrs, average.to(output_ptr.dtype.element_ty), mask=channel_valid)


def roi_align_grid(num_rois: int, pooled_size: tuple[int, int], channels: int) -> tuple[int, int]:
    """Grid of :func:`dynamic_roi_align_kernel`: one program per (RoI, bin, channel block)."""
    return num_rois * pooled_size[0] * pooled_size[1], triton.cdiv(channels, BLOCK_C)


def dynamic_roi_align_triton(
    input: Tensor,
    rois: Tensor,
    offsets: Tensor,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """``psearch::dynamic_roi_align`` computed by the Triton kernel (same signature as the op).

    Args:
        input: (N, C, H, W), float32 or float16.
        rois: (K, 5) rows of (batch_index, x1, y1, x2, y2) in input-image pixels.
        offsets: (K, oh, ow, 2) per-bin (dx, dy) in units of the RoI's width / height.
        spatial_scale, sampling_ratio, aligned: as in :func:`models.ops.roi_align.roi_align`.

    Returns:
        (K, C, oh, ow) in the dtype of ``input``.
    """
    _check_arguments(input, rois, offsets)
    num_rois, channels = rois.shape[0], input.shape[1]
    pooled_size = (offsets.shape[1], offsets.shape[2])
    output = input.new_empty(num_rois, channels, *pooled_size)
    if num_rois == 0:
        return output
    check_dynamic_roi_values(rois, offsets, input.shape[0])
    dynamic_roi_align_kernel[roi_align_grid(num_rois, pooled_size, channels)](
        input.contiguous(),
        rois.contiguous(),
        offsets.contiguous(),
        output,
        channels,
        input.shape[2],
        input.shape[3],
        pooled_size[0],
        pooled_size[1],
        float(spatial_scale),
        int(sampling_ratio),
        int(bool(aligned)),
        BLOCK_C=BLOCK_C,
        BLOCK_S=BLOCK_S,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # as compiled ahead of time (export.kernels.compile)
    )
    return output


def _check_arguments(input: Tensor, rois: Tensor, offsets: Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernel takes float32 or float16 input, got {input.dtype}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (K, 5), got {tuple(rois.shape)}")
    if (
        offsets.dim() != 4
        or offsets.shape[0] != rois.shape[0]
        or min(offsets.shape[1:3]) < 1
        or offsets.shape[3] != 2
    ):
        raise ValueError(
            f"offsets must have shape (K, oh, ow, 2) with K = {rois.shape[0]} and oh, ow >= 1, "
            f"got {tuple(offsets.shape)}"
        )
    for name, tensor in (("rois", rois), ("offsets", offsets)):
        if not tensor.dtype.is_floating_point or tensor.device != input.device:
            raise TypeError(
                f"{name} must be a floating point tensor on {input.device}, "
                f"got {tensor.dtype} on {tensor.device}"
            )
