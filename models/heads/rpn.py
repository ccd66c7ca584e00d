"""The region proposal network of Faster R-CNN (Ren et al., 2015) on one feature level, with the
settings torchvision uses (and SeqNet inherits) as defaults.

Head: a 3x3 conv + ReLU, then per anchor an objectness logit and four box deltas (1x1 convs).

Training: anchors are matched to the GT boxes by IoU (positive >= 0.7, negative < 0.3, and each
GT box claims its best anchors), 256 anchors per image are drawn with at most half positives;
the loss is the binary cross-entropy of the drawn anchors' objectness (mean) and the smooth L1
(beta 1/9) of the positives' deltas, summed and divided by the number of drawn anchors.

Proposals (fixed size, per image): deltas applied to the anchors, boxes clipped to the image;
candidates narrower or lower than ``min_size`` and anchors centred outside the image's own
extent (its size rounded up to the size divisor, what a batch of one pads it to) get score 0, so
an image's proposals do not depend on the images batched with it. Then the ``pre_nms_top_n``
best by objectness, NMS at 0.7 and the ``post_nms_top_n`` best survivors
(``models.heads.selection.nms_top_k``). Proposals are ranked by objectness probability, as
torchvision's NMS ranks them; slots without a proposal have score 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.assigners.max_iou import MaxIoUConfig, MaxIoUMatcher
from models.assigners.sampling import sample_balanced
from models.config import StrictModel
from models.heads.anchors import AnchorConfig, AnchorGenerator, BoxCoder, flatten_anchor_maps
from models.heads.selection import at_least, nms_top_k
from models.ops.boxes import box_iou, clip_boxes_to_image


def _rpn_matcher() -> MaxIoUConfig:
    return MaxIoUConfig(positive_iou=0.7, negative_iou=(0.0, 0.3), low_quality_matches=True)


class ProposalConfig(StrictModel):
    """How many proposals one image keeps."""

    pre_nms_top_n: int = Field(gt=0, description="Best candidates per image that enter NMS.")
    post_nms_top_n: int = Field(gt=0, description="Proposals per image kept after NMS.")

    @model_validator(mode="after")
    def _check(self) -> ProposalConfig:
        if self.pre_nms_top_n < self.post_nms_top_n:
            raise ValueError(
                f"pre_nms_top_n ({self.pre_nms_top_n}) must be >= post_nms_top_n "
                f"({self.post_nms_top_n})"
            )
        return self


class RPNConfig(StrictModel):
    """The RPN; defaults are torchvision's Faster R-CNN C4 settings, as SeqNet uses them."""

    anchors: AnchorConfig = Field(
        default_factory=AnchorConfig, description="Anchor sizes and aspect ratios (one level)."
    )
    matcher: MaxIoUConfig = Field(
        default_factory=_rpn_matcher, description="Anchor labels: IoU >= 0.7 / < 0.3."
    )
    num_samples: int = Field(256, gt=0, description="Anchors drawn per image for the loss.")
    positive_fraction: float = Field(
        0.5, ge=0, le=1, description="Largest share of positives among the drawn anchors."
    )
    train: ProposalConfig = Field(
        default_factory=lambda: ProposalConfig(pre_nms_top_n=12000, post_nms_top_n=2000),
        description="Proposals per image in training.",
    )
    test: ProposalConfig = Field(
        default_factory=lambda: ProposalConfig(pre_nms_top_n=6000, post_nms_top_n=300),
        description="Proposals per image at inference (fixed size).",
    )
    nms_thresh: float = Field(0.7, gt=0, le=1, description="NMS IoU threshold of proposals.")
    min_size: float = Field(
        1e-3, ge=0, description="Proposals narrower or lower than this (pixels) are dropped."
    )
    box_weights: tuple[float, float, float, float] = Field(
        (1.0, 1.0, 1.0, 1.0), description="Box coder weights (wx, wy, ww, wh) of the deltas."
    )
    smooth_l1_beta: float = Field(1 / 9, ge=0, description="Beta of the box loss' smooth L1.")


class Proposals(NamedTuple):
    """Fixed-size proposals: ``boxes`` (B, P, 4) and objectness ``scores`` (B, P) by
    descending score, 0 in slots without a proposal (their box is zero)."""

    boxes: Tensor
    scores: Tensor


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then objectness logits (A per location) and deltas (4A)."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for conv in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> objectness logits (B, A, H, W), deltas (B, 4A, H, W)."""
        hidden = F.relu(self.conv(features))
        return self.objectness(hidden), self.deltas(hidden)


class RegionProposalNetwork(nn.Module):
    """``rpn(features, image_sizes, targets)`` -> (Proposals, losses); see the module doc.

    Args:
        config: the RPN settings.
        in_channels: channels of the feature map.
        stride: its stride in input pixels.
        size_divisor: what the preprocessing pads images to a multiple of.
    """

    def __init__(
        self, config: RPNConfig, in_channels: int, stride: int, size_divisor: int = 32
    ) -> None:
        super().__init__()
        if len(config.anchors.sizes) != 1:
            raise ValueError(
                f"the RPN reads one feature level; anchors.sizes has {len(config.anchors.sizes)}"
            )
        self.config = config
        self.stride = stride
        self.size_divisor = size_divisor
        self.anchor_generator = AnchorGenerator(config.anchors)
        self.box_coder = BoxCoder(config.box_weights)
        self.matcher = MaxIoUMatcher(config.matcher)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors)

    def forward(
        self,
        features: Tensor,
        image_sizes: Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """Proposals for ``features`` (B, C, H, W) of images of ``image_sizes`` (B, 2) (height,
        width), and with ``targets`` (per image ``boxes`` (n, 4)) the losses ``loss_rpn_cls``
        and ``loss_rpn_reg`` (unweighted). Proposals carry no gradient."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(
            [tuple(features.shape[-2:])], [self.stride], features.device
        )
        logits = flatten_anchor_maps([logits], 1)[..., 0]  # (B, N)
        deltas = flatten_anchor_maps([deltas], 4)  # (B, N, 4)
        settings = self.config.train if self.training else self.config.test
        with torch.no_grad():
            proposals = self.propose(anchors, logits, deltas, image_sizes, settings)
        losses = self.loss(anchors, logits, deltas, targets) if targets is not None else {}
        return proposals, losses

    def propose(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        image_sizes: Tensor,
        settings: ProposalConfig,
    ) -> Proposals:
        """Fixed-size proposals from every anchor's (N, 4) objectness logit (B, N) and deltas
        (B, N, 4); see the module doc."""
        boxes = self.box_coder.decode(deltas.float(), anchors[None])
        boxes = clip_boxes_to_image(boxes, image_sizes[:, None, :])
        scores = torch.where(
            at_least(boxes, self.config.min_size)
            & self._anchors_of_each_image(anchors, image_sizes),
            logits.float().sigmoid(),
            0.0,
        )
        selection = nms_top_k(
            boxes,
            scores,
            self.config.nms_thresh,
            settings.post_nms_top_n,
            pre_nms_top_k=settings.pre_nms_top_n,
        )
        return Proposals(selection.boxes, selection.scores)

    def _anchors_of_each_image(self, anchors: Tensor, image_sizes: Tensor) -> Tensor:
        """(B, N): whether each anchor's centre lies in the image's own padded extent."""
        extent = torch.ceil(image_sizes / self.size_divisor) * self.size_divisor  # (B, 2)
        centre_x = (anchors[:, 0] + anchors[:, 2]) / 2
        centre_y = (anchors[:, 1] + anchors[:, 3]) / 2
        return (centre_x[None] < extent[:, 1:2]) & (centre_y[None] < extent[:, 0:1])

    def loss(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Objectness and box losses of a draw of anchors per image (see the module doc)."""
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]}")
        sampled_logits, labels, positive_deltas, regression_targets = [], [], [], []
        for image, target in enumerate(targets):
            gt_boxes = target["boxes"].to(anchors)
            matches = self.matcher(box_iou(gt_boxes, anchors))
            positives, negatives = sample_balanced(
                matches, self.config.num_samples, self.config.positive_fraction
            )
            drawn = torch.cat((positives, negatives))
            sampled_logits.append(logits[image, drawn])
            labels.append((matches[drawn] >= 0).to(anchors))
            positive_deltas.append(deltas[image, positives])
            regression_targets.append(
                self.box_coder.encode(gt_boxes[matches[positives]], anchors[positives])
            )
        all_labels = torch.cat(labels)
        num_drawn = max(all_labels.numel(), 1)
        objectness = F.binary_cross_entropy_with_logits(
            torch.cat(sampled_logits).float(), all_labels, reduction="sum"
        )
        box = F.smooth_l1_loss(
            torch.cat(positive_deltas).float(),
            torch.cat(regression_targets),
            beta=self.config.smooth_l1_beta,
            reduction="sum",
        )
        return {"loss_rpn_cls": objectness / num_drawn, "loss_rpn_reg": box / num_drawn}
