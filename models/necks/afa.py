"""Aligned feature aggregation (AFA), the neck of AlignPS (Yan et al., CVPR 2021, Sec. 3.2).

AFA is an FPN over C3-C5 reshaped for re-id ("region alignment"):

- the lateral connections are 3x3 deformable convs instead of 1x1 convs, so that each location
  adapts its receptive field to the person around it;
- the top-down path concatenates the upsampled coarser map with the lateral instead of adding
  them;
- the output conv is a 3x3 deformable conv;

and it has a single output, P3 at stride 8, for both detection and re-id ("scale alignment"; no
P4-P7 outputs). Each switch can be turned off for the ablations of the paper's Table 2.

Channels of the concatenation: the top-down path concatenates cumulatively, so the stride-8 map
carries ``len(in_stages) * channels`` channels (P3's lateral, then P4's, then P5's, upsampled),
and the output conv itself reduces them to ``channels``, as the authors' released neck does.
No extra 1x1 reduction is inserted. With ``fusion: sum`` the path is FPN's and the output conv
sees ``channels``.

The output has no activation: it is the re-id embedding map of AlignPS ("re-id first"), which
the detection head also reads.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import StrictModel
from models.ops.deform_conv import DeformConvPack


class AFAConfig(StrictModel):
    channels: int = Field(
        256, gt=0, description="Channels of the laterals and of the output (the re-id dim)."
    )
    in_stages: tuple[str, ...] = Field(
        ("res3", "res4", "res5"),
        min_length=1,
        description="Backbone stages aggregated, finest first; the output has the finest stride.",
    )
    lateral_dconv: bool = Field(
        True, description="3x3 deformable lateral convs; false: FPN's 1x1 convs (Table 2)."
    )
    output_dconv: bool = Field(
        True, description="3x3 deformable output conv; false: a plain 3x3 conv (Table 2)."
    )
    fusion: Literal["concat", "sum"] = Field(
        "concat", description="Top-down fusion: concatenation (AFA) or FPN's sum (Table 2)."
    )


def _init_conv(conv: nn.Module) -> nn.Module:
    # FPN's "xavier" fill on the main weight only: a deformable conv's offsets stay zero, so it
    # starts as the plain conv it replaces.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


def _conv(in_channels: int, out_channels: int, kernel_size: int, deformable: bool) -> nn.Module:
    layer = DeformConvPack if deformable else nn.Conv2d
    return _init_conv(layer(in_channels, out_channels, kernel_size, padding=kernel_size // 2))


class AFA(nn.Module):
    """Maps backbone stages {name: (B, C_i, H_i, W_i)} to one map (B, channels, H_0, W_0) at the
    finest input stride (``self.stride``, 8 for res3)."""

    def __init__(
        self, in_channels: dict[str, int], in_strides: dict[str, int], config: AFAConfig
    ) -> None:
        super().__init__()
        missing = [s for s in config.in_stages if s not in in_channels]
        if missing:
            raise ValueError(
                f"AFA needs backbone stages {missing}; the backbone has {list(in_channels)}"
            )
        self.config = config
        self.in_stages = config.in_stages
        lateral_kernel = 3 if config.lateral_dconv else 1
        self.lateral = nn.ModuleList(
            _conv(in_channels[s], config.channels, lateral_kernel, config.lateral_dconv)
            for s in config.in_stages
        )
        fused_channels = config.channels * (
            len(config.in_stages) if config.fusion == "concat" else 1
        )
        self.output = _conv(fused_channels, config.channels, 3, config.output_dconv)
        self.stride = in_strides[config.in_stages[0]]
        self.out_channels = config.channels

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """{stage: (B, C_i, H_i, W_i)} -> (B, channels, H_0, W_0)."""
        laterals = [conv(features[s]) for conv, s in zip(self.lateral, self.in_stages, strict=True)]
        fused = laterals[-1]
        for lateral in reversed(laterals[:-1]):
            # Sizes may be odd (H_i = ceil(H_{i-1} / 2)): match the finer map exactly.
            coarser = F.interpolate(fused, size=lateral.shape[-2:], mode="nearest")
            if self.config.fusion == "concat":
                fused = torch.cat((lateral, coarser), dim=1)
            else:
                fused = lateral + coarser
        return self.output(fused)
