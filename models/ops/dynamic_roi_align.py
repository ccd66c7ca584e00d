"""Dynamic RoIAlign (LEAPS, eq. 1): RoIAlign whose every bin is moved by its own learned offset.

``F(i, j) = RoIAlign(F_s8, p_ij + Δp_ij)``: the op ``psearch::dynamic_roi_align`` is
:func:`models.ops.roi_align.roi_align` with one change, the start of each bin.

Offsets ``(K, oh, ow, 2)`` hold ``(dx, dy)`` (x first, as mmcv's deformable RoI pooling, the
opposite of deformable convolution's (dy, dx)), in units of the RoI's own width and height on the
feature map, so that an offset predictor is scale invariant. Bin ``(ph, pw)`` of RoI ``k`` then
starts at::

    x = roi_start_x + pw * bin_w + dx * roi_w
    y = roi_start_y + ph * bin_h + dy * roi_h        with (dx, dy) = offsets[k, ph, pw]

where ``roi_w`` / ``roi_h`` are the RoI's width and height after spatial scaling (and, with
``aligned=False``, after raising them to at least 1): the sizes that are divided into bins. The
bin keeps its size and its sample grid (``sampling_ratio <= 0`` still picks the grid from the
RoI's size), and samples pushed off the feature map follow RoIAlign's border rules (reading 0
beyond one pixel outside). ``dx = 0.5`` moves a bin right by half the RoI's width. All-zero
offsets give exactly :func:`roi_align`.

Gradients flow to ``input`` and to ``offsets`` (the exact derivative of the forward function:
a sample coordinate that the border rules clamp has zero derivative), not to ``rois``.
"""

import torch
from torch import Tensor

from models.ops.precision import compute_in_float32_under_autocast, in_compute_dtype
from models.ops.roi_align import (
    _bilinear_plan,
    _BilinearPlan,
    _check_roi_align_args,
    _normalize_output_size,
    _pool,
    _pool_backward_input,
    _sample_position_grad,
    boxes_to_rois,
    check_roi_values,
)


def check_dynamic_roi_values(rois: Tensor, offsets: Tensor, batch_size: int) -> None:
    """Checks on the RoI and offset values, in the eager kernels (they read data)."""
    check_roi_values(rois, batch_size)
    if not bool(torch.isfinite(offsets).all()):
        raise ValueError("offsets contain NaN or infinite values")


def _contiguous_zeros_like(tensor: Tensor) -> Tensor:
    # Gradients are always contiguous, whatever the layout of the input, as the fakes promise.
    return torch.zeros_like(tensor, memory_format=torch.contiguous_format)


def _offset_gradient(
    input: Tensor, offsets: Tensor, grad_output: Tensor, plan: _BilinearPlan
) -> Tensor:
    """Gradient w.r.t. offsets (K, oh, ow, 2) from the samples' position gradients."""
    per_sample = _sample_position_grad(input, grad_output, plan)  # (S, 2): d/dx, d/dy
    # A bin's start moves by (dx * roi_w, dy * roi_h), and all its samples with it.
    per_sample = per_sample * plan.roi_size[plan.sample_roi]
    grad_offsets = _contiguous_zeros_like(offsets)
    grad_offsets.view(-1, 2).index_add_(0, plan.sample_bin, per_sample)
    return grad_offsets


def _plan(
    rois: Tensor,
    offsets: Tensor,
    feature_shape: tuple[int, ...],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> _BilinearPlan:
    """The bilinear plan of the shifted bins, in the dtype the op computes in."""
    pooled_size = (offsets.shape[1], offsets.shape[2])
    return _bilinear_plan(
        in_compute_dtype(rois),
        in_compute_dtype(offsets),
        feature_shape,
        spatial_scale,
        pooled_size,
        sampling_ratio,
        aligned,
    )


@torch.library.custom_op("psearch::dynamic_roi_align", mutates_args=())
def dynamic_roi_align_op(
    input: Tensor,
    rois: Tensor,
    offsets: Tensor,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The custom op behind :func:`dynamic_roi_align`; the output size is the offsets' (oh, ow)."""
    num_rois, pooled_size = rois.shape[0], (offsets.shape[1], offsets.shape[2])
    if num_rois == 0:
        return input.new_zeros(0, input.shape[1], *pooled_size)
    check_dynamic_roi_values(rois, offsets, input.shape[0])
    plan = _plan(rois, offsets, input.shape, spatial_scale, sampling_ratio, aligned)
    return _pool(in_compute_dtype(input), plan, num_rois, pooled_size).to(input.dtype)


@dynamic_roi_align_op.register_fake
def _dynamic_roi_align_fake(input, rois, offsets, spatial_scale, sampling_ratio, aligned):
    return input.new_empty(rois.shape[0], input.shape[1], offsets.shape[1], offsets.shape[2])


@torch.library.custom_op("psearch::dynamic_roi_align_backward", mutates_args=())
def dynamic_roi_align_backward_op(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offsets: Tensor,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``psearch::dynamic_roi_align`` w.r.t. (input, offsets)."""
    if rois.shape[0] == 0:
        return _contiguous_zeros_like(input), _contiguous_zeros_like(offsets)
    plan = _plan(rois, offsets, input.shape, spatial_scale, sampling_ratio, aligned)
    grad_output = in_compute_dtype(grad_output)
    grad_input = _pool_backward_input(grad_output, plan, input.shape)
    grad_offsets = _offset_gradient(
        in_compute_dtype(input), in_compute_dtype(offsets), grad_output, plan
    )
    return grad_input.to(input.dtype), grad_offsets.to(offsets.dtype)


@dynamic_roi_align_backward_op.register_fake
def _dynamic_roi_align_backward_fake(grad_output, input, rois, offsets, *args):
    contiguous = torch.contiguous_format
    return torch.empty_like(input, memory_format=contiguous), torch.empty_like(
        offsets, memory_format=contiguous
    )


def _setup_context(ctx, inputs, output) -> None:
    input, rois, offsets, *ctx.pooling_args = inputs
    ctx.save_for_backward(input, rois, offsets)


def _backward(ctx, grad_output):
    input, rois, offsets = ctx.saved_tensors
    grad_input, grad_offsets = dynamic_roi_align_backward_op(
        grad_output.contiguous(), input, rois, offsets, *ctx.pooling_args
    )
    needs_input, _, needs_offsets = ctx.needs_input_grad[:3]
    return (
        grad_input if needs_input else None,
        None,
        grad_offsets if needs_offsets else None,
        None,
        None,
        None,
    )


dynamic_roi_align_op.register_autograd(_backward, setup_context=_setup_context)
compute_in_float32_under_autocast("dynamic_roi_align", result_dtype_of=0)


def dynamic_roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    offsets: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign with a learned (dx, dy) shift per bin (see the module docstring for the rules).

    Args:
        input: feature map (N, C, H, W).
        rois: (K, 5) rows of (batch_index, x1, y1, x2, y2) in input-image pixels, or a list of
            N tensors (k_i, 4) of boxes, one per image.
        offsets: (K, oh, ow, 2) per-bin (dx, dy), in units of the RoI's width / height.
        output_size: ``oh`` or ``(oh, ow)``; must match the offsets' shape.
        spatial_scale, sampling_ratio, aligned: as in :func:`roi_align`.

    Returns:
        (K, C, oh, ow). Differentiable w.r.t. ``input`` and ``offsets``.
    """
    rois = boxes_to_rois(rois)
    _check_roi_align_args(input, rois)
    pooled_size = _normalize_output_size(output_size)
    expected = (rois.shape[0], *pooled_size, 2)
    if tuple(offsets.shape) != expected:
        raise ValueError(
            f"offsets must have shape (K, oh, ow, 2) = {expected}, got {tuple(offsets.shape)}"
        )
    if offsets.device != input.device or (
        offsets.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type)
    ):
        raise TypeError(
            f"offsets must have the dtype and device of input ({input.dtype}, {input.device}), "
            f"got ({offsets.dtype}, {offsets.device})"
        )
    return dynamic_roi_align_op(
        input, rois, offsets, float(spatial_scale), int(sampling_ratio), bool(aligned)
    )
