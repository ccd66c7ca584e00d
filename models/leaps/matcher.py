"""Sample matching: one-to-one Hungarian matching for detection (Sparse R-CNN) and the diverse
re-id sample matching (DRSM, LEAPS Sec. 3.2) for re-id.

Both run on one image at a time, without gradients, during training only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from models.ops.boxes import box_iou, box_scale, elementwise_box_iou, generalized_box_iou

_EPS = 1e-8


class Match(NamedTuple):
    """Matched (proposal, ground truth) pairs: two (K,) long tensors."""

    proposals: Tensor
    targets: Tensor


def focal_cost(logits: Tensor, alpha: float, gamma: float) -> Tensor:
    """(N,) cost of calling each proposal a person: the focal loss of the positive label minus
    that of the negative one (Deformable DETR / Sparse R-CNN)."""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + _EPS).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + _EPS).log()
    return positive - negative


@torch.no_grad()
def hungarian_match(
    logits: Tensor,
    boxes: Tensor,
    target_boxes: Tensor,
    image_size: Tensor | tuple[float, float],
    *,
    class_weight: float,
    l1_weight: float,
    giou_weight: float,
    focal_alpha: float,
    focal_gamma: float,
) -> Match:
    """The one-to-one assignment of least total cost between N proposals and M ground truths.

    cost = class_weight * focal cost + l1_weight * L1 of the boxes divided by the image's size
           - giou_weight * GIoU.

    Args:
        logits: (N,) person logits; boxes (N, 4) and target_boxes (M, 4) x1y1x2y2 in pixels.
        image_size: (2,) this image's own (height, width) (not the padded batch's), which
            normalises the L1 distance.

    Returns:
        min(N, M) pairs, sorted by proposal index.
    """
    if target_boxes.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return Match(empty, empty)
    scale = box_scale(torch.as_tensor(image_size, dtype=torch.float32, device=boxes.device))
    cost = (
        class_weight * focal_cost(logits.float(), focal_alpha, focal_gamma)[:, None]
        + l1_weight * torch.cdist(boxes.float() / scale, target_boxes.float() / scale, p=1)
        - giou_weight * generalized_box_iou(boxes.float(), target_boxes.float())
    )
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return Match(
        torch.as_tensor(rows, dtype=torch.long, device=boxes.device),
        torch.as_tensor(cols, dtype=torch.long, device=boxes.device),
    )


def drsm_weight(iou: Tensor, threshold: float) -> Tensor:
    """LEAPS' re-id weight W = (IoU - theta) / (1 - theta) + 0.5: 0.5 at the threshold, 1.5 for
    a perfect box."""
    return (iou - threshold) / (1 - threshold) + 0.5


class ReidSamples(NamedTuple):
    """The proposals that train re-id in one image: (K,) proposal indices, identities (-1 =
    unlabeled person) and loss weights."""

    proposals: Tensor
    pids: Tensor
    weights: Tensor


@torch.no_grad()
def diverse_reid_samples(
    roi_boxes: Tensor,
    target_boxes: Tensor,
    target_pids: Tensor,
    match: Match,
    *,
    diverse: bool = True,
    weighting: bool = True,
    iou_threshold: float = 0.7,
) -> ReidSamples:
    """Assign identities to proposals for re-id (DRSM).

    - Every one-to-one matched proposal keeps its ground truth's identity (labeled or not).
    - With ``diverse``, every other proposal whose best-overlapping ground truth is a labeled
      person with IoU > ``iou_threshold`` gets that identity too. Proposals around unlabeled
      persons are not added: they have no identity to learn, and their near-duplicate features
      would crowd the queue of unlabeled persons.
    - With ``weighting``, a sample's weight is ``drsm_weight(IoU)``; the matched proposal's IoU
      counts as at least the threshold, so it weighs at least 0.5 (as much as the least trusted
      diverse sample) however poorly it is placed, and one rule ranks all samples by their
      localisation. Without ``weighting`` (or without ``diverse``, the one-to-one baseline)
      every weight is 1.

    The IoU is that of ``roi_boxes`` (N, 4), the boxes the re-id features were pooled from,
    with ``target_boxes`` (M, 4); ``target_pids`` is (M,).
    """
    num_proposals = roi_boxes.shape[0]
    proposals, targets = match.proposals, match.targets
    if diverse and target_boxes.shape[0] > 0:
        best_iou, best_target = box_iou(roi_boxes, target_boxes).max(dim=1)
        extra = (best_iou > iou_threshold) & (target_pids[best_target] >= 0)
        extra[proposals] = False  # matched proposals keep their own match
        extra_proposals = torch.arange(num_proposals, device=roi_boxes.device)[extra]
        proposals = torch.cat([proposals, extra_proposals])
        targets = torch.cat([targets, best_target[extra]])

    if weighting and diverse:
        iou = elementwise_box_iou(roi_boxes[proposals], target_boxes[targets])
        weights = drsm_weight(iou.clamp(min=iou_threshold), iou_threshold)
    else:
        weights = roi_boxes.new_ones(proposals.shape[0])
    return ReidSamples(proposals, target_pids[targets], weights.to(roi_boxes.dtype))
