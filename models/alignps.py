"""AlignPS and AlignPS+ (Yan et al., "Anchor-Free Person Search", CVPR 2021).

ResNet (C3-C5) -> AFA neck (models/necks/afa.py) -> one stride-8 map P3 -> the FCOS head with
center sampling on that single level. "Re-id first" (Sec. 3.2, task alignment): P3 itself is
the re-id embedding map; the feature at a location, L2-normalised, is the embedding of the
person detected there, with no extra embedding layer. It is supervised at the positive locations
of the head's assignment by the triplet-aided OIM loss (Sec. 3.3) with the focal modulation of
Sec. 4.2; positives of unlabeled persons (pid -1) only feed OIM's circular queue.

The defaults follow the authors' released code where it differs from the paper (it produced the
published numbers): its CUHK-SYSU head (FCOSReidHeadFocalSubTriQueue in
mmdet/models/dense_heads/fcos_reid_head_focal_sub_triqueue.py of github.com/daodaofr/AlignPS):
the image's mean feature subtracted from P3, deformable last tower convs, the box loss weighted
by the centerness targets, OIM averaged over every positive location, a queue that keeps 64
dimensions, batch-hard triplets. The PRW configs select its PRW head's settings.

AlignPS+ is the same model with deformable 3x3 convs in res3-res5 of the backbone
(``backbone.dcn_stages``; Table 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from models.assigners import CenterSamplingConfig
from models.backbones import STAGE_NAMES, BackboneConfig, backbone_from_config
from models.config import StrictModel
from models.heads.fcos import (
    FCOSHead,
    FCOSHeadConfig,
    FCOSInferenceConfig,
    anchor_points,
    flatten_levels,
    points_inside,
)
from models.losses import AverageOver, OIMConfig, TripletMining
from models.necks.afa import AFA, AFAConfig
from models.preprocess import PreprocessConfig, valid_sizes
from models.types import Detections


def _alignps_head() -> FCOSHeadConfig:
    # One level (P3) and no scale ranges: every person is detected at stride 8 (Sec. 3.2). The
    # released head: deformable last tower convs, box loss weighted by the centerness targets
    # and divided by their sum (mmdetection's FCOS).
    return FCOSHeadConfig(
        num_levels=1,
        assigner=CenterSamplingConfig(radius=1.5, size_ranges=()),
        dcn_on_last_conv=True,
        box_loss_weights="centerness",
        box_loss_normalizer="weights",
    )


def _alignps_inference() -> FCOSInferenceConfig:
    # The authors' released test settings: NMS at IoU 0.5, 100 detections per image.
    return FCOSInferenceConfig(
        max_detections=100, score_thresh=0.05, nms_thresh=0.5, pre_nms_top_k=1000
    )


class AlignPSReidLossConfig(OIMConfig):
    """The triplet-aided OIM loss on the positive locations (Sec. 3.3, Sec. 4.2): the OIM
    settings with AlignPS's defaults."""

    lut_scale: float = Field(
        10.0,
        gt=0,
        description="Factor of the similarities to the LUT: 1 / tau, tau = 0.1 in Sec. 3.3 (the "
        "released PRW head: 15).",
    )
    queue_scale: float = Field(
        10.0, gt=0, description="Factor of the similarities to the queue (1 / tau; released: 10)."
    )
    lut_renormalize: bool = Field(
        False,
        description="Renormalise a LUT row after each update (the released PRW head does, its "
        "CUHK-SYSU head does not).",
    )
    queue_dims: int | None = Field(
        64,
        gt=0,
        description="Leading dimensions of an unlabeled feature kept in the queue (the released "
        "queue keeps 64); null keeps all.",
    )
    average_over: AverageOver = Field(
        "all",
        description="OIM's mean over the labeled positive locations (eq. 2) or over all of them, "
        "unlabeled ones adding zero (the released heads).",
    )
    focal_gamma: float = Field(
        2.0, ge=0, description="Focal OIM exponent (Sec. 4.2, 'following [4]'); 0 = plain OIM."
    )
    triplet_weight: float = Field(
        1.0, ge=0, description="Weight of the triplet term (eq. 4: 1); 0 = OIM alone (Table 4)."
    )
    triplet_margin: float = Field(0.3, ge=0, description="Margin M of eq. 3.")
    triplet_mining: TripletMining = Field(
        "hardest",
        description="hardest: batch-hard over the features and their LUT rows (the released "
        "code); all: every valid triplet (eq. 3).",
    )
    weight: float = Field(1.0, ge=0, description="Weight of the re-id losses in the total.")


class AlignPSConfig(StrictModel):
    """AlignPS; AlignPS+ is ``backbone.dcn_stages: [res3, res4, res5]``."""

    name: Literal["alignps"] = Field("alignps", description="Model registry name.")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="Input preprocessing (travels with exports)."
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="ResNet backbone.")
    afa: AFAConfig = Field(default_factory=AFAConfig, description="Aligned feature aggregation.")
    head: FCOSHeadConfig = Field(
        default_factory=_alignps_head, description="FCOS head on the single AFA output."
    )
    reid_loss: AlignPSReidLossConfig = Field(
        default_factory=AlignPSReidLossConfig, description="Re-id loss on the AFA output."
    )
    inference: FCOSInferenceConfig = Field(
        default_factory=_alignps_inference, description="Top-k, thresholds and NMS at inference."
    )
    subtract_image_mean: bool = Field(
        True,
        description="Subtract each image's mean AFA feature before the head and the re-id loss "
        "(both released heads behind the published numbers do, in their forward; not in the "
        "paper).",
    )

    @field_validator("head", "inference", mode="before")
    @classmethod
    def _over_alignps_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """A partial ``head`` or ``inference`` section changes only the keys it gives: the rest
        keeps AlignPS's defaults, not the generic FCOS head's (a key it gives replaces the
        default's whole value, e.g. ``assigner``)."""
        if not isinstance(value, dict):
            return value
        defaults = _alignps_head() if info.field_name == "head" else _alignps_inference()
        return defaults.model_dump() | value

    @model_validator(mode="after")
    def _check_head_matches_afa(self) -> AlignPSConfig:
        if self.head.in_channels != self.afa.channels:
            raise ValueError(
                f"head.in_channels ({self.head.in_channels}) must equal afa.channels "
                f"({self.afa.channels}): the head reads the AFA output"
            )
        if self.head.num_levels != 1:
            raise ValueError(
                f"head.num_levels must be 1 (AFA has a single output), got {self.head.num_levels}"
            )
        unknown = [s for s in self.afa.in_stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"afa.in_stages {unknown} are not backbone stages {STAGE_NAMES}")
        queue_dims = self.reid_loss.queue_dims
        if queue_dims is not None and queue_dims > self.afa.channels:
            raise ValueError(
                f"reid_loss.queue_dims ({queue_dims}) exceeds the embedding dimension "
                f"afa.channels ({self.afa.channels}); lower it or set it to null (all)"
            )
        return self


class AlignPS(nn.Module):
    """AlignPS person search. ``model(images, targets)`` -> losses; ``model(images)`` ->
    Detections whose embeddings are the L2-normalised AFA features at the detected locations."""

    def __init__(self, config: AlignPSConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocess = config.preprocess
        self.embedding_dim = config.afa.channels
        self.backbone = backbone_from_config(config.backbone, config.afa.in_stages)
        self.afa = AFA(self.backbone.out_channels, self.backbone.strides, config.afa)
        self.strides = [self.afa.stride]
        self.head = FCOSHead(config.head)
        self.reid_loss = config.reid_loss.build(self.embedding_dim)

    def forward(
        self,
        images: Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
        *,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor] | Detections:
        """With targets: the weighted losses ``loss_cls``, ``loss_box``, ``loss_quality``,
        ``loss_oim`` and (unless its weight is 0) ``loss_triplet``. Without: fixed-size
        Detections in the pixels of ``images`` (B, 3, H, W), unused slots all zero, each image's
        boxes inside its ``image_sizes`` (B, 2) (height, width; None = the whole batch) and no
        detection in its padding. In training the padding holds no person, so its locations
        are negatives anyway; ``image_sizes`` only keeps it out of ``subtract_image_mean``."""
        embedding_map = self.afa(self.backbone(images))  # (B, D, H / 8, W / 8)
        if self.config.subtract_image_mean:
            # Removes what every location of an image shares (lighting, a camera's colour cast).
            sizes = valid_sizes(images, image_sizes)
            embedding_map = embedding_map - image_mean(embedding_map, sizes, self.afa.stride)
        outputs = self.head([embedding_map])
        if targets is not None:
            losses, assigned = self.head.loss(outputs, targets, self.strides)
            features, pids = positive_embeddings(embedding_map, assigned, targets)
            reid_losses = self.reid_loss(features, pids)
            weight = self.config.reid_loss.weight
            losses.update({name: weight * value for name, value in reid_losses.items()})
            return losses
        boxes, scores, locations = self.head.predict(
            outputs, self.strides, valid_sizes(images, image_sizes), self.config.inference
        )
        embeddings = gather_embeddings(embedding_map, locations)
        embeddings = torch.where((scores > 0)[..., None], embeddings, 0.0)
        return Detections(boxes, scores, embeddings)


def image_mean(embedding_map: Tensor, image_sizes: Tensor, stride: int) -> Tensor:
    """(B, D, 1, 1) mean feature of each image of a map (B, D, h, w) over the locations whose
    centre lies in its valid region ``image_sizes`` (B, 2) (height, width): the padding of a
    batch left out, so that an image's features do not depend on what it is batched with."""
    points = anchor_points([embedding_map], [stride]).points  # (h * w, 2), as the head's
    mask = points_inside(points, image_sizes).to(embedding_map.dtype)[..., None]  # (B, h * w, 1)
    features = flatten_levels([embedding_map])  # (B, h * w, D)
    mean = (features * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B, D)
    return mean[..., None, None]


def gather_embeddings(embedding_map: Tensor, locations: Tensor) -> Tensor:
    """The L2-normalised features (B, K, D) of a map (B, D, H, W) at flattened locations
    (B, K), indexed in row-major order as the FCOS head indexes its single level."""
    embeddings = flatten_levels([embedding_map])  # (B, H * W, D)
    index = locations[..., None].expand(-1, -1, embeddings.shape[-1])
    return F.normalize(embeddings.gather(1, index).float(), dim=-1)


def positive_embeddings(
    embedding_map: Tensor, assigned: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
) -> tuple[Tensor, Tensor]:
    """The re-id samples of a batch: the L2-normalised features (M, D) at every positive
    location, in (image, location) order, and the pid (M,) of the GT box each is assigned to
    (-1 for an unlabeled person).

    Args:
        embedding_map: (B, D, H, W) the AFA output.
        assigned: per image, (H * W,) the assignment of each location: its GT index, or a
            negative value for a negative or ignored location (the FCOS head's loss).
        targets: per image, ``boxes`` (n, 4) and ``pids`` (n,) long.
    """
    embeddings = flatten_levels([embedding_map])  # (B, N, D)
    positive = torch.stack(list(assigned)) >= 0  # (B, N)
    pids = torch.cat(
        [
            _target_pids(target, i)[image_assigned[image_assigned >= 0]]
            for i, (target, image_assigned) in enumerate(zip(targets, assigned, strict=True))
        ]
    )
    return F.normalize(embeddings[positive].float(), dim=1), pids


def _target_pids(target: dict[str, Tensor], index: int) -> Tensor:
    pids = target.get("pids")
    if pids is None:
        raise ValueError(f"targets[{index}] must have 'pids' (n,) long, -1 for unlabeled persons")
    boxes = target["boxes"]
    if pids.shape != (boxes.shape[0],):
        raise ValueError(
            f"targets[{index}]['pids'] must have shape ({boxes.shape[0]},) to match its boxes, "
            f"got {tuple(pids.shape)}"
        )
    return pids.long()
