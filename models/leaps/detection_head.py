"""One stage of the cascaded detection head (LEAPS Sec. 3.1.1, Sparse R-CNN's dynamic head).

A stage reads RoI features of its proposal boxes from F_s16 (``detection.feature_level``), lets
the proposals attend to each other (self-attention), mixes each proposal's feature with its RoI
features (the instance interaction, :class:`DynamicConv`), refines the result with an FFN into
the detection features F_d, and predicts a person logit and box deltas relative to its input
boxes. F_d and the refined boxes become the next stage's proposals.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.leaps.config import DetectionConfig
from models.leaps.dynamic_conv import DynamicConv
from models.ops.boxes import decode_boxes
from models.ops.roi_align import roi_align

# The strides of the pyramid levels a detection stage may read (LEAPS Fig. 3: F_s16 = p4).
LEVEL_STRIDES = {"p3": 8, "p4": 16}


def boxes_to_rois(boxes: Tensor) -> Tensor:
    """(B, N, 4) boxes -> (B*N, 5) RoIs (batch_index, x1, y1, x2, y2), image-major."""
    batch, num = boxes.shape[:2]
    index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)
    index = index.view(batch, 1, 1).expand(batch, num, 1)
    return torch.cat([index, boxes], dim=2).reshape(-1, 5)


def _fc_ln_relu(width: int, count: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(width, width, bias=False), nn.LayerNorm(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class StageOutput(NamedTuple):
    """Predictions of one stage: logits (B, N), boxes (B, N, 4) x1y1x2y2 in input pixels, and
    the detection features F_d (B, N, C)."""

    logits: Tensor
    boxes: Tensor
    features: Tensor


class DetectionStage(nn.Module):
    """A dynamic detection head: (F_s16, proposal boxes, proposal features) -> StageOutput."""

    def __init__(self, cfg: DetectionConfig) -> None:
        super().__init__()
        width = cfg.hidden_dim
        self.roi_size = cfg.roi_size
        self.stride = LEVEL_STRIDES[cfg.feature_level]
        self.sampling_ratio = cfg.sampling_ratio
        self.box_weights = cfg.box_weights
        self.box_scale_clamp = cfg.box_scale_clamp

        self.self_attention = nn.MultiheadAttention(
            width, cfg.num_heads, dropout=cfg.dropout, batch_first=True
        )
        self.norm_attention = nn.LayerNorm(width)
        self.instance_interaction = DynamicConv(width, cfg.dynamic_dim, cfg.roi_size**2, width)
        self.norm_interaction = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, cfg.feedforward_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.feedforward_dim, width),
        )
        self.norm_ffn = nn.LayerNorm(width)
        self.cls_tower = _fc_ln_relu(width, cfg.cls_layers)
        self.reg_tower = _fc_ln_relu(width, cfg.reg_layers)
        self.class_logit = nn.Linear(width, 1)
        self.box_deltas = nn.Linear(width, 4)

    def forward(self, features: Tensor, boxes: Tensor, proposal_features: Tensor) -> StageOutput:
        """features (B, C, H/s, W/s) of the configured level (F_s16 in the paper); boxes
        (B, N, 4) in input pixels; proposal_features (B, N, C)."""
        batch, num, width = proposal_features.shape
        rois = boxes_to_rois(boxes)
        rois = roi_align(
            # Pixel coordinates need full precision: under autocast, pool in the boxes' dtype.
            features.to(rois.dtype),
            rois,
            self.roi_size,
            spatial_scale=1.0 / self.stride,
            sampling_ratio=self.sampling_ratio,
        )  # (B*N, C, 7, 7)

        attended, _ = self.self_attention(
            proposal_features, proposal_features, proposal_features, need_weights=False
        )
        x = self.norm_attention(proposal_features + attended).reshape(batch * num, width)
        x = self.norm_interaction(x + self.instance_interaction(x, rois))
        x = self.norm_ffn(x + self.ffn(x))  # F_d, (B*N, C)

        logits = self.class_logit(self.cls_tower(x))
        deltas = self.box_deltas(self.reg_tower(x))
        refined = decode_boxes(
            deltas,
            boxes.reshape(-1, 4),
            weights=self.box_weights,
            scale_clamp=self.box_scale_clamp,
        )
        return StageOutput(
            logits=logits.reshape(batch, num),
            boxes=refined.reshape(batch, num, 4),
            features=x.reshape(batch, num, width),
        )
