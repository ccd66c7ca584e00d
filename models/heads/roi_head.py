"""Fast R-CNN's RoI box head on res5 (the "C4" design of Faster R-CNN with a ResNet): RoIAlign on
the stride-16 res4 map, the res5 stage on every RoI, a global pooling, and the box predictor
(person / background logits and box deltas), with its loss.

The head returns both pooled maps, the RoI input (after an optional module between RoIAlign and
res5, such as PS-ARM's relation mixer) and the res5 output: SeqNet's norm-aware embedding reads
both, its box predictors the res5 one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import StrictModel
from models.ops.roi_align import roi_align


class RoIPoolConfig(StrictModel):
    """RoIAlign and pooling of a res5 RoI head; defaults are torchvision's (and SeqNet's)."""

    output_size: tuple[int, int] = Field(
        (14, 14), description="RoIAlign bins (height, width); res5 halves them."
    )
    sampling_ratio: int = Field(2, description="RoIAlign samples per bin side (<= 0: adaptive).")
    aligned: bool = Field(
        False,
        description="Half-pixel RoIAlign; torchvision's MultiScaleRoIAlign (SeqNet) uses the "
        "legacy false.",
    )
    pooling: Literal["max", "avg"] = Field(
        "max", description="Global pooling of the RoI maps (SeqNet: max)."
    )


class RoIFeatures(NamedTuple):
    """Pooled features of R RoIs: the RoI map entering res5 (R, C_in) and res5's (R, C_out)."""

    before_res5: Tensor
    res5: Tensor


class Res5RoIHead(nn.Module):
    """RoIAlign -> [``before_res5``] -> res5 -> global pooling, on R RoIs.

    Args:
        res5: the res5 stage (e.g. ``ResNet.take_stage("res5")``, with its ImageNet weights).
        config: RoIAlign and pooling settings.
        stride: stride of the feature map the RoIs are pooled from.
        before_res5: a module (R, C, h, w) -> (R, C, h, w) between RoIAlign and res5, or None.
    """

    def __init__(
        self,
        res5: nn.Module,
        config: RoIPoolConfig,
        stride: int,
        before_res5: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.spatial_scale = 1.0 / stride
        self.before_res5 = before_res5
        self.res5 = res5

    def forward(self, features: Tensor, rois: Tensor) -> RoIFeatures:
        """``features`` (B, C, H, W), ``rois`` (R, 5) = (batch index, x1, y1, x2, y2) in input
        pixels -> pooled features of every RoI."""
        cfg = self.config
        pooled = roi_align(
            features, rois, cfg.output_size, self.spatial_scale, cfg.sampling_ratio, cfg.aligned
        )  # (R, C, oh, ow)
        if self.before_res5 is not None:
            pooled = self.before_res5(pooled)
        return RoIFeatures(self._pool(pooled), self._pool(self.res5(pooled)))

    def _pool(self, maps: Tensor) -> Tensor:
        if self.config.pooling == "max":
            return maps.amax(dim=(2, 3))
        return maps.mean(dim=(2, 3))


class FastRCNNPredictor(nn.Module):
    """Person / background logits (R, 2) and the person's box deltas (R, 4) from pooled RoI
    features (R, C). Faster R-CNN predicts deltas for every class, background included, and
    never uses the background's: with one class, only the person's are predicted."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.class_logits = nn.Linear(in_channels, 2)
        self.box_deltas = nn.Linear(in_channels, 4)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.class_logits(features), self.box_deltas(features)

    @staticmethod
    def person_scores(class_logits: Tensor) -> Tensor:
        """(R,) softmax probability of the person class."""
        return class_logits.float().softmax(dim=-1)[..., 1]


def fast_rcnn_losses(
    class_logits: Tensor,
    box_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    smooth_l1_beta: float,
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN's losses over R sampled RoIs: the cross-entropy of ``class_logits`` (R, 2)
    against ``labels`` (R,) (1 person, 0 background), mean; and the smooth L1 of the positives'
    ``box_deltas`` (R, 4) against their ``regression_targets`` (P, 4), summed and divided by R.
    """
    classification = F.cross_entropy(class_logits.float(), labels.long())
    return classification, box_loss(box_deltas, labels, regression_targets, smooth_l1_beta)


def box_loss(
    box_deltas: Tensor, labels: Tensor, regression_targets: Tensor, smooth_l1_beta: float
) -> Tensor:
    """Smooth L1 of the positive RoIs' deltas (``labels`` > 0, in order) against their targets
    (P, 4), summed and divided by the number of RoIs R (torchvision's normalisation)."""
    positive = box_deltas[labels > 0].float()
    summed = F.smooth_l1_loss(positive, regression_targets, beta=smooth_l1_beta, reduction="sum")
    return summed / max(labels.numel(), 1)


def rois_of(boxes: Tensor) -> Tensor:
    """Fixed-size boxes (B, K, 4) as RoIs (B * K, 5) = (image index, x1, y1, x2, y2), image by
    image; export-friendly (no Python loop over a dynamic batch)."""
    batch, count = boxes.shape[:2]
    images = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)
    index = images[:, None, None].expand(batch, count, 1)
    return torch.cat((index, boxes), dim=2).reshape(-1, 5)
