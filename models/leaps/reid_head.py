"""The flexible re-id head (LEAPS Sec. 3.1.2, Fig. 3c and Fig. 5).

From F_s8 and the stage's proposals (boxes and features F_p):

1. dynamic RoIAlign (eq. 1): a linear layer predicts one (dx, dy) offset per bin from F_p, and
   RoIAlign samples the moved bins, giving F_droi. The layer starts at zero, so training starts
   from plain RoIAlign;
2. the plain re-id module (PRM): two FC layers, F_droi -> F_ip -> F_rp;
3. the hierarchical interaction re-id module (HIRM): intra-instance interaction with two dynamic
   1x1 convs whose weights come from F_p (-> F_ih), then inter-instance interaction, a
   self-attention across the proposals of an image (-> F_rh).

Each branch returns its re-id feature and its intermediate feature (F_ip, F_ih), which the
diversity loss L_div = cos(F_ip, F_ih) pulls apart. Not in the paper: each branch's re-id
feature passes a BatchNorm1d (``reid.embedding_norm``, its training statistics over the batch's
proposals or over its re-id samples), as the embedding heads of NAE and SeqNet do before OIM.
Without it the features of all proposals share one dominant direction from the start, the OIM
lookup table copies it into every row, and the OIM gradient, which is the difference between
rows, stays too small to separate identities (observed on the synthetic data: the loss stalls at
its uniform value).

The inference embedding is the branches' L2-normalised features concatenated, then normalised
again: both branches count equally, as in training, where each has its own OIM terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.leaps.config import ReidHeadConfig
from models.leaps.detection_head import boxes_to_rois
from models.leaps.dynamic_conv import DynamicConv
from models.leaps.matcher import ReidSamples
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.roi_align import roi_align

# LEAPS reads re-id RoIs from the stride-8 map (Fig. 3: F_s8).
REID_STRIDE = 8


class BranchOutput(NamedTuple):
    """A branch's re-id feature (F_rp or F_rh) and intermediate feature (F_ip or F_ih), each
    (B, N, D)."""

    feature: Tensor
    intermediate: Tensor


class PlainReidModule(nn.Module):
    """PRM: flatten the RoI features, FC + ReLU (F_ip), FC (F_rp)."""

    def __init__(self, channels: int, num_bins: int, feature_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels * num_bins, feature_dim)
        self.fc2 = nn.Linear(feature_dim, feature_dim)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> BranchOutput:
        """proposal_features (B, N, C) (unused: PRM sees only RoI features); roi_features
        (B*N, C, h, w)."""
        batch, num = proposal_features.shape[:2]
        intermediate = F.relu(self.fc1(roi_features.flatten(1)))
        feature = self.fc2(intermediate)
        return BranchOutput(feature.reshape(batch, num, -1), intermediate.reshape(batch, num, -1))


class _FlattenProjection(nn.Module):
    """HIRM without intra-instance interaction (Table 3 h): flatten, FC, LayerNorm, ReLU."""

    def __init__(self, channels: int, num_bins: int, out_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(channels * num_bins, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> Tensor:
        return F.relu(self.norm(self.project(roi_features.flatten(1))))


class HierarchicalInteractionReidModule(nn.Module):
    """HIRM: intra-instance dynamic convs (F_ih), then inter-instance self-attention (F_rh)."""

    def __init__(
        self,
        channels: int,
        num_bins: int,
        cfg: ReidHeadConfig,
    ) -> None:
        super().__init__()
        self.intra_instance = (
            DynamicConv(channels, cfg.dynamic_dim, num_bins, cfg.feature_dim)
            if cfg.intra_instance
            else _FlattenProjection(channels, num_bins, cfg.feature_dim)
        )
        self.inter_instance = (
            nn.MultiheadAttention(cfg.feature_dim, cfg.num_heads, batch_first=True)
            if cfg.inter_instance
            else None
        )
        self.norm = nn.LayerNorm(cfg.feature_dim) if cfg.inter_instance else None

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> BranchOutput:
        """proposal_features (B, N, C); roi_features (B*N, C, h, w)."""
        batch, num, channels = proposal_features.shape
        flat_proposals = proposal_features.reshape(batch * num, channels)
        intermediate = self.intra_instance(flat_proposals, roi_features).reshape(batch, num, -1)
        if self.inter_instance is None or self.norm is None:
            return BranchOutput(intermediate, intermediate)
        attended, _ = self.inter_instance(
            intermediate, intermediate, intermediate, need_weights=False
        )
        return BranchOutput(self.norm(intermediate + attended), intermediate)


class ReidOutput(NamedTuple):
    """Per branch (in config order): features and intermediates, each (B, N, D)."""

    features: tuple[Tensor, ...]
    intermediates: tuple[Tensor, ...]

    def embedding(self) -> Tensor:
        """(B, N, D * branches) L2-normalised concatenation of the normalised branches."""
        parts = [F.normalize(feature, dim=-1) for feature in self.features]
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)


class FlexibleReidHead(nn.Module):
    """(F_s8, proposal boxes, proposal features) -> ReidOutput."""

    def __init__(self, cfg: ReidHeadConfig, channels: int) -> None:
        super().__init__()
        self.roi_size = cfg.roi_size
        self.sampling_ratio = cfg.sampling_ratio
        num_bins = cfg.roi_size**2
        self.offset_predictor = (
            nn.Linear(channels, num_bins * 2) if cfg.roi_align == "dynamic" else None
        )
        self.branches = nn.ModuleList(
            PlainReidModule(channels, num_bins, cfg.feature_dim)
            if kind == "prm"
            else HierarchicalInteractionReidModule(channels, num_bins, cfg)
            for kind in cfg.branches
        )
        self.embedding_norm = cfg.embedding_norm
        self.embedding_norms = (
            nn.ModuleList(nn.BatchNorm1d(cfg.feature_dim) for _ in cfg.branches)
            if cfg.embedding_norm != "none"
            else None
        )
        self.reset_offsets()

    def reset_offsets(self) -> None:
        """Zero the offset predictor, so that dynamic RoIAlign starts as RoIAlign."""
        if self.offset_predictor is not None:
            nn.init.zeros_(self.offset_predictor.weight)
            nn.init.zeros_(self.offset_predictor.bias)

    def roi_features(self, features_s8: Tensor, boxes: Tensor, proposal_features: Tensor) -> Tensor:
        """F_droi (B*N, C, h, w) of the proposals (plain F_roi when offsets are off)."""
        rois = boxes_to_rois(boxes)
        # Pixel coordinates need full precision: under autocast, pool in the boxes' dtype.
        features_s8 = features_s8.to(rois.dtype)
        scale = 1.0 / REID_STRIDE
        if self.offset_predictor is None:
            return roi_align(features_s8, rois, self.roi_size, scale, self.sampling_ratio)
        offsets = self.offset_predictor(proposal_features)  # (B, N, h*w*2): (dx, dy) per bin
        offsets = offsets.reshape(-1, self.roi_size, self.roi_size, 2).to(rois.dtype)
        return dynamic_roi_align(
            features_s8, rois, offsets, self.roi_size, scale, self.sampling_ratio
        )

    def forward(self, features_s8: Tensor, boxes: Tensor, proposal_features: Tensor) -> ReidOutput:
        """features_s8 (B, C, H/8, W/8); boxes (B, N, 4) in input pixels; proposal_features
        (B, N, C)."""
        rois = self.roi_features(features_s8, boxes, proposal_features)
        outputs = [branch(proposal_features, rois) for branch in self.branches]
        features = [out.feature for out in outputs]
        if self.embedding_norm == "proposals" or not self.training:
            features = [
                self._normalize(i, f.flatten(0, 1)).view_as(f) for i, f in enumerate(features)
            ]
        return ReidOutput(
            features=tuple(features),
            intermediates=tuple(out.intermediate for out in outputs),
        )

    def sample_features(self, output: ReidOutput, samples: Sequence[ReidSamples]) -> ReidOutput:
        """The re-id features and intermediates of the samples, (K, D) each, image by image;
        with ``embedding_norm: samples`` the features' batch norm takes its training statistics
        here, over the samples (its running statistics serve inference)."""
        features = [gather_samples(f, samples) for f in output.features]
        if self.embedding_norm == "samples" and self.training:
            features = [self._normalize(i, f) for i, f in enumerate(features)]
        intermediates = tuple(gather_samples(x, samples) for x in output.intermediates)
        return ReidOutput(tuple(features), intermediates)

    def _normalize(self, branch: int, features: Tensor) -> Tensor:
        """(K, D) features through branch's batch norm (none: as they are)."""
        if self.embedding_norms is None:
            return features
        return self.embedding_norms[branch](features)


def gather_samples(per_proposal: Tensor, samples: Sequence[ReidSamples]) -> Tensor:
    """(B, N, D) per-proposal values -> (K, D) of the samples, image by image."""
    return torch.cat([per_proposal[image, s.proposals] for image, s in enumerate(samples)])
