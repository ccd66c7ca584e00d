"""Label assigners of the dense heads, by name: which locations are positives of which GT box.

Every assigner is called per image with keyword arguments ``points`` (P, 2), ``strides`` (P,),
``level_ids`` (P,), ``gt_boxes`` (G, 4), ``cls_logits`` (P,) and ``pred_boxes`` (P, 4) decoded,
and returns the assigned GT index of every location, (P,) long, -1 = negative. Each looks only at
what it needs. Configs carry the assigner's ``name``, so a head config selects one with
``assigner: {name: lla, top_k: 10}``.

Anchor-based and RoI heads match candidates to GT boxes by IoU instead: ``MaxIoUMatcher``
(``max_iou.py``), with the balanced positive / negative draw and the RoI sampler of two-stage
detectors in ``sampling.py``.
"""

from typing import Annotated, Protocol

from pydantic import Field
from torch import Tensor

from models.assigners.center_sampling import CenterSamplingAssigner, CenterSamplingConfig
from models.assigners.lla import LLAAssigner, LLAConfig, assign_lowest_costs, points_inside_boxes
from models.assigners.max_iou import IGNORED, NEGATIVE, MaxIoUConfig, MaxIoUMatcher
from models.assigners.sampling import (
    RoISampler,
    RoISamplerConfig,
    SampledRoIs,
    sample_balanced,
)

AssignerConfig = Annotated[CenterSamplingConfig | LLAConfig, Field(discriminator="name")]


class Assigner(Protocol):
    """The common call of every assigner (see the module doc)."""

    def __call__(
        self,
        *,
        points: Tensor,
        strides: Tensor,
        level_ids: Tensor,
        gt_boxes: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
    ) -> Tensor: ...


ASSIGNERS: dict[str, type] = {
    "center_sampling": CenterSamplingAssigner,
    "lla": LLAAssigner,
}


def build_assigner(config: CenterSamplingConfig | LLAConfig) -> Assigner:
    """The assigner named by ``config.name``, built from its config."""
    if config.name not in ASSIGNERS:
        raise ValueError(f"unknown assigner {config.name!r}; available: {sorted(ASSIGNERS)}")
    return ASSIGNERS[config.name](config)


__all__ = [
    "ASSIGNERS",
    "IGNORED",
    "NEGATIVE",
    "Assigner",
    "AssignerConfig",
    "CenterSamplingAssigner",
    "CenterSamplingConfig",
    "LLAAssigner",
    "LLAConfig",
    "MaxIoUConfig",
    "MaxIoUMatcher",
    "RoISampler",
    "RoISamplerConfig",
    "SampledRoIs",
    "assign_lowest_costs",
    "build_assigner",
    "points_inside_boxes",
    "sample_balanced",
]
