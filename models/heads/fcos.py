"""The FCOS dense head (Tian et al., 2019) for one class, person, with its losses and inference.

Towers: a classification tower and a regression tower of ``num_convs`` 3x3 convs + GroupNorm +
ReLU, shared by every pyramid level. On top: person logits on the classification tower; ltrb
distances and a quality logit on the regression tower. The quality is FCOS's centerness or, for
LLA, PAA's IoU branch (the predicted IoU of the decoded box with its GT); its sigmoid multiplies
the person probability at inference.

Regression as FCOS v2 (``norm_reg_targets``): ``relu(scale_l * x)`` predicts the distances in
units of the level's stride, with a learnable ``scale_l`` per level; otherwise ``exp(scale_l * x)``
predicts them in pixels.

Locations are flattened level by level, each level in row-major (y, then x) order: location
index ``n`` of the loss's assignments and of ``predict``'s indices is the same everywhere (see
``flatten_levels``), so per-location maps such as re-id embeddings can be gathered with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.assigners import AssignerConfig, CenterSamplingConfig, build_assigner
from models.config import StrictModel
from models.losses.detection import IoULossKind, iou_loss, sigmoid_focal_loss
from models.ops.boxes import clip_boxes_to_image, elementwise_box_iou
from models.ops.nms import batched_nms

# FCOS's regression ranges for P3-P7: P3 takes boxes whose largest distance is <= 64 pixels, ...
FCOS_SIZE_RANGES = (64.0, 128.0, 256.0, 512.0)


class FCOSHeadConfig(StrictModel):
    in_channels: int = Field(256, gt=0, description="Channels of the input feature maps.")
    feat_channels: int = Field(256, gt=0, description="Channels inside the towers.")
    num_convs: int = Field(4, ge=0, description="3x3 conv + norm + ReLU layers per tower.")
    norm: Literal["gn", "none"] = Field("gn", description="Normalisation in the towers.")
    gn_groups: int = Field(32, gt=0, description="GroupNorm groups (norm 'gn').")
    num_levels: int = Field(
        5, gt=0, description="Pyramid levels the head sees (P3-P7: 5; AlignPS: 1, P3 only)."
    )
    prior_prob: float = Field(
        0.01, gt=0, lt=1, description="Initial person probability (classification bias init)."
    )
    norm_reg_targets: bool = Field(
        True,
        description="FCOS v2: ReLU distances in units of the stride; false: exp, in pixels.",
    )
    quality: Literal["centerness", "iou", "none"] = Field(
        "centerness",
        description="Quality branch on the regression tower: FCOS centerness, PAA's IoU branch "
        "(LLA) or none; its sigmoid multiplies the score at inference.",
    )
    assigner: AssignerConfig = Field(
        default_factory=lambda: CenterSamplingConfig(size_ranges=FCOS_SIZE_RANGES),
        description="Label assigner: {name: center_sampling, ...} or {name: lla, ...}.",
    )
    focal_alpha: float = Field(0.25, description="Focal loss alpha (classification).")
    focal_gamma: float = Field(2.0, ge=0, description="Focal loss gamma (classification).")
    box_loss: IoULossKind = Field("giou", description="IoU loss of the positives' boxes.")
    cls_loss_weight: float = Field(1.0, ge=0, description="Weight of loss_cls.")
    box_loss_weight: float = Field(1.0, ge=0, description="Weight of loss_box.")
    quality_loss_weight: float = Field(1.0, ge=0, description="Weight of loss_quality.")

    @model_validator(mode="after")
    def _check(self) -> FCOSHeadConfig:
        if self.norm == "gn" and self.num_convs and self.feat_channels % self.gn_groups:
            raise ValueError(
                f"feat_channels {self.feat_channels} is not divisible by gn_groups {self.gn_groups}"
            )
        size_ranges = getattr(self.assigner, "size_ranges", ())
        if size_ranges and len(size_ranges) + 1 != self.num_levels:
            raise ValueError(
                f"the assigner's size_ranges {size_ranges} define {len(size_ranges) + 1} levels "
                f"but num_levels is {self.num_levels}; give num_levels - 1 boundaries, or none "
                "for no scale constraint"
            )
        return self


class FCOSInferenceConfig(StrictModel):
    max_detections: int = Field(100, gt=0, description="K: detections per image (fixed size).")
    score_thresh: float = Field(
        0.05, ge=0, lt=1, description="Scores at or below this become empty slots."
    )
    nms_thresh: float = Field(0.6, gt=0, le=1, description="NMS IoU threshold.")
    pre_nms_top_k: int = Field(1000, gt=0, description="Best locations per image fed to NMS.")

    @model_validator(mode="after")
    def _check(self) -> FCOSInferenceConfig:
        if self.pre_nms_top_k < self.max_detections:
            raise ValueError(
                f"pre_nms_top_k ({self.pre_nms_top_k}) must be >= max_detections "
                f"({self.max_detections})"
            )
        return self


class FCOSOutputs(NamedTuple):
    """Per-level raw outputs of the head, finest level first.

    cls_logits: (B, 1, H, W) person logits per level.
    ltrb:       (B, 4, H, W) non-negative distances to the left, top, right and bottom box sides,
                in strides (norm_reg_targets) or pixels.
    quality:    (B, 1, H, W) centerness or IoU logits per level; None without a quality branch.
    """

    cls_logits: list[Tensor]
    ltrb: list[Tensor]
    quality: list[Tensor] | None


class AnchorPoints(NamedTuple):
    """Every location of every level, flattened as ``flatten_levels`` does."""

    points: Tensor  # (N, 2) x, y of the location centre in input pixels
    strides: Tensor  # (N,) float stride of the location's level
    level_ids: Tensor  # (N,) long level index, 0 = finest


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Per-level (B, C, H_l, W_l) maps -> (B, N, C), N = sum of H_l * W_l, in location order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], 1)


def anchor_points(maps: Sequence[Tensor], strides: Sequence[int]) -> AnchorPoints:
    """The locations of per-level maps (B, C, H_l, W_l) with the given strides.

    A location (i, j) of a stride-s level is the pixel (j * s + s // 2, i * s + s // 2), the
    centre of its receptive field as FCOS places it.
    """
    if len(maps) != len(strides):
        raise ValueError(f"got {len(maps)} feature levels but {len(strides)} strides")
    points, point_strides, level_ids = [], [], []
    for level, (feature, stride) in enumerate(zip(maps, strides, strict=True)):
        height, width = feature.shape[-2:]
        device = feature.device
        ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
        xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        level_points = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1)
        points.append(level_points)
        point_strides.append(torch.full_like(level_points[:, 0], float(stride)))
        level_ids.append(torch.full_like(level_points[:, 0], level, dtype=torch.long))
    return AnchorPoints(torch.cat(points), torch.cat(point_strides), torch.cat(level_ids))


def distances_to_boxes(points: Tensor, ltrb: Tensor) -> Tensor:
    """Points (..., 2) and pixel distances (..., 4) -> boxes x1 y1 x2 y2 (..., 4)."""
    return torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), dim=-1)


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of points (M, 2) in
    their boxes (M, 4); 0 for a point on or outside its box (possible under LLA)."""
    left_top = points - boxes[:, :2]
    right_bottom = boxes[:, 2:] - points
    smaller = torch.minimum(left_top, right_bottom).clamp(min=0)
    larger = torch.maximum(left_top, right_bottom).clamp(min=1e-6)
    return torch.sqrt((smaller / larger).prod(dim=1))


def _tower(config: FCOSHeadConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = config.in_channels
    for _ in range(config.num_convs):
        layers.append(nn.Conv2d(channels, config.feat_channels, 3, padding=1))
        if config.norm == "gn":
            layers.append(nn.GroupNorm(config.gn_groups, config.feat_channels))
        layers.append(nn.ReLU(inplace=True))
        channels = config.feat_channels
    return nn.Sequential(*layers)


def _mean_over_processes(value: Tensor) -> Tensor:
    """The mean of a scalar over the processes of a distributed run (itself otherwise)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class FCOSHead(nn.Module):
    """FCOS head for persons; see the module doc. ``forward`` -> ``loss`` or ``predict``."""

    def __init__(self, config: FCOSHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.assigner = build_assigner(config.assigner)
        self.cls_tower = _tower(config)
        self.reg_tower = _tower(config)
        tower_out = config.feat_channels if config.num_convs else config.in_channels
        self.cls_logits = nn.Conv2d(tower_out, 1, 3, padding=1)
        self.bbox_pred = nn.Conv2d(tower_out, 4, 3, padding=1)
        self.quality = None if config.quality == "none" else nn.Conv2d(tower_out, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(config.num_levels))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        # Start every location at person probability prior_prob, so that the many negatives do
        # not swamp the focal loss in the first iterations (RetinaNet's initialisation).
        prior = self.config.prior_prob
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, features: Sequence[Tensor]) -> FCOSOutputs:
        """Per-level features (B, in_channels, H_l, W_l), finest first -> raw outputs."""
        if len(features) != self.config.num_levels:
            raise ValueError(
                f"the head was built for {self.config.num_levels} levels, got {len(features)}"
            )
        cls_logits, ltrb, quality = [], [], []
        for level, feature in enumerate(features):
            cls_feature = self.cls_tower(feature)
            reg_feature = self.reg_tower(feature)
            cls_logits.append(self.cls_logits(cls_feature))
            distances = self.bbox_pred(reg_feature) * self.scales[level]
            ltrb.append(F.relu(distances) if self.config.norm_reg_targets else distances.exp())
            if self.quality is not None:
                quality.append(self.quality(reg_feature))
        return FCOSOutputs(cls_logits, ltrb, quality if self.quality is not None else None)

    def decode(self, outputs: FCOSOutputs, strides: Sequence[int]) -> tuple[AnchorPoints, Tensor]:
        """The locations and every location's predicted box (B, N, 4) in input pixels."""
        anchors = anchor_points(outputs.ltrb, strides)
        distances = flatten_levels(outputs.ltrb)
        if self.config.norm_reg_targets:
            distances = distances * anchors.strides[:, None]
        return anchors, distances_to_boxes(anchors.points, distances)

    def loss(
        self, outputs: FCOSOutputs, targets: Sequence[dict[str, Tensor]], strides: Sequence[int]
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Assign locations to GT boxes, then compute the weighted losses.

        Args:
            outputs: the head's forward outputs for a batch of B images.
            targets: B dicts with ``boxes`` (n, 4) x1 y1 x2 y2 in input pixels (other keys are
                ignored; every box, labeled or not, is a person).
            strides: the stride of each level.

        Returns:
            ``{"loss_cls", "loss_box"[, "loss_quality"]}`` already weighted, and per image the
            assigned GT index of every location, (N,) long, -1 = negative.
        """
        # Losses in float32 whatever the autocast dtype: box areas overflow float16.
        logits = flatten_levels(outputs.cls_logits)[..., 0].float()  # (B, N)
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]}")
        anchors, boxes = self.decode(outputs, strides)
        boxes = boxes.float()  # (B, N, 4)
        gt_boxes = [_target_boxes(target, i).to(boxes) for i, target in enumerate(targets)]
        assigned = [
            self.assigner(
                points=anchors.points,
                strides=anchors.strides,
                level_ids=anchors.level_ids,
                gt_boxes=gt,
                cls_logits=image_logits.detach(),
                pred_boxes=image_boxes.detach(),
            )
            for gt, image_logits, image_boxes in zip(gt_boxes, logits, boxes, strict=True)
        ]
        positive = torch.stack(assigned) >= 0  # (B, N)
        # The positives in (image, location) order, and the GT box of each: (M, 4).
        positive_boxes = boxes[positive]
        matched_gt = torch.cat([gt[a[a >= 0]] for gt, a in zip(gt_boxes, assigned, strict=True)])
        num_positives = _mean_over_processes(positive.sum().float()).clamp(min=1.0)

        cfg = self.config
        cls_loss = sigmoid_focal_loss(
            logits, positive.float(), cfg.focal_alpha, cfg.focal_gamma, reduction="sum"
        )
        box_loss = iou_loss(positive_boxes, matched_gt, kind=cfg.box_loss, reduction="sum")
        losses = {
            "loss_cls": cfg.cls_loss_weight * cls_loss / num_positives,
            "loss_box": cfg.box_loss_weight * box_loss / num_positives,
        }
        if outputs.quality is not None:
            quality_logits = flatten_levels(outputs.quality)[..., 0].float()[positive]  # (M,)
            positive_points = anchors.points.expand(positive.shape[0], -1, -1)[positive]
            quality_targets = self._quality_targets(
                positive_points, positive_boxes.detach(), matched_gt
            )
            quality_loss = F.binary_cross_entropy_with_logits(
                quality_logits, quality_targets, reduction="sum"
            )
            losses["loss_quality"] = cfg.quality_loss_weight * quality_loss / num_positives
        return losses, assigned

    def _quality_targets(self, points: Tensor, pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        if self.config.quality == "centerness":
            return centerness_targets(points, gt_boxes)
        return elementwise_box_iou(pred_boxes, gt_boxes)

    def scores(self, outputs: FCOSOutputs) -> Tensor:
        """Every location's detection score (B, N): person probability x quality probability."""
        scores = flatten_levels(outputs.cls_logits)[..., 0].sigmoid()
        if outputs.quality is not None:
            scores = scores * flatten_levels(outputs.quality)[..., 0].sigmoid()
        return scores

    def predict(
        self,
        outputs: FCOSOutputs,
        strides: Sequence[int],
        image_sizes: Tensor,
        max_detections: int = 100,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_top_k: int = 1000,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fixed-size detections: the best ``pre_nms_top_k`` locations of each image, NMS, then
        the ``max_detections`` best survivors.

        Args:
            image_sizes: (B, 2) (height, width) of each image in the padded batch: its boxes
                are clipped to it, and its locations in the padding score 0 (never detected).

        Returns:
            boxes (B, K, 4) in input pixels, scores (B, K) in descending order, and the location
            index (B, K) of each detection (see the module doc); K = max_detections. Unused slots
            have score 0, a zero box and location 0.
        """
        if pre_nms_top_k < max_detections:
            raise ValueError(
                f"pre_nms_top_k ({pre_nms_top_k}) must be >= max_detections ({max_detections})"
            )
        anchors, boxes = self.decode(outputs, strides)
        boxes = clip_boxes_to_image(boxes, image_sizes[:, None, :])
        scores = self.scores(outputs)
        scores = torch.where(points_inside(anchors.points, image_sizes), scores, 0.0)
        # Pad with empty candidates so that top-k never asks for more than there are (small
        # inputs), without Python branches on tensor sizes that an exported graph cannot keep.
        scores = F.pad(scores, (0, pre_nms_top_k))
        boxes = F.pad(boxes, (0, 0, 0, pre_nms_top_k))
        scores, locations = scores.topk(pre_nms_top_k, dim=1)  # (B, T)
        boxes = boxes.gather(1, locations[..., None].expand(-1, -1, 4))
        scores = torch.where(scores > score_thresh, scores, 0.0)

        batch_size = scores.shape[0]
        image_ids = torch.arange(batch_size, device=scores.device)[:, None].expand_as(locations)
        kept = batched_nms(
            boxes.reshape(-1, 4), scores.reshape(-1), image_ids.reshape(-1), nms_thresh
        )
        kept_mask = torch.zeros_like(scores, dtype=torch.bool).reshape(-1).index_fill(0, kept, True)
        scores = torch.where(kept_mask.reshape(scores.shape), scores, 0.0)

        scores, order = scores.topk(max_detections, dim=1)  # (B, K), descending
        used = scores > 0
        boxes = torch.where(
            used[..., None], boxes.gather(1, order[..., None].expand(-1, -1, 4)), 0.0
        )
        locations = locations.gather(1, order)
        locations = torch.where(used, locations, 0)
        return boxes, scores, locations


def points_inside(points: Tensor, image_sizes: Tensor) -> Tensor:
    """(B, N) whether each location (N, 2) x, y lies inside each image (B, 2) height, width."""
    x, y = points[None, :, 0], points[None, :, 1]
    return (x < image_sizes[:, 1:2]) & (y < image_sizes[:, 0:1])


def _target_boxes(target: dict[str, Tensor], index: int) -> Tensor:
    boxes = target.get("boxes") if isinstance(target, dict) else None
    if boxes is None:
        raise ValueError(f"targets[{index}] must be a dict with 'boxes' (n, 4)")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"targets[{index}]['boxes'] must have shape (n, 4), got {tuple(boxes.shape)}"
        )
    return boxes
