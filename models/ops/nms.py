"""Non-maximum suppression with torchvision's semantics, as ``psearch::nms`` and
``psearch::batched_nms``.

Greedy NMS visits boxes by decreasing score (equal scores: lower index first) and keeps a box
unless an already kept box overlaps it with IoU strictly greater than ``iou_threshold``.

Vectorised in blocks of score-sorted boxes: a block first drops every box that a kept box of
the earlier blocks suppresses, then settles the greedy order inside the block with whole-block
tensor operations (see :func:`_settle_block`). The Python loop runs over blocks, not boxes.
"""

import torch
from torch import Tensor

from models.ops.boxes import box_iou
from models.ops.precision import compute_in_float32_under_autocast

# Boxes settled together; larger blocks mean fewer loop steps but (block x block) masks.
_BLOCK_SIZE = 256


def _suppresses(
    boxes_a: Tensor,
    boxes_b: Tensor,
    classes_a: Tensor | None,
    classes_b: Tensor | None,
    iou_threshold: float,
) -> Tensor:
    """(A, B) bool: box a would suppress box b (same class, IoU > threshold)."""
    # box_iou widens half-precision boxes (float16 areas overflow). Compare in float64 like
    # torchvision's kernel: torch would round the threshold to the IoU's dtype first
    # (0.3 -> 0.30000001 in float32) and keep an IoU that equals it.
    overlapping = box_iou(boxes_a, boxes_b).double() > iou_threshold
    if classes_a is None or classes_b is None:
        return overlapping
    return overlapping & (classes_a[:, None] == classes_b[None, :])


def _settle_block(alive: Tensor, suppresses: Tensor) -> Tensor:
    """Greedy NMS inside one block of score-sorted boxes.

    ``keep[j] = alive[j] and no kept i < j suppresses j``. Each entry depends only on earlier
    ones, so this has exactly one solution; iterating the rule from ``keep = alive`` makes the
    first t entries right after t steps, and a step that changes nothing has reached it.
    ``suppresses`` must hold only pairs i < j (upper triangle).
    """
    keep = alive
    while True:
        settled = alive & ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(settled, keep):
            return keep
        keep = settled


def _take(classes: Tensor | None, selection: Tensor | slice) -> Tensor | None:
    return None if classes is None else classes[selection]


def _greedy_keep(
    sorted_boxes: Tensor, sorted_classes: Tensor | None, iou_threshold: float
) -> Tensor:
    """Which of the score-sorted boxes greedy NMS keeps: bool (N,)."""
    num_boxes = sorted_boxes.shape[0]
    keep = torch.zeros(num_boxes, dtype=torch.bool, device=sorted_boxes.device)
    for start in range(0, num_boxes, _BLOCK_SIZE):
        block = slice(start, min(start + _BLOCK_SIZE, num_boxes))
        kept_before = keep[:start].nonzero().squeeze(1)
        by_kept_before = _suppresses(
            sorted_boxes[kept_before],
            sorted_boxes[block],
            _take(sorted_classes, kept_before),
            _take(sorted_classes, block),
            iou_threshold,
        )
        within_block = _suppresses(
            sorted_boxes[block],
            sorted_boxes[block],
            _take(sorted_classes, block),
            _take(sorted_classes, block),
            iou_threshold,
        ).triu(diagonal=1)
        keep[block] = _settle_block(~by_kept_before.any(dim=0), within_block)
    return keep


def _check_nms_args(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores must have shape (N,) = ({boxes.shape[0]},), got {tuple(scores.shape)}"
        )
    if not boxes.dtype.is_floating_point:
        raise TypeError(f"boxes must be a floating point tensor, got {boxes.dtype}")
    if scores.device != boxes.device:
        raise ValueError(f"scores are on {scores.device} but boxes are on {boxes.device}")


def _nms_kernel(
    boxes: Tensor, scores: Tensor, classes: Tensor | None, iou_threshold: float
) -> Tensor:
    if bool(torch.isnan(boxes).any()) or bool(torch.isnan(scores).any()):
        raise ValueError("nms got NaN in boxes or scores")
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_classes = None if classes is None else classes[order]
    keep = _greedy_keep(boxes[order], sorted_classes, iou_threshold)
    return order[keep]


@torch.library.custom_op("psearch::nms", mutates_args=())
def nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """The custom op behind :func:`nms`."""
    return _nms_kernel(boxes, scores, None, iou_threshold)


@nms_op.register_fake
def _nms_fake(boxes, scores, iou_threshold):
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty(num_kept, dtype=torch.long)


@torch.library.custom_op("psearch::batched_nms", mutates_args=())
def batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """The custom op behind :func:`batched_nms`."""
    return _nms_kernel(boxes, scores, idxs, iou_threshold)


@batched_nms_op.register_fake
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty(num_kept, dtype=torch.long)


# Indices need no cast back; the overlaps are computed in float32 (float16 areas overflow).
compute_in_float32_under_autocast("nms", result_dtype_of=None)
compute_in_float32_under_autocast("batched_nms", result_dtype_of=None)


def _check_threshold(iou_threshold: float) -> float:
    if not iou_threshold >= 0:
        raise ValueError(f"iou_threshold must be >= 0, got {iou_threshold}")
    return float(iou_threshold)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (torchvision's ``nms``).

    Args:
        boxes: (N, 4) xyxy. An inverted box counts as empty (IoU 0 with everything).
        scores: (N,).
        iou_threshold: >= 0; a box is dropped when a kept, higher-ranked box has IoU > this
            with it (compared in float64, as torchvision does).

    Returns:
        int64 indices of the kept boxes, by decreasing score. Equal scores keep their input
        order (torchvision leaves their order unspecified).
    """
    _check_nms_args(boxes, scores)
    return nms_op(boxes, scores, _check_threshold(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS done independently per category ``idxs`` (N,) (torchvision's ``batched_nms``).

    Boxes of different categories never suppress each other. Exact: categories are compared
    directly, not separated by the coordinate-offset trick. Returns kept indices by decreasing
    score (equal scores: lower index first).
    """
    _check_nms_args(boxes, scores)
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    if idxs.dtype.is_floating_point or idxs.dtype == torch.bool:
        raise TypeError(f"idxs must be an integer tensor, got {idxs.dtype}")
    return batched_nms_op(boxes, scores, idxs, _check_threshold(iou_threshold))
