"""The training losses of LEAPS (eq. 2): per stage, Sparse R-CNN's set-prediction detection loss,
and on the stages with a re-id head the DRSM-weighted triplet-aided OIM loss of every branch plus
the diversity loss between the branches.

Loss names carry the stage (1-based): ``loss_cls_s6``, ``loss_div_s6``; the re-id TOIM terms are
``loss_oim`` and ``loss_triplet`` with the paper's one shared memory, and carry the branch and
stage with one memory per head (``loss_oim_prm_s6``, ``loss_triplet_hirm_s5``). Every returned
loss is already weighted; the trainer sums them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.leaps.config import DetectionConfig, ReidLossConfig
from models.leaps.detection_head import StageOutput
from models.leaps.matcher import Match
from models.leaps.reid_head import ReidOutput
from models.losses.detection import iou_loss, sigmoid_focal_loss
from models.ops.boxes import box_scale


def branch_names(branches: Sequence[str]) -> list[str]:
    """Loss-name suffixes of the branches: their kind, numbered when a kind repeats."""
    return [
        kind if branches.count(kind) == 1 else f"{kind}{index + 1}"
        for index, kind in enumerate(branches)
    ]


def detection_losses(
    output: StageOutput,
    targets: Sequence[dict[str, Tensor]],
    matches: Sequence[Match],
    image_sizes: Tensor,
    cfg: DetectionConfig,
) -> dict[str, Tensor]:
    """Focal, L1 (on boxes divided by their image's size, ``image_sizes`` (B, 2) (height,
    width)) and GIoU losses of one stage, each summed over the batch and divided by its number
    of ground-truth persons (at least 1)."""
    num_targets = max(sum(int(t["boxes"].shape[0]) for t in targets), 1)
    labels = torch.zeros_like(output.logits)
    for image, match in enumerate(matches):
        labels[image, match.proposals] = 1.0
    cls = sigmoid_focal_loss(
        output.logits, labels, cfg.focal_alpha, cfg.focal_gamma, reduction="sum"
    )

    predicted = torch.cat(
        [output.boxes[image, m.proposals] for image, m in enumerate(matches)]
    )  # (K, 4)
    matched = torch.cat([t["boxes"][m.targets] for t, m in zip(targets, matches, strict=True)])
    matched = matched.to(predicted.dtype)
    per_image = torch.tensor([len(m.proposals) for m in matches], device=predicted.device)
    # (K, 4): each matched box is normalised by its own image's size.
    scale = box_scale(image_sizes.to(predicted.dtype)).repeat_interleave(per_image, dim=0)
    l1 = F.l1_loss(predicted / scale, matched / scale, reduction="sum")
    giou = iou_loss(predicted, matched, kind="giou", reduction="sum")
    return {
        "loss_cls": cfg.class_weight * cls / num_targets,
        "loss_l1": cfg.l1_weight * l1 / num_targets,
        "loss_giou": cfg.giou_weight * giou / num_targets,
    }


class ReidStage(NamedTuple):
    """What the re-id loss reads of one stage: its number (1-based), the re-id features and
    intermediates of its DRSM samples ((K, D) per branch, ``FlexibleReidHead.sample_features``)
    and their identities and weights (K,)."""

    stage: int
    samples: ReidOutput
    pids: Tensor
    weights: Tensor


class ReidCriterion(nn.Module):
    """The re-id terms of eq. 2 for every stage with a re-id head, in one call per iteration.

    ``reid_loss.shared_memory`` (the paper, Sec. 3.3): one lookup table V (L x D) and one
    circular queue U (Q x D) serve every stage and branch; the samples of all of them enter one
    TOIM loss and one memory update per iteration. Otherwise each (stage, branch) pair has its
    own memory and its own loss, as PSTR keeps one memory per feature scale.
    """

    def __init__(
        self, cfg: ReidLossConfig, stages: Sequence[int], branches: Sequence[str], feature_dim: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.branch_names = branch_names(branches)
        keys = (
            ["shared"]
            if cfg.shared_memory
            else [self._key(stage, name) for stage in stages for name in self.branch_names]
        )
        self.memories = nn.ModuleDict({key: cfg.build(feature_dim) for key in keys})

    @staticmethod
    def _key(stage: int, branch: str) -> str:
        return f"s{stage}_{branch}"

    def forward(self, stages: Sequence[ReidStage]) -> dict[str, Tensor]:
        """Every re-id loss of an iteration: TOIM (shared, or per stage and branch) and the
        diversity loss of each stage, all weighted by lambda."""
        losses: dict[str, Tensor] = {}
        selected = {}  # (stage, branch) -> (K, D) normalised features of the samples
        for stage, samples, _, _ in stages:
            for name, feature in zip(self.branch_names, samples.features, strict=True):
                selected[stage, name] = F.normalize(feature, dim=1)
            if self.cfg.diversity:
                first, second = samples.intermediates
                diversity = _mean(F.cosine_similarity(first, second, dim=1))
                losses[f"loss_div_s{stage}"] = self.cfg.weight * diversity
        labels = {stage: (pids, weights) for stage, _, pids, weights in stages}
        if self.cfg.shared_memory:
            keys = list(selected)
            pids = torch.cat([labels[stage][0] for stage, _ in keys])
            weights = torch.cat([labels[stage][1] for stage, _ in keys])
            features = torch.cat([selected[key] for key in keys])
            terms = self.memories["shared"](features, pids, weights.to(features.dtype))
            losses.update({term: self.cfg.weight * value for term, value in terms.items()})
            return losses
        for (stage, name), features in selected.items():
            pids, weights = labels[stage]
            memory = self.memories[self._key(stage, name)]
            terms = memory(features, pids, weights.to(features.dtype))
            for term, value in terms.items():
                losses[f"{term}_{name}_s{stage}"] = self.cfg.weight * value
        return losses


def _mean(values: Tensor) -> Tensor:
    # The mean of no samples is a zero still connected to the graph.
    return values.sum() / max(values.numel(), 1)
