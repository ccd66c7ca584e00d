"""RoIAlign (He et al., Mask R-CNN) with torchvision's semantics, as the op ``psearch::roi_align``.

How one output bin is computed, rule for rule as in torchvision's kernel:

- A RoI ``(x1, y1, x2, y2)`` in input pixels is multiplied by ``spatial_scale``. With
  ``aligned=True`` it is then shifted by -0.5, so that the centre of feature pixel ``i`` sits at
  coordinate ``i`` (the half-pixel correction). With ``aligned=False`` it is not shifted, but its
  width and height are raised to at least 1.
- The RoI is cut into ``oh x ow`` equal bins. A bin averages ``gh x gw`` sample points placed at
  the centres of a regular sub-grid; ``gh = sampling_ratio``, or ``ceil(roi_height / oh)`` when
  ``sampling_ratio <= 0`` (the same for ``gw``).
- A sample at ``(y, x)`` with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` reads 0. Otherwise
  negative coordinates are raised to 0 and coordinates past ``H - 1`` / ``W - 1`` are lowered to
  it, and the feature map is interpolated bilinearly there.
- The average divides by ``gh * gw`` (at least 1), samples that read 0 included.

Implementation: every sample's four bilinear corners become (row, weight) pairs into the feature
map seen as an ``(N * H * W, C)`` matrix, so a bin is a weighted sum of rows: exactly what
``embedding_bag`` computes, on any device, without a ``(samples, C)`` intermediate. The gradient
w.r.t. the input is the transposed sum, again one ``embedding_bag`` over the pairs sorted by row.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ops.precision import compute_in_float32_under_autocast, in_compute_dtype


def _normalize_output_size(output_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if len(output_size) != 2 or any(int(size) < 1 for size in output_size):
        raise ValueError(
            f"output_size must be a positive int or (height, width), got {output_size}"
        )
    return int(output_size[0]), int(output_size[1])


def boxes_to_rois(boxes: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """RoIs ``(K, 5)`` = (batch_index, x1, y1, x2, y2), from a ``(K, 5)`` tensor (returned as is)
    or from a list with one ``(k_i, 4)`` box tensor per image."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                "rois must be a (K, 5) tensor of (batch_index, x1, y1, x2, y2) or a list of "
                f"(k, 4) box tensors, got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    if len(boxes) == 0:
        raise ValueError("rois given as a list must hold one (k, 4) box tensor per image, got []")
    for image_index, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
            raise ValueError(
                f"boxes of image {image_index} must have shape (k, 4), "
                f"got {tuple(image_boxes.shape)}"
            )
    batch_index = [
        torch.full_like(image_boxes[:, :1], image_index)
        for image_index, image_boxes in enumerate(boxes)
    ]
    return torch.cat([torch.cat(batch_index), torch.cat(list(boxes))], dim=1)


def _check_roi_align_args(input: Tensor, rois: Tensor) -> None:
    """Checks that need no data (they hold for symbolic shapes under torch.export)."""
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"input must be a floating point tensor, got {input.dtype}")
    if rois.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"rois must have the dtype of input ({input.dtype}), got {rois.dtype}")
    if rois.device != input.device:
        raise ValueError(f"rois are on {rois.device} but input is on {input.device}")


def check_roi_values(rois: Tensor, batch_size: int) -> None:
    """Checks on the RoI values, in the eager kernels (they read data)."""
    if not bool(torch.isfinite(rois).all()):
        raise ValueError("rois contain NaN or infinite values")
    batch_index = rois[:, 0]
    valid = (batch_index == batch_index.floor()) & (batch_index >= 0) & (batch_index < batch_size)
    if not bool(valid.all()):
        raise ValueError(
            f"rois[:, 0] must hold integer batch indices in [0, {batch_size}), "
            f"got {batch_index[~valid][0].item()}"
        )


@dataclass(frozen=True)
class _RoiGeometry:
    """Per RoI ``(K,)``: where it starts, its size and its bins on the feature map."""

    start_x: Tensor
    start_y: Tensor
    width: Tensor
    height: Tensor
    bin_width: Tensor
    bin_height: Tensor
    grid_h: Tensor  # samples per bin along y (long)
    grid_w: Tensor  # samples per bin along x (long)


def _roi_geometry(
    rois: Tensor,
    spatial_scale: float,
    pooled_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> _RoiGeometry:
    pooled_h, pooled_w = pooled_size
    shift = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - shift
    start_y = rois[:, 2] * spatial_scale - shift
    width = (rois[:, 3] * spatial_scale - shift) - start_x
    height = (rois[:, 4] * spatial_scale - shift) - start_y
    if not aligned:
        width = width.clamp(min=1.0)
        height = height.clamp(min=1.0)
    bin_width = width / pooled_w
    bin_height = height / pooled_h
    if sampling_ratio > 0:
        grid_h = torch.full_like(rois[:, 0], sampling_ratio, dtype=torch.long)
        grid_w = grid_h
    else:
        # torchvision's ceil(roi_height / pooled_height), i.e. of the bin size; an empty or
        # inverted RoI gets no samples at all.
        grid_h = torch.ceil(bin_height).long().clamp(min=0)
        grid_w = torch.ceil(bin_width).long().clamp(min=0)
    return _RoiGeometry(start_x, start_y, width, height, bin_width, bin_height, grid_h, grid_w)


@dataclass(frozen=True)
class _BilinearPlan:
    """The feature rows every bin reads: for the ``S`` in-range samples, grouped by bin."""

    corner_row: Tensor  # (S, 4) rows of the (N*H*W, C) feature matrix: (y0x0, y0x1, y1x0, y1x1)
    corner_weight: Tensor  # (S, 4) bilinear weights of those corners
    fraction: Tensor  # (S, 2) (lx, ly): position of the sample between its corners
    moves: Tensor  # (S, 2) bool: x / y of the sample was not clamped, so it has a derivative
    sample_bin: Tensor  # (S,) flat bin index (roi, ph, pw) of each sample
    sample_roi: Tensor  # (S,) RoI of each sample
    bag_offsets: Tensor  # (B,) first corner of each bin in the flattened (4S,) corner lists
    bin_count: Tensor  # (B,) the divisor of each bin's average: gh * gw, at least 1
    roi_size: Tensor  # (K, 2) (width, height) of each RoI on the feature map


def _sample_points(
    roi: _RoiGeometry, offsets: Tensor | None, pooled_size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """All sample points of all bins: (x, y, bin) of shape (S_all,), grouped by bin."""
    pooled_h, pooled_w = pooled_size
    bins_per_roi = pooled_h * pooled_w
    samples_per_bin = (roi.grid_h * roi.grid_w).repeat_interleave(bins_per_roi)
    sample_bin = torch.repeat_interleave(samples_per_bin)
    first_sample = samples_per_bin.cumsum(0) - samples_per_bin
    rank_in_bin = torch.arange(len(sample_bin), device=sample_bin.device) - first_sample[sample_bin]

    sample_roi = sample_bin // bins_per_roi
    bin_y = sample_bin % bins_per_roi // pooled_w
    bin_x = sample_bin % pooled_w
    grid_h, grid_w = roi.grid_h[sample_roi], roi.grid_w[sample_roi]
    bin_height, bin_width = roi.bin_height[sample_roi], roi.bin_width[sample_roi]

    bin_start_y = roi.start_y[sample_roi] + bin_y * bin_height
    bin_start_x = roi.start_x[sample_roi] + bin_x * bin_width
    if offsets is not None:
        # Dynamic RoIAlign: (dx, dy) in units of the RoI's width / height moves the whole bin.
        shift = offsets.reshape(-1, 2)[sample_bin]
        bin_start_x = bin_start_x + shift[:, 0] * roi.width[sample_roi]
        bin_start_y = bin_start_y + shift[:, 1] * roi.height[sample_roi]
    dtype = bin_height.dtype
    y = bin_start_y + ((rank_in_bin // grid_w).to(dtype) + 0.5) * bin_height / grid_h
    x = bin_start_x + ((rank_in_bin % grid_w).to(dtype) + 0.5) * bin_width / grid_w
    return x, y, sample_bin


def _interpolation_axis(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's rules along one axis for samples with -1 <= coord <= size.

    Returns the lower and upper neighbour, the fraction towards the upper one, and whether the
    coordinate was used unclamped (only then does the output depend on it).
    """
    clamped = coord.clamp(min=0)
    low = clamped.long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    fraction = torch.where(at_end, 0, clamped - low)
    moves = (coord > 0) & (coord < size - 1)
    return low, high, fraction, moves


def _bilinear_plan(
    rois: Tensor,
    offsets: Tensor | None,
    feature_shape: tuple[int, ...],
    spatial_scale: float,
    pooled_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> _BilinearPlan:
    _, _, height, width = feature_shape
    bins_per_roi = pooled_size[0] * pooled_size[1]
    num_bins = rois.shape[0] * bins_per_roi
    roi = _roi_geometry(rois, spatial_scale, pooled_size, sampling_ratio, aligned)
    x, y, sample_bin = _sample_points(roi, offsets, pooled_size)

    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    x, y, sample_bin = x[inside], y[inside], sample_bin[inside]
    sample_roi = sample_bin // bins_per_roi

    y_low, y_high, ly, y_moves = _interpolation_axis(y, height)
    x_low, x_high, lx, x_moves = _interpolation_axis(x, width)
    image_start = rois[sample_roi, 0].long() * (height * width)
    row_low, row_high = image_start + y_low * width, image_start + y_high * width
    corner_row = torch.stack(
        (row_low + x_low, row_low + x_high, row_high + x_low, row_high + x_high), 1
    )
    hy, hx = 1 - ly, 1 - lx
    corner_weight = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=1)

    samples_in_bin = torch.bincount(sample_bin, minlength=num_bins)
    count = (roi.grid_h * roi.grid_w).clamp(min=1).to(rois.dtype)
    return _BilinearPlan(
        corner_row=corner_row,
        corner_weight=corner_weight,
        fraction=torch.stack((lx, ly), dim=1),
        moves=torch.stack((x_moves, y_moves), dim=1),
        sample_bin=sample_bin,
        sample_roi=sample_roi,
        bag_offsets=4 * (samples_in_bin.cumsum(0) - samples_in_bin),
        bin_count=count.repeat_interleave(bins_per_roi),
        roi_size=torch.stack((roi.width, roi.height), dim=1),
    )


def _feature_rows(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C): one row per feature-map position."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _bin_rows(pooled: Tensor) -> Tensor:
    """(K, C, oh, ow) -> (K*oh*ow, C): one row per bin."""
    return pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])


def _pool(
    input: Tensor, plan: _BilinearPlan, num_rois: int, pooled_size: tuple[int, int]
) -> Tensor:
    """Average of every bin's samples -> (K, C, oh, ow)."""
    bin_sums = F.embedding_bag(
        plan.corner_row.flatten(),
        _feature_rows(input),
        plan.bag_offsets,
        mode="sum",
        per_sample_weights=plan.corner_weight.flatten(),
    )
    rows = bin_sums / plan.bin_count[:, None]
    return rows.view(num_rois, *pooled_size, -1).permute(0, 3, 1, 2).contiguous()


def _scaled_grad_rows(grad_output: Tensor, plan: _BilinearPlan) -> Tensor:
    """Gradient of each bin's *sum* of samples: (B, C)."""
    return (_bin_rows(grad_output) / plan.bin_count[:, None]).contiguous()


def _pool_backward_input(
    grad_output: Tensor, plan: _BilinearPlan, feature_shape: tuple[int, ...]
) -> Tensor:
    """Gradient w.r.t. the feature map: every corner sends weight * grad of its bin to its row."""
    batch_size, channels, height, width = feature_shape
    corner_row = plan.corner_row.flatten()
    corner_bin = plan.sample_bin.repeat_interleave(4)
    by_row = torch.argsort(corner_row, stable=True)
    corners_per_row = torch.bincount(corner_row, minlength=batch_size * height * width)
    grad_rows = F.embedding_bag(
        corner_bin[by_row],
        _scaled_grad_rows(grad_output, plan),
        corners_per_row.cumsum(0) - corners_per_row,
        mode="sum",
        per_sample_weights=plan.corner_weight.flatten()[by_row],
    )
    return grad_rows.view(batch_size, height, width, channels).permute(0, 3, 1, 2).contiguous()


def _corner_weight_grad(grad_rows: Tensor, feature_rows: Tensor, plan: _BilinearPlan) -> Tensor:
    """Gradient w.r.t. every corner weight: ``grad_rows[bin] . feature_rows[row]``, (S, 4).

    This is embedding_bag's gradient w.r.t. its per-sample weights; its kernel computes the dot
    products without gathering (corners x C) rows, ten times faster than indexing on CPU.
    """
    corner_row = plan.corner_row.flatten()
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_rows,
        feature_rows,
        corner_row,
        plan.bag_offsets,
        plan.sample_bin.repeat_interleave(4),  # the bin ("bag") of every corner
        0,  # mode: sum
    ).view_as(plan.corner_row)


def _sample_position_grad(input: Tensor, grad_output: Tensor, plan: _BilinearPlan) -> Tensor:
    """Gradient w.r.t. the (x, y) position of every in-range sample: (S, 2)."""
    grad_weight = _corner_weight_grad(
        _scaled_grad_rows(grad_output, plan), _feature_rows(input).contiguous(), plan
    )
    lx, ly = plan.fraction.unbind(1)
    hx, hy = 1 - lx, 1 - ly
    # Derivatives of the corner weights (hy*hx, hy*lx, ly*hx, ly*lx) w.r.t. x and y.
    weight_dx = torch.stack((-hy, hy, -ly, ly), dim=1)
    weight_dy = torch.stack((-hx, -lx, hx, lx), dim=1)
    grad_x = (grad_weight * weight_dx).sum(1) * plan.moves[:, 0]
    grad_y = (grad_weight * weight_dy).sum(1) * plan.moves[:, 1]
    return torch.stack((grad_x, grad_y), dim=1)


@torch.library.custom_op("psearch::roi_align", mutates_args=())
def roi_align_op(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The custom op behind :func:`roi_align` (RoIs already in (K, 5) form)."""
    pooled_size = (pooled_height, pooled_width)
    num_rois, channels = rois.shape[0], input.shape[1]
    if num_rois == 0:
        return input.new_zeros(0, channels, *pooled_size)
    check_roi_values(rois, input.shape[0])
    plan = _bilinear_plan(
        in_compute_dtype(rois),
        None,
        input.shape,
        spatial_scale,
        pooled_size,
        sampling_ratio,
        aligned,
    )
    return _pool(in_compute_dtype(input), plan, num_rois, pooled_size).to(input.dtype)


@roi_align_op.register_fake
def _roi_align_fake(
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_height, pooled_width)


@torch.library.custom_op("psearch::roi_align_backward", mutates_args=())
def roi_align_backward_op(
    grad_output: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
) -> Tensor:
    """Gradient of ``psearch::roi_align`` w.r.t. its input (N, C, H, W)."""
    feature_shape = (batch_size, channels, height, width)
    if rois.shape[0] == 0:
        return grad_output.new_zeros(feature_shape)
    plan = _bilinear_plan(
        in_compute_dtype(rois),
        None,
        feature_shape,
        spatial_scale,
        (pooled_height, pooled_width),
        sampling_ratio,
        aligned,
    )
    grad_input = _pool_backward_input(in_compute_dtype(grad_output), plan, feature_shape)
    return grad_input.to(grad_output.dtype)


@roi_align_backward_op.register_fake
def _roi_align_backward_fake(grad_output, rois, *args):
    batch_size, channels, height, width = args[-4:]
    return grad_output.new_empty(batch_size, channels, height, width)


def _roi_align_setup_context(ctx, inputs, output) -> None:
    input, rois, *ctx.pooling_args = inputs
    ctx.feature_shape = tuple(input.shape)
    ctx.save_for_backward(rois)


def _roi_align_backward(ctx, grad_output):
    (rois,) = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = roi_align_backward_op(
            grad_output.contiguous(), rois, *ctx.pooling_args, *ctx.feature_shape
        )
    return grad_input, None, None, None, None, None, None


roi_align_op.register_autograd(_roi_align_backward, setup_context=_roi_align_setup_context)
compute_in_float32_under_autocast("roi_align", result_dtype_of=0)


def roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign with torchvision's semantics (see the module docstring for the exact rules).

    Args:
        input: feature map (N, C, H, W).
        rois: (K, 5) rows of (batch_index, x1, y1, x2, y2) in input-image pixels, or a list of
            N tensors (k_i, 4) of boxes, one per image.
        output_size: bins per RoI, ``oh`` or ``(oh, ow)``.
        spatial_scale: feature-map size / image size, e.g. 1/16 for a stride-16 map.
        sampling_ratio: samples per bin along each axis; ``<= 0`` = ``ceil(roi_size / bins)``.
        aligned: shift RoIs by -0.5 feature pixel (the correct, torchvision ``aligned=True``).

    Returns:
        (K, C, oh, ow). Differentiable w.r.t. ``input`` (not ``rois``, as in torchvision).
    """
    rois = boxes_to_rois(rois)
    _check_roi_align_args(input, rois)
    pooled_height, pooled_width = _normalize_output_size(output_size)
    return roi_align_op(
        input,
        rois,
        float(spatial_scale),
        pooled_height,
        pooled_width,
        int(sampling_ratio),
        bool(aligned),
    )


class RoIAlign(nn.Module):
    """:func:`roi_align` as a module."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = _normalize_output_size(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
