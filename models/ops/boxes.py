"""Box utilities: areas, overlaps, format conversions and the Faster R-CNN box coder.

Boxes are ``(x1, y1, x2, y2)`` in pixels unless a function says otherwise. A box whose
``x2 < x1`` or ``y2 < y1`` is treated as empty: its width or height counts as zero. Overlaps
between boxes of zero area are 0 (never NaN), so losses stay finite on degenerate predictions.

Every function that does arithmetic on coordinates first widens narrow dtypes, as torchvision
does, and returns the widened dtype: float16 and bfloat16 to float32 (a float16 area above
65504 is inf, so two large boxes would have IoU 0 and GIoU NaN), int8, int16 and uint8 to int32.
float32, float64, int32 and int64 are used as they are.
"""

import math

import torch
from torch import Tensor

# Faster R-CNN clamps the predicted log-scale so that exp() cannot overflow: a box may grow at most
# 1000 / 16 times its proposal's size in one step.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _widened(boxes: Tensor) -> Tensor:
    """``boxes`` in a dtype whose products of coordinates cannot overflow (see the module)."""
    if boxes.is_floating_point():
        return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    return boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.int()


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")


def _check_pairwise(boxes1: Tensor, boxes2: Tensor) -> None:
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")


def _check_matched(boxes1: Tensor, boxes2: Tensor) -> None:
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"matched boxes must have the same shape, got {tuple(boxes1.shape)} "
            f"and {tuple(boxes2.shape)}"
        )


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (with finite gradients)."""
    nonzero = denominator > 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1), 0)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of boxes ``(..., 4)`` -> ``(...)``; an inverted box has area 0."""
    _check_boxes("boxes", boxes)
    boxes = _widened(boxes)
    widths = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    heights = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return widths * heights


def _intersection_and_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable box tensors ``(..., 4)``."""
    left1, top1, right1, bottom1 = boxes1.unbind(-1)
    left2, top2, right2, bottom2 = boxes2.unbind(-1)
    width = (torch.minimum(right1, right2) - torch.maximum(left1, left2)).clamp(min=0)
    height = (torch.minimum(bottom1, bottom2) - torch.maximum(top1, top2)).clamp(min=0)
    intersection = width * height
    union = box_area(boxes1) + box_area(boxes2) - intersection
    return intersection, union


def _enclosing_area(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Area of the smallest box that holds both of two broadcastable boxes ``(..., 4)``."""
    left1, top1, right1, bottom1 = boxes1.unbind(-1)
    left2, top2, right2, bottom2 = boxes2.unbind(-1)
    width = (torch.maximum(right1, right2) - torch.minimum(left1, left2)).clamp(min=0)
    height = (torch.maximum(bottom1, bottom2) - torch.minimum(top1, top2)).clamp(min=0)
    return width * height


def _iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    intersection, union = _intersection_and_union(boxes1, boxes2)
    return _safe_divide(intersection, union)


def _giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    intersection, union = _intersection_and_union(boxes1, boxes2)
    enclosing = _enclosing_area(boxes1, boxes2)
    return _safe_divide(intersection, union) - _safe_divide(enclosing - union, enclosing)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union: ``(N, 4), (M, 4) -> (N, M)``, 0 where the union is 0."""
    _check_pairwise(boxes1, boxes2)
    boxes1, boxes2 = _widened(boxes1), _widened(boxes2)
    return _iou(boxes1[:, None, :], boxes2[None, :, :])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019): ``(N, 4), (M, 4) -> (N, M)``.

    ``GIoU = IoU - (C - U) / C`` with ``C`` the area of the smallest enclosing box and ``U`` the
    union; each ratio counts as 0 where its denominator is 0. Values lie in ``[-1, 1]``.
    """
    _check_pairwise(boxes1, boxes2)
    boxes1, boxes2 = _widened(boxes1), _widened(boxes2)
    return _giou(boxes1[:, None, :], boxes2[None, :, :])


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs ``boxes1[i], boxes2[i]``: ``(..., 4), (..., 4) -> (...)``."""
    _check_matched(boxes1, boxes2)
    return _iou(_widened(boxes1), _widened(boxes2))


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of matched pairs: ``(..., 4), (..., 4) -> (...)``."""
    _check_matched(boxes1, boxes2)
    return _giou(_widened(boxes1), _widened(boxes2))


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2) -> (center x, center y, width, height)``, shape ``(..., 4)``."""
    _check_boxes("boxes", boxes)
    x1, y1, x2, y2 = _widened(boxes).unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(center x, center y, width, height) -> (x1, y1, x2, y2)``, shape ``(..., 4)``."""
    _check_boxes("boxes", boxes)
    cx, cy, w, h = _widened(boxes).unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_scale(sizes: Tensor) -> Tensor:
    """Image sizes ``(..., 2)`` as (height, width) -> ``(..., 4)`` (width, height, width,
    height): what divides x1 y1 x2 y2 pixel boxes into coordinates relative to their image."""
    if sizes.shape[-1:] != (2,):
        raise ValueError(f"sizes must have shape (..., 2), got {tuple(sizes.shape)}")
    width_height = sizes.flip(-1)
    return torch.cat((width_height, width_height), dim=-1)


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """Clamp boxes ``(..., 4)`` into an image of ``size = (height, width)``: x to [0, width].

    ``size`` is one pair, or a tensor ``(..., 2)`` of per-image sizes that broadcasts with the
    boxes' leading dimensions (``(B, 1, 2)`` for ``(B, N, 4)`` boxes).
    """
    _check_boxes("boxes", boxes)
    sizes = size if isinstance(size, Tensor) else torch.tensor(size, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), box_scale(sizes.to(boxes.dtype)))


def _centers_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(
    target_boxes: Tensor,
    proposals: Tensor,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Faster R-CNN regression targets that turn ``proposals`` into ``target_boxes``.

    Both ``(..., 4)`` xyxy; returns ``(..., 4)`` deltas ``(dx, dy, dw, dh)`` with
    ``dx = wx * (target_cx - cx) / w`` and ``dw = ww * log(target_w / w)`` (same for y, h), where
    ``weights = (wx, wy, ww, wh)``. Proposals must have positive width and height.
    """
    _check_matched(target_boxes, proposals)
    target_boxes, proposals = _widened(target_boxes), _widened(proposals)
    cx, cy, w, h = _centers_and_sizes(proposals)
    if not bool(((w > 0) & (h > 0)).all()):
        raise ValueError("encode_boxes needs proposals with positive width and height")
    target_cx, target_cy, target_w, target_h = _centers_and_sizes(target_boxes)
    wx, wy, ww, wh = weights
    return torch.stack(
        (
            wx * (target_cx - cx) / w,
            wy * (target_cy - cy) / h,
            ww * torch.log(target_w / w),
            wh * torch.log(target_h / h),
        ),
        dim=-1,
    )


def decode_boxes(
    deltas: Tensor,
    proposals: Tensor,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Tensor:
    """Apply Faster R-CNN deltas ``(..., 4)`` to ``proposals`` ``(..., 4)``; the inverse of encode.

    ``dw / ww`` and ``dh / wh`` are clamped to at most ``scale_clamp`` before ``exp`` so that a
    wild prediction cannot overflow. Shapes must broadcast; returns xyxy boxes.
    """
    _check_boxes("deltas", deltas)
    _check_boxes("proposals", proposals)
    # A float16 box grows out of range: exp(4.1) * 1500 pixels is above 65504.
    deltas, proposals = _widened(deltas), _widened(proposals)
    cx, cy, w, h = _centers_and_sizes(proposals)
    wx, wy, ww, wh = weights
    dx, dy, dw, dh = deltas.unbind(-1)
    new_cx = dx / wx * w + cx
    new_cy = dy / wy * h + cy
    new_w = torch.exp((dw / ww).clamp(max=scale_clamp)) * w
    new_h = torch.exp((dh / wh).clamp(max=scale_clamp)) * h
    return torch.stack(
        (new_cx - 0.5 * new_w, new_cy - 0.5 * new_h, new_cx + 0.5 * new_w, new_cy + 0.5 * new_h),
        dim=-1,
    )
