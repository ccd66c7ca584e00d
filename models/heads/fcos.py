"""The FCOS dense head (Tian et al., 2019) for one class, person, with its losses and inference.

Towers: a classification tower and a regression tower of ``num_convs`` 3x3 convs + GroupNorm +
ReLU, shared by every pyramid level; with ``dcn_on_last_conv`` the last conv of each tower is a
modulated deformable conv (AlignPS's released head). On top: person logits on the classification
tower; ltrb distances and a quality logit on the regression tower. The quality is FCOS's
centerness or, for LLA, PAA's IoU branch (the predicted IoU of the decoded box with its GT); its
probability q is combined with the person probability p into the detection score.

Regression as FCOS v2 (``norm_reg_targets``): ``relu(scale_l * x)`` predicts the distances in
units of the level's stride, with a learnable ``scale_l`` per level; otherwise ``exp(scale_l * x)``
predicts them in pixels.

Locations are flattened level by level, each level in row-major (y, then x) order: location
index ``n`` of the loss's assignments and of ``predict``'s indices is the same everywhere (see
``flatten_levels``), so per-location maps such as re-id embeddings can be gathered with it.

Ignore regions (``ignore_boxes`` in the targets: CrowdHuman's crowds, reflections, statues) are
assigned as if they were persons, so that they compete for locations as the authors' released
FCOS and LLA code does; the locations they win are ``IGNORED``: in no loss at all, neither as
positives nor as negatives.

The released codes differ in small ways that the configs select: the box loss weighted by the
centerness targets (FCOS) or not (LLA), normalised by the number of positives (cvpods, LLA's
code) or by the sum of its weights (mmdetection, AlignPS's code); at inference the
``pre_nms_top_k`` candidates of each level ranked by the score (mmdetection) or by p (cvpods),
and the score p * q (mmdetection) or sqrt(p * q) (cvpods). Both threshold p itself.
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
from models.heads.selection import nms_top_k
from models.losses.detection import IoULossKind, iou_loss, sigmoid_focal_loss
from models.ops.boxes import clip_boxes_to_image, elementwise_box_iou
from models.ops.deform_conv import DeformConvPack

# FCOS's regression ranges for P3-P7: P3 takes boxes whose largest distance is <= 64 pixels, ...
FCOS_SIZE_RANGES = (64.0, 128.0, 256.0, 512.0)

# Assignment of a location in the loss's output: a GT index >= 0 for a positive, or one of these.
NEGATIVE = -1
IGNORED = -2


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
    dcn_on_last_conv: bool = Field(
        False,
        description="The last conv of both towers is a modulated deformable 3x3 conv (DCNv2), "
        "as in AlignPS's released head; false: plain convs (FCOS, LLA).",
    )
    quality: Literal["centerness", "iou", "none"] = Field(
        "centerness",
        description="Quality branch on the regression tower: FCOS centerness, PAA's IoU branch "
        "(LLA) or none; its probability enters the detection score at inference.",
    )
    assigner: AssignerConfig = Field(
        default_factory=lambda: CenterSamplingConfig(size_ranges=FCOS_SIZE_RANGES),
        description="Label assigner: {name: center_sampling, ...} or {name: lla, ...}.",
    )
    focal_alpha: float = Field(0.25, description="Focal loss alpha (classification).")
    focal_gamma: float = Field(2.0, ge=0, description="Focal loss gamma (classification).")
    box_loss: IoULossKind = Field("giou", description="IoU loss of the positives' boxes.")
    box_loss_weights: Literal["uniform", "centerness"] = Field(
        "uniform",
        description="uniform: each positive's box loss weighs 1 (LLA); centerness: it weighs the "
        "centerness target of its location (FCOS, AlignPS).",
    )
    box_loss_normalizer: Literal["positives", "weights"] = Field(
        "positives",
        description="The summed box loss is divided by the number of positives (cvpods: LLA's "
        "and its FCOS baseline's code) or by the sum of its weights (mmdetection: AlignPS's code).",
    )
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
        0.05,
        ge=0,
        lt=1,
        description="Locations whose person probability is at or below this detect nothing (both "
        "released codes threshold the class probability, before the quality enters).",
    )
    nms_thresh: float = Field(0.6, gt=0, le=1, description="NMS IoU threshold.")
    pre_nms_top_k: int = Field(1000, gt=0, description="Best locations per level fed to NMS.")
    rank_by: Literal["score", "class"] = Field(
        "score",
        description="What picks a level's pre_nms_top_k best locations: the detection score "
        "(mmdetection: AlignPS) or the person probability (cvpods: LLA).",
    )
    score: Literal["product", "sqrt_product"] = Field(
        "product",
        description="Detection score from the person probability p and the quality probability "
        "q: p * q (mmdetection: AlignPS) or sqrt(p * q) (cvpods: LLA and its FCOS baseline); p "
        "alone without a quality branch.",
    )

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
    for index in range(config.num_convs):
        if config.dcn_on_last_conv and index == config.num_convs - 1:
            layers.append(
                DeformConvPack(channels, config.feat_channels, 3, padding=1, modulated=True)
            )
        else:
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
        # A deformable conv keeps its own (nn.Conv2d-like) weight fill, as mmcv's DCNv2 does in
        # the released head, with a zero bias and a zero offset predictor: it starts undeformed.
        for module in self.modules():
            if isinstance(module, DeformConvPack):
                module.reset_parameters()
                nn.init.zeros_(module.bias)
                module.init_offset()
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
            targets: B dicts with ``boxes`` (n, 4) x1 y1 x2 y2 in input pixels (every box,
                labeled or not, is a person) and optionally ``ignore_boxes`` (m, 4), regions
                that are neither person nor background; other keys are not read.
            strides: the stride of each level.

        Returns:
            ``{"loss_cls", "loss_box"[, "loss_quality"]}`` already weighted, and per image the
            assignment of every location, (N,) long: the index of its GT box, ``NEGATIVE`` or
            ``IGNORED``.
        """
        # Losses in float32 whatever the autocast dtype: box areas overflow float16.
        logits = flatten_levels(outputs.cls_logits)[..., 0].float()  # (B, N)
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]}")
        anchors, boxes = self.decode(outputs, strides)
        boxes = boxes.float()  # (B, N, 4)
        gt_boxes = [_target_boxes(target, i, "boxes").to(boxes) for i, target in enumerate(targets)]
        assigned = [
            self._assign(
                anchors, gt, _target_boxes(target, i, "ignore_boxes").to(boxes), image_logits, pred
            )
            for i, (target, gt, image_logits, pred) in enumerate(
                zip(targets, gt_boxes, logits, boxes, strict=True)
            )
        ]
        assignment = torch.stack(assigned)  # (B, N)
        positive = assignment >= 0
        # The positives in (image, location) order, and the GT box of each: (M, 4).
        positive_boxes = boxes[positive]
        matched_gt = torch.cat([gt[a[a >= 0]] for gt, a in zip(gt_boxes, assigned, strict=True)])
        positive_points = anchors.points.expand(positive.shape[0], -1, -1)[positive]  # (M, 2)
        num_positives = _mean_over_processes(positive.sum().float()).clamp(min=1.0)

        cfg = self.config
        considered = assignment != IGNORED
        cls_loss = sigmoid_focal_loss(
            logits[considered],
            positive[considered].float(),
            cfg.focal_alpha,
            cfg.focal_gamma,
            reduction="sum",
        )
        losses = {
            "loss_cls": cfg.cls_loss_weight * cls_loss / num_positives,
            "loss_box": cfg.box_loss_weight
            * self._box_loss(positive_points, positive_boxes, matched_gt, num_positives),
        }
        if outputs.quality is not None:
            quality_logits = flatten_levels(outputs.quality)[..., 0].float()[positive]  # (M,)
            quality_targets = self._quality_targets(
                positive_points, positive_boxes.detach(), matched_gt
            )
            quality_loss = F.binary_cross_entropy_with_logits(
                quality_logits, quality_targets, reduction="sum"
            )
            losses["loss_quality"] = cfg.quality_loss_weight * quality_loss / num_positives
        return losses, assigned

    def _assign(
        self,
        anchors: AnchorPoints,
        gt_boxes: Tensor,
        ignore_boxes: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
    ) -> Tensor:
        """One image's assignment (N,): persons and ignore regions compete for the locations as
        one set of GT boxes; what an ignore region wins is ``IGNORED``."""
        assigned = self.assigner(
            points=anchors.points,
            strides=anchors.strides,
            level_ids=anchors.level_ids,
            gt_boxes=torch.cat([gt_boxes, ignore_boxes]),
            cls_logits=cls_logits.detach(),
            pred_boxes=pred_boxes.detach(),
        )
        return torch.where(assigned >= len(gt_boxes), IGNORED, assigned)

    def _box_loss(
        self, points: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, num_positives: Tensor
    ) -> Tensor:
        """The IoU loss of the positives (M,) weighted and normalised as the config says."""
        cfg = self.config
        if cfg.box_loss_weights == "centerness":
            weights = centerness_targets(points, gt_boxes)
        else:
            weights = torch.ones_like(pred_boxes[:, 0])
        loss = iou_loss(pred_boxes, gt_boxes, kind=cfg.box_loss, reduction="sum", weights=weights)
        if cfg.box_loss_normalizer == "weights":
            return loss / weights.sum().clamp(min=torch.finfo(weights.dtype).eps)
        return loss / num_positives

    def _quality_targets(self, points: Tensor, pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        if self.config.quality == "centerness":
            return centerness_targets(points, gt_boxes)
        return elementwise_box_iou(pred_boxes, gt_boxes)

    def predict(
        self,
        outputs: FCOSOutputs,
        strides: Sequence[int],
        image_sizes: Tensor,
        config: FCOSInferenceConfig,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Fixed-size detections: the best ``pre_nms_top_k`` locations of each level whose person
        probability passes ``score_thresh``, NMS, then the ``max_detections`` best survivors.

        Args:
            image_sizes: (B, 2) (height, width) of each image in the padded batch: its boxes
                are clipped to it, and its locations in the padding score 0 (never detected).

        Returns:
            boxes (B, K, 4) in input pixels, scores (B, K) in descending order, and the location
            index (B, K) of each detection (see the module doc); K = max_detections. Unused slots
            have score 0, a zero box and location 0.
        """
        anchors, boxes = self.decode(outputs, strides)
        boxes = clip_boxes_to_image(boxes, image_sizes[:, None, :])
        probs = flatten_levels(outputs.cls_logits)[..., 0].sigmoid()  # (B, N)
        probs = torch.where(points_inside(anchors.points, image_sizes), probs, 0.0)
        scores = self._detection_scores(probs, outputs.quality, config.score)
        rank_keys = probs if config.rank_by == "class" else scores
        level_sizes = [m.shape[-2] * m.shape[-1] for m in outputs.cls_logits]
        locations = _top_per_level(rank_keys, level_sizes, config.pre_nms_top_k)  # (B, T)

        # Location N is an empty candidate (probability and score 0, zero box) that pads levels
        # with fewer than pre_nms_top_k locations, without Python branches on tensor sizes that
        # an exported graph could not keep.
        probs = F.pad(probs, (0, 1)).gather(1, locations)
        scores = F.pad(scores, (0, 1)).gather(1, locations)
        boxes = F.pad(boxes, (0, 0, 0, 1)).gather(1, locations[..., None].expand(-1, -1, 4))
        scores = torch.where(probs > config.score_thresh, scores, 0.0)

        selected = nms_top_k(boxes, scores, config.nms_thresh, config.max_detections)
        locations = torch.where(selected.scores > 0, locations.gather(1, selected.indices), 0)
        boxes, scores = selected.boxes, selected.scores
        return boxes, scores, locations

    @staticmethod
    def _detection_scores(
        probs: Tensor, quality: list[Tensor] | None, combine: Literal["product", "sqrt_product"]
    ) -> Tensor:
        """(B, N) detection scores from the person probabilities and the quality branch."""
        if quality is None:
            return probs
        scores = probs * flatten_levels(quality)[..., 0].sigmoid()
        return scores.sqrt() if combine == "sqrt_product" else scores


def _top_per_level(keys: Tensor, level_sizes: Sequence[int], k: int) -> Tensor:
    """(B, L * k) location indices of the k largest ``keys`` (B, N) of each level, in level
    order; a level with fewer than k locations is padded with the index N."""
    num_locations = keys.shape[1]
    chosen, start = [], 0
    for size in level_sizes:
        # Padded with -1, below every key (keys are probabilities), so padding ranks last.
        level_keys = F.pad(keys[:, start : start + size], (0, k), value=-1.0)
        _, index = level_keys.topk(k, dim=1)
        chosen.append(torch.where(index < size, index + start, num_locations))
        start = start + size
    return torch.cat(chosen, dim=1)


def points_inside(points: Tensor, image_sizes: Tensor) -> Tensor:
    """(B, N) whether each location (N, 2) x, y lies inside each image (B, 2) height, width."""
    x, y = points[None, :, 0], points[None, :, 1]
    return (x < image_sizes[:, 1:2]) & (y < image_sizes[:, 0:1])


def _target_boxes(target: dict[str, Tensor], index: int, key: str) -> Tensor:
    """``target[key]`` (n, 4), checked. Every target has ``boxes``; one without
    ``ignore_boxes`` has no ignore region."""
    if not isinstance(target, dict) or "boxes" not in target:
        raise ValueError(f"targets[{index}] must be a dict with 'boxes' (n, 4)")
    boxes = target.get(key)
    if boxes is None:
        return torch.zeros(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"targets[{index}]['{key}'] must have shape (n, 4), got {tuple(boxes.shape)}"
        )
    return boxes
