"""The max-IoU matcher of anchor-based and RoI heads: each candidate (anchor or proposal) is
matched to the ground-truth box it overlaps most, and labelled by how much.

- positive: IoU >= ``positive_iou`` -> the index of that GT box;
- negative: ``negative_iou[0] <= IoU < negative_iou[1]`` -> :data:`NEGATIVE`;
- otherwise ignored (between the thresholds, or below the negative range) -> :data:`IGNORED`.

With ``low_quality_matches`` every GT box also claims the candidates that overlap it most (all of
them on a tie), whatever their IoU, so that no person is left without a positive: Faster R-CNN's
RPN rule. Such a candidate is matched to *its own* best GT box, which may be another one, as in
torchvision and Detectron2. Unlike torchvision, a GT box that overlaps no candidate at all claims
nothing (torchvision would turn every candidate with IoU 0 into a positive).

Instances: the RPN (0.7; [0, 0.3); low-quality matches), Fast R-CNN's RoI head (0.5; [0, 0.5)),
RetinaNet (0.5; [0, 0.4); low-quality matches) and the fully decoupled method's RoI head
(0.5; [0.1, 0.5)).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from models.config import StrictModel

NEGATIVE = -1
IGNORED = -2


class MaxIoUConfig(StrictModel):
    """Thresholds of :class:`MaxIoUMatcher`."""

    positive_iou: float = Field(0.5, gt=0, le=1, description="IoU from which a match is positive.")
    negative_iou: tuple[float, float] = Field(
        (0.0, 0.5), description="[low, high): IoU range of the negatives; others are ignored."
    )
    low_quality_matches: bool = Field(
        False, description="Each GT box also claims its best-overlapping candidates (RPN)."
    )

    @model_validator(mode="after")
    def _check(self) -> MaxIoUConfig:
        low, high = self.negative_iou
        if not 0 <= low <= high <= self.positive_iou:
            raise ValueError(
                f"need 0 <= negative_iou[0] <= negative_iou[1] <= positive_iou, got "
                f"negative_iou {self.negative_iou} and positive_iou {self.positive_iou}"
            )
        return self


class MaxIoUMatcher:
    """``matcher(iou)``: ``iou`` (G, N) between G GT boxes and N candidates -> (N,) long, the
    matched GT index of each candidate, :data:`NEGATIVE` or :data:`IGNORED` (module doc)."""

    def __init__(self, config: MaxIoUConfig) -> None:
        self.config = config

    def __call__(self, iou: Tensor) -> Tensor:
        if iou.dim() != 2:
            raise ValueError(f"iou must be a (G, N) matrix, got shape {tuple(iou.shape)}")
        num_candidates = iou.shape[1]
        if iou.shape[0] == 0:  # no person: every candidate has IoU 0
            best_iou = iou.new_zeros(num_candidates)
            best_gt = torch.zeros(num_candidates, dtype=torch.long, device=iou.device)
        else:
            best_iou, best_gt = iou.max(dim=0)
        low, high = self.config.negative_iou
        matches = torch.full_like(best_gt, IGNORED)
        matches[(best_iou >= low) & (best_iou < high)] = NEGATIVE
        positive = best_iou >= self.config.positive_iou
        if self.config.low_quality_matches and iou.shape[0] > 0:
            best_for_each_gt = iou.max(dim=1, keepdim=True).values  # (G, 1)
            claimed = ((iou == best_for_each_gt) & (best_for_each_gt > 0)).any(dim=0)
            positive |= claimed
        return torch.where(positive, best_gt, matches)
