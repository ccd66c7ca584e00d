"""Fixed-size selection of detections: the best candidates of each image, greedy NMS among them,
then the best survivors, without a data-dependent shape, so that graphs export with it.

NMS runs as ``psearch::batched_nms`` on the present candidates (score > 0), with the image as
the category, which the ONNX export maps to ``NonMaxSuppression`` (``export/onnx.py``). The
candidates it sees and the indices it keeps have data-dependent counts, but the kept indices only
mark the survivors in a fixed-size mask, and a ``topk`` of the masked scores gives the output:
in effect NMS padded to a fixed count. Both runtimes keep exactly the same boxes: the same greedy
rule (IoU strictly above the threshold suppresses, equal scores in index order) on the same
candidates. Leaving the empty candidates out matters for speed: small images have fewer anchors
than the pre-NMS count, and most first-stage slots fall below the score threshold.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.ops.nms import batched_nms


def at_least(boxes: Tensor, min_size: float) -> Tensor:
    """(...,) whether boxes (..., 4) are at least ``min_size`` wide and high (torchvision's
    ``remove_small_boxes`` rule, as a mask)."""
    return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


class Selection(NamedTuple):
    """The ``k`` selected detections of each image, by descending score; empty slots have score
    0, a zero box and index 0."""

    boxes: Tensor  # (B, k, 4)
    scores: Tensor  # (B, k)
    indices: Tensor  # (B, k) long: the candidate each slot holds, for gathering other outputs


def nms_top_k(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    k: int,
    pre_nms_top_k: int | None = None,
) -> Selection:
    """Select up to ``k`` detections per image.

    Args:
        boxes: (B, N, 4) candidate boxes.
        scores: (B, N) their scores, >= 0; a score of 0 marks a candidate that is not there (an
            empty slot, or one thresholded away) and is never selected.
        iou_threshold: NMS IoU threshold (a box is dropped when a kept, better box overlaps it
            by more).
        k: detections per image.
        pre_nms_top_k: only the best this many candidates of each image enter NMS (None: all).
    """
    if k < 1 or (pre_nms_top_k is not None and pre_nms_top_k < k):
        raise ValueError(f"need 1 <= k <= pre_nms_top_k, got k={k}, pre_nms_top_k={pre_nms_top_k}")
    limit = max(scores.shape[1] if pre_nms_top_k is None else pre_nms_top_k, k)
    # Padding with empty candidates keeps topk from asking for more than there are (small
    # inputs) without a Python branch on a tensor size that an exported graph could not keep.
    scores, candidates = F.pad(scores, (0, limit)).topk(limit, dim=1)  # (B, T)
    boxes = F.pad(boxes, (0, 0, 0, limit)).gather(1, candidates[..., None].expand(-1, -1, 4))

    # NMS among the present candidates only (score > 0), with the image as the category.
    batch = scores.shape[0]
    images = torch.arange(batch, device=scores.device)[:, None].expand_as(candidates)
    present = (scores > 0).reshape(-1).nonzero().squeeze(1)
    kept = present[
        batched_nms(
            boxes.reshape(-1, 4)[present],
            scores.reshape(-1)[present],
            images.reshape(-1)[present],
            iou_threshold,
        )
    ]
    survives = torch.zeros_like(scores, dtype=torch.bool).reshape(-1).index_fill(0, kept, True)
    scores = torch.where(survives.view_as(scores), scores, 0.0)

    scores, order = scores.topk(k, dim=1)  # (B, k), descending
    used = scores > 0
    boxes = torch.where(used[..., None], boxes.gather(1, order[..., None].expand(-1, -1, 4)), 0.0)
    indices = torch.where(used, candidates.gather(1, order), 0)
    return Selection(boxes, scores, indices)
