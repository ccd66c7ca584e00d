"""A pure pedestrian detector: ResNet + FPN (P3-P7) + the FCOS head, with center sampling or LLA.

LLA.FCOS (Ge et al., 2021) is this detector with ``head.assigner.name: lla`` and
``head.quality: iou``. It has no re-id branch: its Detections carry (B, K, 0) embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from models.backbones import BackboneConfig, backbone_from_config
from models.config import StrictModel
from models.heads.fcos import FCOSHead, FCOSHeadConfig, FCOSInferenceConfig
from models.necks.fpn import FPN, FPNConfig
from models.preprocess import PreprocessConfig, valid_sizes
from models.types import Detections


def _fcos_fpn() -> FPNConfig:
    # FCOS: P3-P5 from res3-res5, P6 and P7 by stride-2 convs on P5.
    return FPNConfig(channels=256, in_stages=("res3", "res4", "res5"), extra_levels=2)


class FCOSDetectorConfig(StrictModel):
    name: Literal["fcos"] = Field("fcos", description="Model registry name.")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="Input preprocessing (travels with exports)."
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="ResNet backbone.")
    fpn: FPNConfig = Field(default_factory=_fcos_fpn, description="Feature pyramid.")
    head: FCOSHeadConfig = Field(default_factory=FCOSHeadConfig, description="FCOS head.")
    inference: FCOSInferenceConfig = Field(
        default_factory=FCOSInferenceConfig, description="Top-k, thresholds and NMS at inference."
    )

    @model_validator(mode="after")
    def _check_head_matches_fpn(self) -> FCOSDetectorConfig:
        if self.head.in_channels != self.fpn.channels:
            raise ValueError(
                f"head.in_channels ({self.head.in_channels}) must equal fpn.channels "
                f"({self.fpn.channels})"
            )
        levels = len(self.fpn.in_stages) + self.fpn.extra_levels
        if self.head.num_levels != levels:
            raise ValueError(
                f"head.num_levels ({self.head.num_levels}) must equal the FPN's levels "
                f"({levels} = len(fpn.in_stages) + fpn.extra_levels)"
            )
        return self


class FCOSDetector(nn.Module):
    """Pedestrian detector. ``model(images, targets)`` -> losses; ``model(images)`` ->
    Detections with boxes (B, K, 4), scores (B, K) and empty embeddings (B, K, 0)."""

    embedding_dim = 0

    def __init__(self, config: FCOSDetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocess = config.preprocess
        self.backbone = backbone_from_config(config.backbone, config.fpn.in_stages)
        self.fpn = FPN(self.backbone.out_channels, self.backbone.strides, config.fpn)
        self.strides = list(self.fpn.strides.values())
        self.head = FCOSHead(config.head)

    def forward(
        self,
        images: Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
        *,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor] | Detections:
        """With targets: the weighted losses (``loss_cls``, ``loss_box``, ``loss_quality``).
        Without: fixed-size Detections in the pixels of ``images`` (B, 3, H, W), each image's
        boxes inside its ``image_sizes`` (B, 2) (height, width; None = the whole batch) and no
        detection in its padding. Training ignores ``image_sizes``: the padding holds no
        person, so its locations are negatives anyway."""
        outputs = self.head(list(self.fpn(self.backbone(images)).values()))
        if targets is not None:
            losses, _ = self.head.loss(outputs, targets, self.strides)
            return losses
        boxes, scores, _ = self.head.predict(
            outputs, self.strides, valid_sizes(images, image_sizes), self.config.inference
        )
        return Detections(boxes, scores, boxes.new_zeros(*scores.shape, self.embedding_dim))
