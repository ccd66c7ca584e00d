"""The training losses of LEAPS (eq. 2): per stage, Sparse R-CNN's set-prediction detection loss,
and on the stages with a re-id head the DRSM-weighted triplet-aided OIM loss of every branch plus
the diversity loss between the branches.

Loss names carry the stage (1-based) and, for re-id, the branch: ``loss_cls_s6``,
``loss_oim_prm_s6``, ``loss_triplet_hirm_s5``, ``loss_div_s6``. Every returned loss is already
weighted; the trainer sums them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.leaps.config import DetectionConfig, ReidLossConfig
from models.leaps.detection_head import StageOutput
from models.leaps.matcher import Match, ReidSamples
from models.leaps.reid_head import ReidOutput
from models.losses import OIMLoss
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


class ReidCriterion(nn.Module):
    """The re-id terms of eq. 2 for every stage with a re-id head.

    Each (stage, branch) pair has its own OIM memory (lookup table and queue, both 256-d as in
    Sec. 3.3): the branches are trained to be different, and the stages see different proposals.
    """

    def __init__(
        self, cfg: ReidLossConfig, stages: Sequence[int], branches: Sequence[str], feature_dim: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.branch_names = branch_names(branches)
        self.memories = nn.ModuleDict(
            {
                self._key(stage, name): OIMLoss(
                    feature_dim,
                    cfg.num_labeled,
                    cfg.queue_size,
                    momentum=cfg.momentum,
                    temperature=cfg.temperature,
                    triplet_weight=cfg.triplet_weight,
                    triplet_margin=cfg.triplet_margin,
                )
                for stage in stages
                for name in self.branch_names
            }
        )

    @staticmethod
    def _key(stage: int, branch: str) -> str:
        return f"s{stage}_{branch}"

    def forward(
        self, stage: int, output: ReidOutput, samples: Sequence[ReidSamples]
    ) -> dict[str, Tensor]:
        """Losses of stage ``stage`` (1-based) from its re-id output and each image's samples."""
        pids = torch.cat([s.pids for s in samples])
        weights = torch.cat([s.weights for s in samples])
        losses = {}
        for name, feature in zip(self.branch_names, output.features, strict=True):
            selected = F.normalize(_gather(feature, samples), dim=1)
            terms = self.memories[self._key(stage, name)](
                selected, pids, weights.to(selected.dtype)
            )
            for term, value in terms.items():
                losses[f"{term}_{name}_s{stage}"] = self.cfg.weight * value
        if self.cfg.diversity:
            first, second = (_gather(x, samples) for x in output.intermediates)
            diversity = _mean(F.cosine_similarity(first, second, dim=1))
            losses[f"loss_div_s{stage}"] = self.cfg.weight * diversity
        return losses


def _gather(per_proposal: Tensor, samples: Sequence[ReidSamples]) -> Tensor:
    """(B, N, D) per-proposal values -> (K, D) of the samples, image by image."""
    return torch.cat([per_proposal[image, s.proposals] for image, s in enumerate(samples)])


def _mean(values: Tensor) -> Tensor:
    # The mean of no samples is a zero still connected to the graph.
    return values.sum() / max(values.numel(), 1)
