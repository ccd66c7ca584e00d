"""LEAPS configuration: the paper's settings as defaults, its ablations as switches.

Defaults are the paper's ResNet-50 model (Sec. 4.1, Table 1); the switches reproduce the rows of
its ablation tables:

- Table 3: ``reid.roi_align`` ("plain" = row a), ``reid.branches`` (PRM only = b, HIRM only = c,
  two PRMs = f, two HIRMs = g), ``reid.intra_instance`` / ``reid.inter_instance`` (h, i),
  ``reid_loss.diversity`` (d vs e);
- Table 4: ``reid_loss.drsm`` (one-to-one matching only) and ``reid_loss.drsm_weighting``
  (dagger vs double dagger);
- Table 5: ``detection.num_stages``; Table 6: ``reid.stages``; Table 7 (appendix B):
  ``detection.num_proposals``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from models.backbones import BackboneConfig
from models.config import StrictModel
from models.losses import OIMConfig
from models.necks.fpn import FPNConfig
from models.preprocess import PreprocessConfig

ReidBranch = Literal["prm", "hirm"]


def _default_fpn() -> FPNConfig:
    # LEAPS reads only F_s8 (P3) and F_s16 (P4); no P2 is computed.
    return FPNConfig(channels=256, in_stages=("res3", "res4", "res5"))


class DetectionConfig(StrictModel):
    """Sparse R-CNN's dynamic detection head (LEAPS Sec. 3.1.1) and its set-prediction loss."""

    num_stages: int = Field(6, ge=1, description="S, cascaded dynamic heads (Table 5).")
    num_proposals: int = Field(100, ge=1, description="N, learnable proposals (Table 7).")
    hidden_dim: int = Field(
        256, gt=0, description="Proposal feature width; must equal the FPN channels."
    )
    feedforward_dim: int = Field(2048, gt=0, description="Hidden width of the FFN.")
    num_heads: int = Field(8, gt=0, description="Heads of the self-attention among proposals.")
    dynamic_dim: int = Field(64, gt=0, description="Inner width of the two dynamic 1x1 convs.")
    feature_level: Literal["p4", "p3"] = Field(
        "p4",
        description="The pyramid level the stages pool from: p4 = F_s16 (the paper, Fig. 3); p3 "
        "= F_s8, for persons only a few stride-16 cells wide (small inputs).",
    )
    roi_size: int = Field(7, gt=0, description="RoIAlign bins per side on the detection level.")
    sampling_ratio: int = Field(2, description="RoIAlign samples per bin side (<= 0: adaptive).")
    cls_layers: int = Field(1, ge=0, description="FC-LN-ReLU layers before the class logit.")
    reg_layers: int = Field(3, ge=0, description="FC-LN-ReLU layers before the box deltas.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in attention and FFN.")
    prior_prob: float = Field(
        0.01, gt=0, lt=1, description="Initial person probability (focal-loss bias init)."
    )
    box_weights: tuple[float, float, float, float] = Field(
        (2.0, 2.0, 1.0, 1.0), description="Delta weights (wx, wy, ww, wh) of the box coder."
    )
    box_scale_clamp: float = Field(
        math.log(100000.0 / 16), gt=0, description="Upper bound on predicted log-scale deltas."
    )
    focal_alpha: float = Field(0.25, description="Focal loss alpha (cost and loss).")
    focal_gamma: float = Field(2.0, ge=0, description="Focal loss gamma (cost and loss).")
    class_weight: float = Field(2.0, ge=0, description="Weight of the focal loss and cost.")
    l1_weight: float = Field(5.0, ge=0, description="Weight of the normalised-L1 loss and cost.")
    giou_weight: float = Field(2.0, ge=0, description="Weight of the GIoU loss and cost.")


class ReidHeadConfig(StrictModel):
    """The flexible re-id head (Sec. 3.1.2) on F_s8."""

    stages: int = Field(2, ge=1, description="Re-id heads on the last k stages (Table 6).")
    roi_align: Literal["dynamic", "plain"] = Field(
        "dynamic", description="Dynamic RoIAlign (eq. 1) or plain RoIAlign (Table 3 a)."
    )
    branches: tuple[ReidBranch, ...] = Field(
        ("prm", "hirm"),
        min_length=1,
        max_length=2,
        description="Re-id branches, concatenated at inference (Table 3 b-g).",
    )
    intra_instance: bool = Field(True, description="HIRM's dynamic 1x1 convs (False = Table 3 h).")
    inter_instance: bool = Field(
        True, description="HIRM's self-attention across proposals (False = Table 3 i)."
    )
    feature_dim: int = Field(256, gt=0, description="Width of each branch's re-id feature.")
    embedding_norm: Literal["proposals", "samples", "none"] = Field(
        "proposals",
        description="BatchNorm1d on each branch's re-id feature before L2 normalisation (not in "
        "the paper; as NAE/SeqNet's embedding heads, it keeps OIM from stalling on collapsed "
        "features), its training statistics taken over every proposal of the batch or over the "
        "re-id samples alone (persons, as at inference, where detections are scored); none = "
        "off.",
    )
    roi_size: int = Field(7, gt=0, description="(Dynamic) RoIAlign bins per side on F_s8.")
    sampling_ratio: int = Field(2, description="RoIAlign samples per bin side (<= 0: adaptive).")
    dynamic_dim: int = Field(64, gt=0, description="Inner width of HIRM's dynamic 1x1 convs.")
    num_heads: int = Field(8, gt=0, description="Heads of HIRM's inter-instance attention.")


class ReidLossConfig(OIMConfig):
    """Diverse re-id sample matching (Sec. 3.2) and the re-id terms of eq. 2: the triplet-aided
    OIM of [35] (AlignPS's TOIM, with its focal term), with the scales of PSTR's released head
    (the same authors' code; LEAPS gives none)."""

    drsm: bool = Field(
        True, description="Diverse re-id sample matching; False = one-to-one only (Table 4)."
    )
    drsm_iou: float = Field(0.7, gt=0, lt=1, description="theta: IoU above which it assigns.")
    drsm_weighting: bool = Field(
        True, description="W = (IoU - theta) / (1 - theta) + 0.5; False = weight 1 (Table 4)."
    )
    diversity: bool = Field(
        True, description="L_div between the two branches (needs two; Table 3 d vs e)."
    )
    weight: float = Field(1.0, ge=0, description="lambda of eq. 2 (not given in the paper).")
    shared_memory: bool = Field(
        True,
        description="One lookup table and one queue for every stage and branch (Sec. 3.3); false "
        "= one memory per (stage, branch), as PSTR keeps one per feature scale.",
    )
    num_labeled: int = Field(
        483, gt=0, description="Labeled training identities (PRW 483, CUHK-SYSU 5532)."
    )
    queue_size: int = Field(500, ge=0, description="Circular queue of unlabeled features.")
    lut_scale: float = Field(
        15.0, gt=0, description="Factor of the LUT similarities (PSTR's released head: 15)."
    )
    queue_scale: float = Field(
        10.0, gt=0, description="Factor of the queue similarities (PSTR's released head: 10)."
    )
    lut_renormalize: bool = Field(
        False,
        description="Renormalise a LUT row after each update (PSTR's released update does not).",
    )
    focal_gamma: float = Field(
        2.0,
        ge=0,
        description="Focal modulation of OIM: the TOIM of [35] (AlignPS Sec. 4.2) and PSTR's "
        "released head use 2; 0 = plain OIM.",
    )
    triplet_weight: float = Field(
        1.0, ge=0, description="Weight of TOIM's triplet term (eq. 2: triplet-aided OIM [35])."
    )


class LeapsConfig(StrictModel):
    """LEAPS (Dong et al., arXiv:2303.11859): Sparse R-CNN + flexible re-id head + DRSM."""

    name: Literal["leaps"] = Field("leaps", description="Registry name of the model.")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="Test-time resizing and normalisation."
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="ResNet backbone.")
    fpn: FPNConfig = Field(
        default_factory=_default_fpn, description="Feature pyramid giving F_s8 and F_s16."
    )
    detection: DetectionConfig = Field(
        default_factory=DetectionConfig, description="Detection head and loss."
    )
    reid: ReidHeadConfig = Field(default_factory=ReidHeadConfig, description="Re-id head.")
    reid_loss: ReidLossConfig = Field(
        default_factory=ReidLossConfig, description="Re-id sample matching and losses."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> LeapsConfig:
        if not {"res3", "res4"} <= set(self.fpn.in_stages):
            raise ValueError(
                f"fpn.in_stages must include res3 and res4 (F_s8 and F_s16), "
                f"got {list(self.fpn.in_stages)}"
            )
        if self.fpn.channels != self.detection.hidden_dim:
            raise ValueError(
                f"fpn.channels ({self.fpn.channels}) must equal detection.hidden_dim "
                f"({self.detection.hidden_dim}): RoI features feed the dynamic convs directly"
            )
        if self.reid.stages > self.detection.num_stages:
            raise ValueError(
                f"reid.stages ({self.reid.stages}) exceeds detection.num_stages "
                f"({self.detection.num_stages})"
            )
        if self.reid_loss.diversity and len(self.reid.branches) != 2:
            raise ValueError(
                "reid_loss.diversity compares two branches; set it to false with "
                f"reid.branches={list(self.reid.branches)}"
            )
        for name, dim, heads in (
            ("detection", self.detection.hidden_dim, self.detection.num_heads),
            ("reid", self.reid.feature_dim, self.reid.num_heads),
        ):
            if dim % heads:
                width = "hidden_dim" if name == "detection" else "feature_dim"
                raise ValueError(f"{name}.{width} ({dim}) must be divisible by num_heads ({heads})")
        return self

    @property
    def embedding_dim(self) -> int:
        """Length of the inference embedding: the branches' features concatenated."""
        return self.reid.feature_dim * len(self.reid.branches)
