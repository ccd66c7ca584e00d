"""The backbone section of every model config."""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from models.config import StrictModel


class BackboneConfig(StrictModel):
    name: Literal["resnet18", "resnet34", "resnet50"] = Field(
        "resnet50", description="ResNet depth (models.backbones registry name)."
    )
    frozen_stages: int = Field(
        1, ge=0, le=4, description="Stem + first k stages frozen (1 = stem and res2)."
    )
    frozen_stem: bool = Field(
        False, description="Freeze the stem even with frozen_stages 0 (SeqNet: the stem alone)."
    )
    norm: Literal["frozen_bn", "bn"] = Field("frozen_bn", description="Backbone normalisation.")
    base_width: int = Field(64, gt=0, description="Stem channels; 64 is the standard ResNet.")
    dcn_stages: tuple[Literal["res2", "res3", "res4", "res5"], ...] = Field(
        (), description="Stages whose 3x3 convs are deformable (AlignPS+: res3, res4, res5)."
    )
    dcn_modulated: bool = Field(False, description="Deformable convs are DCNv2 (with a mask).")
    pretrained: Path | None = Field(
        None, description="Local torchvision-layout ImageNet weights; null = random init."
    )

    def build_options(self, out_stages: Sequence[str]) -> dict:
        """Keyword arguments of `models.backbones.build_backbone` for this config."""
        options: dict = {
            "pretrained": self.pretrained,
            "out_stages": tuple(out_stages),
            "frozen_stages": self.frozen_stages,
            "frozen_stem": self.frozen_stem,
            "norm": self.norm,
            "base_width": self.base_width,
        }
        if self.dcn_stages:
            options.update(dcn_stages=self.dcn_stages, dcn_modulated=self.dcn_modulated)
        return options
