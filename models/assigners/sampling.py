"""Training samples of two-stage detectors: a balanced draw of positives and negatives, and the
RoI sampler of Fast R-CNN heads (proposals with the ground truth appended, matched, drawn).

Draws use torch's global random generator (seeded by the trainer), or ``generator``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from models.assigners.max_iou import NEGATIVE, MaxIoUConfig, MaxIoUMatcher
from models.config import StrictModel
from models.ops.boxes import box_iou


def sample_balanced(
    matches: Tensor,
    num_samples: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw up to ``num_samples`` candidates, positives first.

    ``matches`` (N,) as a :class:`~models.assigners.max_iou.MaxIoUMatcher` returns them:
    >= 0 positive, ``NEGATIVE``, or ignored (never drawn). At most
    ``int(num_samples * positive_fraction)`` positives are drawn, and negatives fill the rest;
    within each kind the draw is uniform without replacement (torchvision's
    ``BalancedPositiveNegativeSampler``).

    Returns the indices of the drawn positives and negatives, each in increasing order.
    """
    if num_samples < 1 or not 0 <= positive_fraction <= 1:
        raise ValueError(
            f"need num_samples >= 1 and positive_fraction in [0, 1], got {num_samples} and "
            f"{positive_fraction}"
        )
    positives = torch.nonzero(matches >= 0).squeeze(1)
    negatives = torch.nonzero(matches == NEGATIVE).squeeze(1)
    num_positives = min(int(num_samples * positive_fraction), positives.numel())
    num_negatives = min(num_samples - num_positives, negatives.numel())
    return (
        _draw(positives, num_positives, generator),
        _draw(negatives, num_negatives, generator),
    )


def _draw(indices: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    order = torch.randperm(indices.numel(), generator=generator)[:count].to(indices.device)
    return indices[order].sort().values


class RoISamplerConfig(StrictModel):
    """Which proposals train a Fast R-CNN head (torchvision's RoIHeads sampling)."""

    matcher: MaxIoUConfig = Field(
        default_factory=MaxIoUConfig, description="Positive and negative IoU thresholds."
    )
    num_samples: int = Field(128, gt=0, description="RoIs drawn per image.")
    positive_fraction: float = Field(
        0.5, ge=0, le=1, description="Largest share of positives among the drawn RoIs."
    )


class SampledRoIs(NamedTuple):
    """One image's RoIs to train on, in increasing candidate order."""

    boxes: Tensor  # (S, 4) x1 y1 x2 y2
    matched_gt: Tensor  # (S,) long: the GT index of a positive, NEGATIVE for a negative


class RoISampler:
    """``sampler(proposals, gt_boxes)``: append the GT boxes to the proposals (so that every
    person has at least one perfect RoI, as Fast R-CNN does), match them by IoU and draw
    ``num_samples`` of them with at most ``positive_fraction`` positives."""

    def __init__(self, config: RoISamplerConfig) -> None:
        self.config = config
        self.matcher = MaxIoUMatcher(config.matcher)

    def __call__(
        self, proposals: Tensor, gt_boxes: Tensor, generator: torch.Generator | None = None
    ) -> SampledRoIs:
        candidates = torch.cat((proposals, gt_boxes.to(proposals)))
        matches = self.matcher(box_iou(gt_boxes.to(proposals), candidates))
        positives, negatives = sample_balanced(
            matches, self.config.num_samples, self.config.positive_fraction, generator
        )
        drawn = torch.cat((positives, negatives)).sort().values
        return SampledRoIs(candidates[drawn], matches[drawn])
