"""Label assigners of the dense heads, by name: which locations are positives of which GT box.

Every assigner is called per image with keyword arguments ``points`` (P, 2), ``strides`` (P,),
``level_ids`` (P,), ``gt_boxes`` (G, 4), ``cls_logits`` (P,) and ``pred_boxes`` (P, 4) decoded,
and returns the assigned GT index of every location, (P,) long, -1 = negative. Each looks only at
what it needs. Configs carry the assigner's ``name``, so a head config selects one with
``assigner: {name: lla, top_k: 10}``.
"""

from typing import Annotated, Protocol

from pydantic import Field
from torch import Tensor

from models.assigners.center_sampling import CenterSamplingAssigner, CenterSamplingConfig
from models.assigners.lla import LLAAssigner, LLAConfig, assign_lowest_costs, points_inside_boxes

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
    "Assigner",
    "AssignerConfig",
    "CenterSamplingAssigner",
    "CenterSamplingConfig",
    "LLAAssigner",
    "LLAConfig",
    "assign_lowest_costs",
    "build_assigner",
    "points_inside_boxes",
]
