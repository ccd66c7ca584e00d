"""LEAPS: end-to-end one-step person search with learnable proposals (arXiv:2303.11859).

Pipeline (Fig. 3): ResNet + FPN give F_s8 (P3) and F_s16 (P4). N learnable proposals (boxes in
cx, cy, w, h relative to each image's own size, not to the padded batch, initialised to the whole
image as in Sparse R-CNN; and 256-d features) enter S cascaded dynamic person search heads. Each
stage's detection head refines the boxes and features, which become the next stage's proposals
(boxes detached, as in Sparse R-CNN); the last ``reid.stages`` stages also run a flexible re-id
head on their proposals. Inference takes the last stage's N boxes and scores and the re-id
embeddings of the same proposals, sorted by score, without NMS.

Training is one-to-one Hungarian matching per stage for detection and DRSM for re-id, with the
losses of eq. 2 (see ``criterion.py``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from models.backbones import backbone_from_config
from models.leaps.config import LeapsConfig
from models.leaps.criterion import ReidCriterion, ReidStage, detection_losses
from models.leaps.detection_head import DetectionStage, StageOutput
from models.leaps.matcher import diverse_reid_samples, hungarian_match
from models.leaps.reid_head import FlexibleReidHead, ReidOutput
from models.necks.fpn import FPN
from models.ops.boxes import box_cxcywh_to_xyxy, box_scale, clip_boxes_to_image
from models.preprocess import valid_sizes
from models.targets import check_targets
from models.types import Detections


class StageResult(NamedTuple):
    """What one stage produced, with the proposal boxes (B, N, 4) it started from."""

    proposals: Tensor
    detection: StageOutput
    reid: ReidOutput | None


class Leaps(nn.Module):
    """LEAPS person search model.

    ``model(images, targets)`` in training mode returns the weighted losses; ``model(images)``
    in eval mode returns fixed-size :class:`Detections` with K = N (every proposal, sorted).
    Both take ``image_sizes`` (B, 2), each image's (height, width) inside the padded batch:
    proposals, output boxes and the box losses are relative to the image, not to the batch, so
    an image's detections do not depend on what it is batched with.
    """

    def __init__(self, config: LeapsConfig | dict[str, Any]) -> None:
        super().__init__()
        cfg = config if isinstance(config, LeapsConfig) else LeapsConfig.model_validate(config)
        self.config = cfg
        self.preprocess = cfg.preprocess
        self.embedding_dim = cfg.embedding_dim
        det = cfg.detection

        self.backbone = backbone_from_config(cfg.backbone, cfg.fpn.in_stages)
        self.fpn = FPN(self.backbone.out_channels, self.backbone.strides, cfg.fpn)

        # Learnable proposals: boxes as normalised (cx, cy, w, h), all starting as the whole
        # image; features N(0, 1) like an nn.Embedding.
        whole_image = torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(det.num_proposals, 1)
        self.proposal_boxes = nn.Parameter(whole_image)
        self.proposal_features = nn.Parameter(torch.randn(det.num_proposals, det.hidden_dim))

        self.stages = nn.ModuleList(DetectionStage(det) for _ in range(det.num_stages))
        # 0-based indices of the stages with a re-id head: the last `reid.stages` ones.
        self.reid_stages = tuple(range(det.num_stages - cfg.reid.stages, det.num_stages))
        self.reid_heads = nn.ModuleList(
            FlexibleReidHead(cfg.reid, det.hidden_dim) for _ in self.reid_stages
        )
        self.reid_criterion = ReidCriterion(
            cfg.reid_loss,
            stages=[stage + 1 for stage in self.reid_stages],
            branches=cfg.reid.branches,
            feature_dim=cfg.reid.feature_dim,
        )
        self._init_heads()

    def _init_heads(self) -> None:
        """Sparse R-CNN's initialisation: Xavier for every head matrix, the class bias at the
        prior probability; then the offset predictors at zero (dynamic RoIAlign = RoIAlign)."""
        for module in (self.stages, self.reid_heads):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        prior = self.config.detection.prior_prob
        for stage in self.stages:
            nn.init.constant_(stage.class_logit.bias, -math.log((1 - prior) / prior))
        for head in self.reid_heads:
            head.reset_offsets()

    def forward(
        self,
        images: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        *,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor] | Detections:
        """Training: ``images`` (B, 3, H, W) and per-image ``targets`` (boxes (n, 4) x1y1x2y2 in
        input pixels, pids (n,) long, -1 = unlabeled) -> named losses. Eval: ``images`` ->
        Detections with boxes (B, N, 4), scores (B, N), embeddings (B, N, D). ``image_sizes``
        (B, 2): (height, width) of each image in the batch; None = every image fills it."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        sizes = valid_sizes(images, image_sizes)  # (B, 2)
        features = self.fpn(self.backbone(images))
        if not self.training:
            # Only the last stage's re-id features are used at inference.
            results = self._run_stages(features, sizes, self.reid_stages[-1:])
            return self._detections(results[-1], sizes)
        if targets is None:
            raise ValueError("LEAPS needs targets in training mode (call .eval() to detect)")
        check_targets(targets, images.shape[0])
        results = self._run_stages(features, sizes, self.reid_stages)
        return self._losses(results, targets, sizes)

    def initial_proposals(self, image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """The learnable proposals for images of ``image_sizes`` (B, 2) (height, width): boxes
        (B, N, 4) x1y1x2y2 in input pixels, each image's scaled to its own size (Sparse R-CNN),
        and features (B, N, C)."""
        relative = box_cxcywh_to_xyxy(self.proposal_boxes)  # (N, 4)
        boxes = relative[None] * box_scale(image_sizes)[:, None, :]  # (B, N, 4)
        return boxes, self.proposal_features[None].expand(boxes.shape[0], -1, -1)

    def _run_stages(
        self, features: dict[str, Tensor], image_sizes: Tensor, reid_stages: tuple[int, ...]
    ) -> list[StageResult]:
        features_s8 = features["p3"]
        features_det = features[self.config.detection.feature_level]
        boxes, proposal_features = self.initial_proposals(image_sizes)
        results = []
        first_reid_stage = self.reid_stages[0]
        for index, stage in enumerate(self.stages):
            detection = stage(features_det, boxes, proposal_features)
            reid = None
            if index in reid_stages:
                head = self.reid_heads[index - first_reid_stage]
                reid = head(features_s8, boxes, proposal_features)
            results.append(StageResult(boxes, detection, reid))
            boxes, proposal_features = detection.boxes.detach(), detection.features
        return results

    def _detections(self, last: StageResult, image_sizes: Tensor) -> Detections:
        """The last stage's N proposals by descending score (no NMS, no threshold), boxes
        clipped to their image."""
        if last.reid is None:
            raise RuntimeError("the last stage must have a re-id head")
        scores, order = last.detection.logits.sigmoid().sort(dim=1, descending=True)
        boxes = last.detection.boxes.gather(1, order[..., None].expand(-1, -1, 4))
        boxes = clip_boxes_to_image(boxes, image_sizes[:, None, :])
        embeddings = last.reid.embedding()
        embeddings = embeddings.gather(1, order[..., None].expand(-1, -1, embeddings.shape[-1]))
        return Detections(boxes=boxes, scores=scores, embeddings=embeddings)

    def _losses(
        self,
        results: list[StageResult],
        targets: list[dict[str, Tensor]],
        image_sizes: Tensor,
    ) -> dict[str, Tensor]:
        det, reid_loss = self.config.detection, self.config.reid_loss
        losses: dict[str, Tensor] = {}
        reid_stages: list[ReidStage] = []
        for index, result in enumerate(results):
            output = result.detection
            matches = [
                hungarian_match(
                    output.logits[image],
                    output.boxes[image],
                    target["boxes"],
                    image_sizes[image],
                    class_weight=det.class_weight,
                    l1_weight=det.l1_weight,
                    giou_weight=det.giou_weight,
                    focal_alpha=det.focal_alpha,
                    focal_gamma=det.focal_gamma,
                )
                for image, target in enumerate(targets)
            ]
            stage_losses = detection_losses(output, targets, matches, image_sizes, det)
            losses.update({f"{name}_s{index + 1}": value for name, value in stage_losses.items()})
            if result.reid is None:
                continue
            samples = [
                diverse_reid_samples(
                    result.proposals[image],
                    target["boxes"],
                    target["pids"],
                    match,
                    diverse=reid_loss.drsm,
                    weighting=reid_loss.drsm_weighting,
                    iou_threshold=reid_loss.drsm_iou,
                )
                for image, (target, match) in enumerate(zip(targets, matches, strict=True))
            ]
            head = self.reid_heads[index - self.reid_stages[0]]
            reid_stages.append(
                ReidStage(
                    index + 1,
                    head.sample_features(result.reid, samples),
                    torch.cat([s.pids for s in samples]),
                    torch.cat([s.weights for s in samples]),
                )
            )
        losses.update(self.reid_criterion(reid_stages))
        return losses
