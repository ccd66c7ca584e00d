"""Detection losses shared by the dense heads: sigmoid focal loss and IoU losses on matched boxes.

Both return per-element losses with ``reduction="none"`` so that callers can normalise by what
they choose (FCOS divides the summed classification loss by the number of positives).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.ops.boxes import elementwise_box_iou, elementwise_generalized_box_iou

Reduction = Literal["none", "mean", "sum"]
IoULossKind = Literal["iou", "linear_iou", "giou"]

# -log(IoU) is clamped at IoU = 1e-6 (a loss of about 13.8): boxes that do not overlap at all get
# a large but finite loss instead of infinity.
_MIN_IOU = 1e-6


def _reduce(losses: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        # The mean of nothing is 0, not NaN: an image without objects has no box loss.
        return losses.sum() / max(losses.numel(), 1)
    raise ValueError(f"unknown reduction {reduction!r}; choose 'none', 'mean' or 'sum'")


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
) -> Tensor:
    """Focal loss (Lin et al., 2017) of independent sigmoid classifiers.

    ``loss = -alpha_t * (1 - p_t) ** gamma * log(p_t)`` with ``p = sigmoid(logits)``,
    ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0, ``alpha_t = alpha`` for
    positives and ``1 - alpha`` for negatives. A negative ``alpha`` disables the weighting.
    Targets may be soft (in [0, 1]). ``logits`` and ``targets`` have the same shape.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    targets = targets.to(logits.dtype)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probs = torch.sigmoid(logits)
    p_t = probs * targets + (1 - probs) * (1 - targets)
    losses = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        losses = (alpha * targets + (1 - alpha) * (1 - targets)) * losses
    return _reduce(losses, reduction)


def iou_loss(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    kind: IoULossKind = "iou",
    reduction: Reduction = "none",
    weights: Tensor | None = None,
) -> Tensor:
    """IoU losses of matched x1y1x2y2 boxes ``(..., 4)`` -> ``(...)`` (before reduction).

    kind: "iou" is ``-log(IoU)`` (UnitBox, as FCOS names it), "linear_iou" is ``1 - IoU``,
    "giou" is ``1 - GIoU`` (Rezatofighi et al., 2019). Degenerate boxes (zero or negative
    width/height) have IoU 0, so their losses are finite: 1 for "linear_iou", at most 2 for
    "giou" and ``-log(1e-6)`` for "iou". ``weights`` (shape ``(...)``) scale each pair's loss.
    """
    if kind == "giou":
        losses = 1 - elementwise_generalized_box_iou(pred_boxes, target_boxes)
    elif kind == "linear_iou":
        losses = 1 - elementwise_box_iou(pred_boxes, target_boxes)
    elif kind == "iou":
        losses = -elementwise_box_iou(pred_boxes, target_boxes).clamp(min=_MIN_IOU).log()
    else:
        raise ValueError(f"unknown IoU loss kind {kind!r}; choose 'iou', 'linear_iou' or 'giou'")
    if weights is not None:
        if weights.shape != losses.shape:
            raise ValueError(
                f"weights must have shape {tuple(losses.shape)} (one per box pair), "
                f"got {tuple(weights.shape)}"
            )
        losses = losses * weights
    return _reduce(losses, reduction)
