"""Feature Pyramid Network (Lin et al., 2017): 1x1 lateral convs, nearest-upsampled top-down sum,
3x3 output convs; optional extra stride-2 levels (P6, P7) computed from the top output, as FCOS
and RetinaNet use them. Used by LEAPS (Sparse R-CNN base) and the FCOS pedestrian detector.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import StrictModel


class FPNConfig(StrictModel):
    channels: int = Field(256, gt=0, description="Channels of every pyramid level.")
    in_stages: tuple[str, ...] = Field(
        ("res2", "res3", "res4", "res5"), description="Backbone stages fed to the pyramid."
    )
    extra_levels: int = Field(
        0, ge=0, description="Extra stride-2 levels on top (FCOS/RetinaNet: 2 for P6, P7)."
    )


def level_name(stride: int) -> str:
    """Pyramid levels are named by stride: stride 8 -> "p3"."""
    return f"p{int(math.log2(stride))}"


def _xavier_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # Detectron's "c2_xavier_fill"
    nn.init.zeros_(conv.bias)
    return conv


class FPN(nn.Module):
    """Maps backbone stages {name: (B, C_i, H_i, W_i)} to levels {"p<k>": (B, channels, H, W)}."""

    def __init__(
        self, in_channels: dict[str, int], in_strides: dict[str, int], cfg: FPNConfig
    ) -> None:
        super().__init__()
        missing = [s for s in cfg.in_stages if s not in in_channels]
        if missing:
            raise ValueError(
                f"FPN needs backbone stages {missing}; backbone has {list(in_channels)}"
            )
        self.in_stages = cfg.in_stages
        self.lateral = nn.ModuleList(
            _xavier_conv(in_channels[s], cfg.channels, 1) for s in cfg.in_stages
        )
        self.output = nn.ModuleList(
            _xavier_conv(cfg.channels, cfg.channels, 3) for _ in cfg.in_stages
        )
        self.extra = nn.ModuleList(
            _xavier_conv(cfg.channels, cfg.channels, 3, stride=2) for _ in range(cfg.extra_levels)
        )
        strides = [in_strides[s] for s in cfg.in_stages]
        strides += [strides[-1] * 2 ** (i + 1) for i in range(cfg.extra_levels)]
        self.strides = {level_name(s): s for s in strides}
        self.out_channels = {name: cfg.channels for name in self.strides}

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        laterals = [conv(features[s]) for conv, s in zip(self.lateral, self.in_stages, strict=True)]
        # Top-down: each level adds the upsampled coarser one (sizes may be odd: match exactly).
        for i in range(len(laterals) - 2, -1, -1):
            coarser = F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
            laterals[i] = laterals[i] + coarser
        outputs = [conv(x) for conv, x in zip(self.output, laterals, strict=True)]
        for i, conv in enumerate(self.extra):
            # P6 from the P5 output; later levels see a ReLU first (FCOS "on_output").
            outputs.append(conv(outputs[-1] if i == 0 else F.relu(outputs[-1])))
        return dict(zip(self.strides, outputs, strict=True))
