"""SeqNet (Li and Miao, "Sequential End-to-end Network for Efficient Person Search", AAAI 2021):
Faster R-CNN C4 followed by a norm-aware re-id head that refines the detector's boxes.

Pipeline (the released code's ``SeqNet`` and ``SeqRoIHeads``):

1. ResNet-50 res1-res4 (stride 16) and an RPN (``models/heads/rpn.py``) give proposals.
2. Faster R-CNN head: RoIAlign 14 x 14 of every proposal, res5, global max pooling, softmax
   person score and box deltas (weights 10, 10, 5, 5): the *first-stage boxes*.
3. Re-id head, with its own res5 (a copy of the first head's): the first-stage boxes, detached,
   are pooled again; NAE (``models/heads/nae.py``) turns the pooled res4 and res5 maps into the
   L2-normalised embedding and a person logit (its norm), and a linear layer + BatchNorm1d ("BN
   neck") predicts deltas that refine the box a second time.

Inference: first-stage boxes scored above ``score_thresh`` (after NMS at 0.4) go through the re-id
head. A detection is the refined box, scored by the first stage ("first classification score"),
with the embedding of the first-stage box; NMS at 0.5 on the refined boxes. The NAE logit only
trains. Fixed-size outputs: every stage keeps ``max_detections`` slots, empty ones scored 0.

Training: the first stage draws 128 RoIs per image from the proposals plus the GT boxes (IoU
>= 0.5 positive, < 0.5 negative, at most half positives); the second stage draws again from the
first stage's boxes of those RoIs plus the GT boxes. Losses, with the released code's names and
weights: ``loss_rpn_cls`` 1, ``loss_rpn_reg`` 1, ``loss_proposal_cls`` 1 (cross-entropy),
``loss_proposal_reg`` 10, ``loss_box_cls`` 1 (binary cross-entropy of the NAE logit),
``loss_box_reg`` 1, ``loss_box_reid`` 1 (OIM, scale 30, on the NAE embeddings of the second
stage's positives; unlabeled persons only feed its queue). Box losses are smooth L1 with beta 1
(the released code's ``F.smooth_l1_loss`` default), summed over positives and divided by the
number of drawn RoIs.

Search: the similarity of a gallery detection is its cosine with the query times its detection
score (confidence-weighted similarity, CWS). The embeddings stay L2-normalised (the contract of
``models.types``) and the model says so with ``confidence_weighted_similarity``: the evaluation
(``training/inference.py``) applies the weight. A query box is embedded by ``embed_boxes``
through the re-id head, unweighted (GT-box mode).

Where we differ from the released code, and why:

- Detections per image: ``max_detections`` slots (100 by default; the code allows 300). With
  the score threshold at 0.5 an image fills few of them (PRW averages 3.6 persons per frame,
  CUHK-SYSU 5.3), and in a fixed-size graph every slot costs a res5 pass.
- Proposals only come from anchors centred in the image's own (size-divisor padded) extent, so
  that an image's results do not depend on its batch; the code tests with batches of one, where
  this is the same.
- Both box predictors predict the person's deltas only; the code also predicts never-used
  background deltas.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.assigners import MaxIoUConfig, RoISampler, RoISamplerConfig, SampledRoIs
from models.backbones import BackboneConfig, backbone_from_config
from models.config import StrictModel
from models.heads.anchors import BoxCoder
from models.heads.nae import NormAwareEmbedding
from models.heads.roi_head import (
    FastRCNNPredictor,
    Res5RoIHead,
    RoIPoolConfig,
    box_loss,
    fast_rcnn_losses,
    rois_of,
)
from models.heads.rpn import Proposals, RegionProposalNetwork, RPNConfig
from models.heads.selection import Selection, at_least, nms_top_k
from models.losses import OIMConfig
from models.ops.boxes import clip_boxes_to_image
from models.ops.roi_align import boxes_to_rois
from models.preprocess import PreprocessConfig, valid_sizes
from models.targets import check_targets
from models.types import Detections


def _seqnet_backbone() -> BackboneConfig:
    # The released code: torchvision's ResNet-50 with trainable BatchNorm, only conv1 and bn1
    # frozen.
    return BackboneConfig(name="resnet50", frozen_stages=0, frozen_stem=True, norm="bn")


def _seqnet_roi_sampler() -> RoISamplerConfig:
    return RoISamplerConfig(
        matcher=MaxIoUConfig(positive_iou=0.5, negative_iou=(0.0, 0.5)),
        num_samples=128,
        positive_fraction=0.5,
    )


class SeqNetLossWeights(StrictModel):
    """Weights of the named losses (the released code's ``SOLVER.LW_*``)."""

    rpn_cls: float = Field(1.0, ge=0, description="loss_rpn_cls (RPN objectness).")
    rpn_reg: float = Field(1.0, ge=0, description="loss_rpn_reg (RPN boxes).")
    proposal_cls: float = Field(1.0, ge=0, description="loss_proposal_cls (first stage).")
    proposal_reg: float = Field(10.0, ge=0, description="loss_proposal_reg (first stage boxes).")
    box_cls: float = Field(1.0, ge=0, description="loss_box_cls (NAE person logit).")
    box_reg: float = Field(1.0, ge=0, description="loss_box_reg (refined boxes).")
    box_reid: float = Field(1.0, ge=0, description="loss_box_reid (OIM).")


class SeqNetReidLossConfig(OIMConfig):
    """OIM on the re-id head's positives: the OIM settings' defaults are SeqNet's released OIM
    (scale 30 for the table and the queue, each row renormalised after its update, one feature
    at a time; the mean over the labeled samples; no focal or triplet term)."""


class SeqNetInferenceConfig(StrictModel):
    """Thresholds and sizes at inference (the released code's ``ROI_HEAD.*_TEST``)."""

    score_thresh: float = Field(
        0.5, ge=0, lt=1, description="First-stage boxes scored at or below this are dropped."
    )
    nms_thresh: float = Field(0.4, gt=0, le=1, description="NMS IoU of the first-stage boxes.")
    refined_nms_thresh: float = Field(
        0.5, gt=0, le=1, description="NMS IoU of the refined boxes (higher: they overlap more)."
    )
    max_detections: int = Field(100, gt=0, description="K: detections per image (fixed size).")
    min_size: float = Field(
        0.01, ge=0, description="Boxes narrower or lower than this (pixels) are dropped."
    )


class SeqNetConfig(StrictModel):
    """SeqNet; defaults are the released code's settings (CUHK-SYSU sizes for OIM)."""

    name: Literal["seqnet"] = Field("seqnet", description="Model registry name.")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="Input preprocessing (travels with exports)."
    )
    backbone: BackboneConfig = Field(
        default_factory=_seqnet_backbone, description="ResNet; res1-res4 here, res5 in the heads."
    )
    rpn: RPNConfig = Field(default_factory=RPNConfig, description="Region proposal network.")
    roi_pool: RoIPoolConfig = Field(
        default_factory=RoIPoolConfig, description="RoIAlign and pooling of both RoI heads."
    )
    roi_sampler: RoISamplerConfig = Field(
        default_factory=_seqnet_roi_sampler, description="Training RoIs of both stages."
    )
    box_weights: tuple[float, float, float, float] = Field(
        (10.0, 10.0, 5.0, 5.0), description="Box coder weights of both RoI heads."
    )
    smooth_l1_beta: float = Field(1.0, ge=0, description="Beta of both RoI heads' box losses.")
    bn_neck: bool = Field(True, description="BatchNorm1d after the refining box regressor.")
    embedding_dim: int = Field(256, gt=1, description="NAE embedding dimension (128 + 128).")
    reid_loss: SeqNetReidLossConfig = Field(
        default_factory=SeqNetReidLossConfig, description="OIM settings."
    )
    loss_weights: SeqNetLossWeights = Field(
        default_factory=SeqNetLossWeights, description="Weights of the named losses."
    )
    inference: SeqNetInferenceConfig = Field(
        default_factory=SeqNetInferenceConfig, description="Thresholds at inference."
    )
    confidence_weighted_similarity: bool = Field(
        True, description="Search similarity = cosine x detection score (CWS)."
    )


class BoxRegressor(nn.Module):
    """The re-id head's box deltas (R, 4): a linear layer, with a BatchNorm1d after it ("BN
    neck"); weights ~ N(0, 0.01), biases 0."""

    def __init__(self, in_channels: int, bn_neck: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_channels, 4)]
        if bn_neck:
            layers.append(nn.BatchNorm1d(4))
        for layer in layers:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class SeqNet(nn.Module):
    """SeqNet person search (see the module doc). ``model(images, targets)`` -> losses;
    ``model(images)`` -> Detections; ``model.embed_boxes(images, boxes)`` -> query embeddings.
    """

    def __init__(self, config: SeqNetConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocess = config.preprocess
        self.embedding_dim = config.embedding_dim
        self.confidence_weighted_similarity = config.confidence_weighted_similarity
        self.backbone = backbone_from_config(config.backbone, ("res4",))
        stride = self.backbone.strides["res4"]
        res4_channels = self.backbone.out_channels["res4"]
        res5_channels = self.backbone.stage_channels["res5"]
        self.rpn = RegionProposalNetwork(
            config.rpn, res4_channels, stride, config.preprocess.size_divisor
        )
        # Faster R-CNN head and re-id head: the same structure, separate weights (the code
        # deep-copies the first into the second, pretrained res5 included).
        self.box_head = Res5RoIHead(
            self.backbone.take_stage("res5"),
            config.roi_pool,
            stride,
            before_res5=self.roi_mixer(res4_channels),
        )
        self.box_predictor = FastRCNNPredictor(res5_channels)
        self.reid_head = copy.deepcopy(self.box_head)
        self.embedding = NormAwareEmbedding((res4_channels, res5_channels), config.embedding_dim)
        self.box_regressor = BoxRegressor(res5_channels, config.bn_neck)
        self.box_coder = BoxCoder(config.box_weights)
        self.roi_sampler = RoISampler(config.roi_sampler)
        self.reid_loss = config.reid_loss.build(config.embedding_dim)

    def roi_mixer(self, channels: int) -> nn.Module | None:
        """The module between RoIAlign and res5 in both RoI heads: none in SeqNet (PS-ARM puts
        its relation mixer there)."""
        return None

    def forward(
        self,
        images: Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
        *,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor] | Detections:
        """Training (with ``targets``): the weighted losses. Eval: fixed-size Detections in the
        pixels of ``images`` (B, 3, H, W), each image's inside its ``image_sizes`` (B, 2)
        (height, width; None = the whole batch)."""
        sizes = valid_sizes(images, image_sizes)
        features = self.backbone(images)["res4"]  # (B, C4, H / 16, W / 16)
        if not self.training:
            return self._detect(features, sizes)
        if targets is None:
            raise ValueError("SeqNet needs targets in training mode (call .eval() to detect)")
        check_targets(targets, images.shape[0])
        return self._losses(features, sizes, targets)

    def embed_boxes(
        self, images: Tensor, boxes: Sequence[Tensor], *, image_sizes: Tensor | None = None
    ) -> Tensor:
        """L2-normalised embeddings (R, D) of given boxes, ``boxes[i]`` (r_i, 4) in the pixels
        of image i (clipped to it): the re-id head on each box, as for the first-stage boxes
        of a detection."""
        if len(boxes) != images.shape[0]:
            raise ValueError(f"got boxes for {len(boxes)} images in a batch of {images.shape[0]}")
        sizes = valid_sizes(images, image_sizes)
        features = self.backbone(images)["res4"]
        clipped = [
            clip_boxes_to_image(image_boxes.to(features), size)
            for image_boxes, size in zip(boxes, sizes, strict=True)
        ]
        embeddings, _ = self.embedding(self.reid_head(features, boxes_to_rois(clipped)))
        return embeddings

    # ----------------------------------------------------------------------------------------
    # Inference

    def _detect(self, features: Tensor, image_sizes: Tensor) -> Detections:
        proposals, _ = self.rpn(features, image_sizes)
        first = self._first_stage(features, proposals, image_sizes)  # (B, K) slots
        batch, slots = first.scores.shape
        pooled = self.reid_head(features, rois_of(first.boxes))
        embeddings, _ = self.embedding(pooled)
        refined = self.box_coder.decode(
            self.box_regressor(pooled.res5).float(), first.boxes.reshape(-1, 4)
        ).view(batch, slots, 4)
        refined = clip_boxes_to_image(refined, image_sizes[:, None, :])
        inference = self.config.inference
        scores = torch.where(at_least(refined, inference.min_size), first.scores, 0.0)
        final = nms_top_k(refined, scores, inference.refined_nms_thresh, slots)
        embeddings = embeddings.float().view(batch, slots, -1)
        embeddings = embeddings.gather(1, final.indices[..., None].expand_as(embeddings))
        embeddings = torch.where((final.scores > 0)[..., None], embeddings, 0.0)
        return Detections(final.boxes, final.scores, embeddings)

    def _first_stage(
        self, features: Tensor, proposals: Proposals, image_sizes: Tensor
    ) -> Selection:
        """The Faster R-CNN head on every proposal slot: the ``max_detections`` best boxes per
        image after the score threshold and NMS."""
        batch, count = proposals.scores.shape
        pooled = self.box_head(features, rois_of(proposals.boxes))
        class_logits, deltas = self.box_predictor(pooled.res5)
        scores = FastRCNNPredictor.person_scores(class_logits).view(batch, count)
        boxes = self.box_coder.decode(deltas.float(), proposals.boxes.reshape(-1, 4))
        boxes = clip_boxes_to_image(boxes.view(batch, count, 4), image_sizes[:, None, :])
        inference = self.config.inference
        keep = (
            (proposals.scores > 0)
            & (scores > inference.score_thresh)
            & at_least(boxes, inference.min_size)
        )
        scores = torch.where(keep, scores, 0.0)
        return nms_top_k(boxes, scores, inference.nms_thresh, inference.max_detections)

    # ----------------------------------------------------------------------------------------
    # Training

    def _losses(
        self, features: Tensor, image_sizes: Tensor, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        proposals, losses = self.rpn(features, image_sizes, targets)
        gt_boxes = [target["boxes"].to(features.dtype) for target in targets]
        # First stage: RoIs drawn from each image's proposals and GT boxes.
        first_rois = [
            self.roi_sampler(image_boxes[image_scores > 0], gt)
            for image_boxes, image_scores, gt in zip(
                proposals.boxes, proposals.scores, gt_boxes, strict=True
            )
        ]
        pooled = self.box_head(features, boxes_to_rois([s.boxes for s in first_rois]))
        class_logits, deltas = self.box_predictor(pooled.res5)
        labels, regression_targets = self._targets(first_rois, gt_boxes)
        losses["loss_proposal_cls"], losses["loss_proposal_reg"] = fast_rcnn_losses(
            class_logits, deltas, labels, regression_targets, self.config.smooth_l1_beta
        )
        # Second stage: the first stage's boxes of those RoIs, detached, drawn again.
        first_boxes = self._decoded(deltas.detach(), first_rois, image_sizes)
        second_rois = [
            self.roi_sampler(boxes, gt) for boxes, gt in zip(first_boxes, gt_boxes, strict=True)
        ]
        pooled = self.reid_head(features, boxes_to_rois([s.boxes for s in second_rois]))
        embeddings, person_logits = self.embedding(pooled)
        labels, regression_targets = self._targets(second_rois, gt_boxes)
        losses["loss_box_cls"] = F.binary_cross_entropy_with_logits(
            person_logits.float(), labels.float()
        )
        losses["loss_box_reg"] = box_loss(
            self.box_regressor(pooled.res5), labels, regression_targets, self.config.smooth_l1_beta
        )
        losses["loss_box_reid"] = self._reid_loss(embeddings, second_rois, targets)
        return self._weighted(losses)

    def _targets(
        self, sampled: Sequence[SampledRoIs], gt_boxes: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Labels (R,) of the drawn RoIs of every image (1 person, 0 background) and the
        regression targets (P, 4) of the positives, in order."""
        labels, targets = [], []
        for rois, gt in zip(sampled, gt_boxes, strict=True):
            positive = rois.matched_gt >= 0
            labels.append(positive.long())
            targets.append(
                self.box_coder.encode(gt[rois.matched_gt[positive]], rois.boxes[positive])
            )
        return torch.cat(labels), torch.cat(targets)

    def _decoded(
        self, deltas: Tensor, sampled: Sequence[SampledRoIs], image_sizes: Tensor
    ) -> list[Tensor]:
        """Per image, the boxes (S_i, 4) the deltas make of its drawn RoIs, clipped to it."""
        counts = [len(rois.boxes) for rois in sampled]
        decoded = self.box_coder.decode(deltas.float(), torch.cat([s.boxes for s in sampled]))
        return [
            clip_boxes_to_image(boxes, size)
            for boxes, size in zip(decoded.split(counts), image_sizes, strict=True)
        ]

    def _reid_loss(
        self,
        embeddings: Tensor,
        sampled: Sequence[SampledRoIs],
        targets: Sequence[dict[str, Tensor]],
    ) -> Tensor:
        """OIM over the positives: labeled ones against the lookup table, unlabeled ones (pid
        -1) only into the queue."""
        positive = torch.cat([rois.matched_gt >= 0 for rois in sampled])
        pids = torch.cat(
            [
                target["pids"].to(rois.matched_gt.device)[rois.matched_gt[rois.matched_gt >= 0]]
                for rois, target in zip(sampled, targets, strict=True)
            ]
        )
        return self.reid_loss(embeddings[positive].float(), pids)["loss_oim"]

    def _weighted(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        weights = self.config.loss_weights
        return {
            name: getattr(weights, name.removeprefix("loss_")) * value
            for name, value in losses.items()
        }
