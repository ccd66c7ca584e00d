"""Slow, obviously correct references for RoIAlign, dynamic RoIAlign and NMS.

They loop over RoIs, bins and samples (boxes for NMS) in Python, one rule per line, following
torchvision's CPU kernels literally, so that the fast ops in ``models.ops`` can be checked
against them. Arithmetic stays in the input's dtype (0-dim tensors for RoIAlign, so that autograd
gives reference gradients; NumPy scalars for NMS). Use them on tiny inputs only.
"""

import math

import numpy as np
import torch
from torch import Tensor


def _as_rois(rois: Tensor | list[Tensor]) -> Tensor:
    if isinstance(rois, Tensor):
        return rois
    rows = []
    for image_index, boxes in enumerate(rois):
        for box in boxes:
            rows.append(torch.cat((box.new_tensor([image_index]), box)))
    return torch.stack(rows) if rows else rois[0].new_zeros(0, 5)


def _as_pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    return output_size[0], output_size[1]


def _bilinear_interpolate(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Value of ``feature`` (C, H, W) at (y, x) under torchvision's border rules -> (C,)."""
    height, width = feature.shape[1:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feature.new_zeros(feature.shape[0])
    if y <= 0:
        y = torch.zeros_like(y)
    if x <= 0:
        x = torch.zeros_like(x)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = torch.full_like(y, y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = torch.full_like(x, x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def _roi_align_loops(
    input: Tensor,
    rois: Tensor,
    offsets: Tensor | None,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    pooled_height, pooled_width = _as_pair(output_size)
    channels = input.shape[1]
    outputs = []
    for k, roi in enumerate(rois):
        feature = input[int(roi[0])]
        shift = 0.5 if aligned else 0.0
        roi_start_w = roi[1] * spatial_scale - shift
        roi_start_h = roi[2] * spatial_scale - shift
        roi_end_w = roi[3] * spatial_scale - shift
        roi_end_h = roi[4] * spatial_scale - shift
        roi_width = roi_end_w - roi_start_w
        roi_height = roi_end_h - roi_start_h
        if not aligned:
            roi_width = torch.clamp(roi_width, min=1.0)
            roi_height = torch.clamp(roi_height, min=1.0)
        bin_size_h = roi_height / pooled_height
        bin_size_w = roi_width / pooled_width
        if sampling_ratio > 0:
            grid_h = grid_w = sampling_ratio
        else:
            grid_h = math.ceil(roi_height / pooled_height)
            grid_w = math.ceil(roi_width / pooled_width)
        count = max(grid_h * grid_w, 1)

        bins = []  # bins[ph][pw]: (C,)
        for ph in range(pooled_height):
            bins.append([])
            for pw in range(pooled_width):
                bin_start_h = roi_start_h + ph * bin_size_h
                bin_start_w = roi_start_w + pw * bin_size_w
                if offsets is not None:
                    dx, dy = offsets[k, ph, pw]
                    bin_start_w = bin_start_w + dx * roi_width
                    bin_start_h = bin_start_h + dy * roi_height
                total = input.new_zeros(channels)
                for iy in range(grid_h):
                    y = bin_start_h + (iy + 0.5) * bin_size_h / grid_h
                    for ix in range(grid_w):
                        x = bin_start_w + (ix + 0.5) * bin_size_w / grid_w
                        total = total + _bilinear_interpolate(feature, y, x)
                bins[ph].append(total / count)
        outputs.append(torch.stack([torch.stack(row, dim=-1) for row in bins], dim=-2))
    if not outputs:
        return input.new_zeros(0, channels, pooled_height, pooled_width)
    return torch.stack(outputs)


def roi_align_reference(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """Loop version of :func:`models.ops.roi_align.roi_align`."""
    return _roi_align_loops(
        input, _as_rois(rois), None, output_size, spatial_scale, sampling_ratio, aligned
    )


def dynamic_roi_align_reference(
    input: Tensor,
    rois: Tensor | list[Tensor],
    offsets: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """Loop version of :func:`models.ops.dynamic_roi_align.dynamic_roi_align`.

    Bin (ph, pw) of RoI k starts at ``(start_w + pw * bin_w + dx * roi_w,
    start_h + ph * bin_h + dy * roi_h)`` with ``(dx, dy) = offsets[k, ph, pw]``; everything else
    is RoIAlign.
    """
    return _roi_align_loops(
        input, _as_rois(rois), offsets, output_size, spatial_scale, sampling_ratio, aligned
    )


def _iou(a: np.ndarray, b: np.ndarray) -> np.floating:
    """IoU of two xyxy boxes in their own dtype; inverted boxes are empty, 0 / 0 counts as 0."""
    area_a = max(a[2] - a[0], 0) * max(a[3] - a[1], 0)
    area_b = max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = w * h
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: visit boxes by decreasing score (ties: lower index first), keep a box unless
    a kept box overlaps it with IoU > iou_threshold. Returns kept indices in visiting order."""
    box_values = boxes.detach().cpu().numpy()
    score_values = scores.detach().cpu().numpy()
    order = sorted(range(len(score_values)), key=lambda i: -score_values[i])
    suppressed = [False] * len(order)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[position + 1 :]:
            if not suppressed[j] and float(_iou(box_values[i], box_values[j])) > iou_threshold:
                suppressed[j] = True
    return torch.tensor(keep, dtype=torch.long)


def batched_nms_reference(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float
) -> Tensor:
    """NMS within each category of ``idxs``; kept indices by decreasing score, ties by index."""
    keep = []
    for category in sorted(set(idxs.tolist())):
        members = [i for i, c in enumerate(idxs.tolist()) if c == category]
        kept = nms_reference(boxes[members], scores[members], iou_threshold)
        keep.extend(members[i] for i in kept.tolist())
    score_values = scores.tolist()
    keep.sort(key=lambda i: (-score_values[i], i))
    return torch.tensor(keep, dtype=torch.long)
