"""PS-ARM (Fiaz et al., "PS-ARM: An End-to-End Attention-aware Relation Mixer Network for Person
Search", ACCV 2022): SeqNet (``models/seqnet.py``) with an attention-aware relation mixer (ARM)
between RoIAlign and res5 in both RoI heads, with separate weights (Sec. 3.1, Fig. 2).

The ARM (Sec. 3.2, Fig. 3 and 4) on a RoI map F (C x H x W):

- a 1x1 conv reduces C to c = C / 4 channels: F';
- relation mixer on the H * W tokens of F' (an MLP-Mixer block):
  - spatially attended spatial (token) mixing: a spatial gate (channel max and mean, a 7 x 7
    conv + BN, sigmoid) re-weights the tokens, added to them; LayerNorm; an MLP across the tokens
    (hidden 3x, GELU, dropout 0.5); plus the input tokens;
  - channel-wise attended channel mixing: a channel gate (spatial average and max through a
    shared MLP with reduction 16, summed, sigmoid), added; LayerNorm; an MLP across the channels
    (hidden 3x); plus its input;
- spatio-channel attention: SimAM (Yang et al., ICML 2021), parameter-free: each activation is
  weighted by sigmoid(d / (4 (sum(d) / n + lambda)) + 0.5) with d its squared deviation from its
  channel's mean over the map, n = H * W - 1, lambda = 1e-4;
- the mixer's output, SimAM's and F' are summed (O), and a 1x1 conv brings O back to C channels
  for res5. NAE's res4 feature is the global max of this map, as in the released code.

Every part is a switch, for the rows of the ablation (Table 2): ``token_mixing`` /
``spatial_gate`` (spatial mixing, spatially attended), ``channel_mixing`` / ``channel_gate``,
``simam`` (the spatio-channel attention layer). "Baseline + MLP-Mixer" is both mixings without
the gates; the baseline itself is SeqNet. (The "Transformer" row replaces the mixer with
self-attention and is not built.)

Token layout, the question of the released code. The code flattens a RoI map to tokens
correctly, ``(B, C, H, W) -> (B, H * W, C)`` by a permute, but goes back in two places, before
each gate and at the ARM's output, with a plain ``reshape(B, C, H, W)`` of the ``(B, H * W, C)``
tensor, without the inverse permute. That reinterprets the memory: the gates see a map whose
"channels" are runs of 196 consecutive (token, channel) values, and the mixer's output reaches
res5 scrambled in space and channel, so res5's 3x3 convs no longer see neighbouring positions
of the mixed features as neighbours. The paper describes the proper layout. We follow the
released code by default (``token_layout: released``): it produced the published numbers
(Tables 1 and 2), the scramble is a fixed permutation that training adapts to, and it exports
as a plain reshape. ``token_layout: paper`` is the layout the paper describes, for anyone
who wants the method as written; it has not been trained at full scale (to our knowledge no
published number exists for it).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.config import StrictModel
from models.seqnet import SeqNet, SeqNetConfig

TokenLayout = Literal["released", "paper"]


class ARMConfig(StrictModel):
    """The attention-aware relation mixer; every part can be switched off (Table 2)."""

    reduction: int = Field(4, gt=0, description="c = C / reduction channels inside (Sec. 3.2).")
    token_mixing: bool = Field(True, description="MLP across the tokens (spatial mixing).")
    spatial_gate: bool = Field(True, description="Spatial attention before the token MLP.")
    channel_mixing: bool = Field(True, description="MLP across the channels.")
    channel_gate: bool = Field(True, description="Channel attention before the channel MLP.")
    simam: bool = Field(True, description="Parameter-free spatio-channel attention (SimAM).")
    simam_lambda: float = Field(1e-4, gt=0, description="lambda of SimAM's energy.")
    expansion: int = Field(3, gt=0, description="Hidden width of both MLPs, times their input.")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout inside both MLPs.")
    gate_reduction: int = Field(16, gt=0, description="Reduction of the channel gate's MLP.")
    spatial_gate_kernel: int = Field(7, gt=0, description="Kernel of the spatial gate's conv.")
    token_layout: TokenLayout = Field(
        "released",
        description="released: the authors' code's reshape without permute; paper: the "
        "layout the paper describes (see the module doc).",
    )

    @model_validator(mode="after")
    def _check(self) -> ARMConfig:
        if self.spatial_gate and not self.token_mixing:
            raise ValueError("spatial_gate attends the token mixing; it needs token_mixing")
        if self.channel_gate and not self.channel_mixing:
            raise ValueError("channel_gate attends the channel mixing; it needs channel_mixing")
        if not (self.token_mixing or self.channel_mixing or self.simam):
            raise ValueError("every ARM part is off; use SeqNet for the baseline without ARM")
        if self.spatial_gate_kernel % 2 == 0:
            raise ValueError(f"spatial_gate_kernel must be odd, got {self.spatial_gate_kernel}")
        return self


class PSARMConfig(SeqNetConfig):
    """PS-ARM: SeqNet's settings plus the ARM (the released code changes nothing else but the
    training schedule, which lives in the training config)."""

    name: Literal["psarm"] = Field("psarm", description="Model registry name.")  # type: ignore[assignment]
    arm: ARMConfig = Field(default_factory=ARMConfig, description="The relation mixer.")


# --------------------------------------------------------------------------------------------
# Token layout


def to_tokens(maps: Tensor) -> Tensor:
    """(R, C, H, W) -> (R, H * W, C): one token per position."""
    return maps.flatten(2).transpose(1, 2)


def to_maps(tokens: Tensor, height: int, width: int, layout: TokenLayout) -> Tensor:
    """(R, H * W, C) -> (R, C, H, W): the inverse of :func:`to_tokens` (``paper``), or the
    released code's reshape of the token tensor as it lies (``released``)."""
    channels = tokens.shape[-1]
    if layout == "paper":
        return tokens.transpose(1, 2).reshape(-1, channels, height, width)
    return tokens.reshape(-1, channels, height, width)


# --------------------------------------------------------------------------------------------
# Parts


def simam(maps: Tensor, energy_lambda: float = 1e-4) -> Tensor:
    """SimAM on (R, C, H, W): maps * sigmoid(d / (4 (sum(d) / (H W - 1) + lambda)) + 0.5), d the
    squared deviation of each activation from its channel's mean over the map."""
    count = maps.shape[2] * maps.shape[3] - 1
    deviation = (maps - maps.mean(dim=(2, 3), keepdim=True)).pow(2)
    energy = deviation / (4 * (deviation.sum(dim=(2, 3), keepdim=True) / count + energy_lambda))
    return maps * torch.sigmoid(energy + 0.5)


class SpatialGate(nn.Module):
    """Channel max and mean -> k x k conv (no bias) + BatchNorm -> sigmoid -> re-weighted map."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(1, momentum=0.01)  # the released code's momentum

    def forward(self, maps: Tensor) -> Tensor:
        pooled = torch.cat((maps.amax(dim=1, keepdim=True), maps.mean(dim=1, keepdim=True)), 1)
        return maps * torch.sigmoid(self.norm(self.conv(pooled)))


class ChannelGate(nn.Module):
    """Spatial average and max -> shared MLP (C -> C / r -> C) -> summed -> sigmoid -> map
    re-weighted per channel."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def forward(self, maps: Tensor) -> Tensor:
        logits = self.mlp(maps.mean(dim=(2, 3))) + self.mlp(maps.amax(dim=(2, 3)))
        return maps * torch.sigmoid(logits)[..., None, None]


class MixerMLP(nn.Module):
    """Linear -> GELU -> dropout -> linear -> dropout on the last dimension."""

    def __init__(self, features: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, features * expansion)
        self.fc2 = nn.Linear(features * expansion, features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class GatedMixing(nn.Module):
    """One half of the relation mixer on tokens (R, N, c): ``tokens + MLP(LN(tokens +
    gate(tokens)))``, the MLP across the tokens (``across: tokens``) or the channels."""

    def __init__(
        self,
        across: Literal["tokens", "channels"],
        num_tokens: int,
        channels: int,
        gate: nn.Module | None,
        config: ARMConfig,
        roi_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.across = across
        self.gate = gate
        self.roi_size = roi_size
        self.layout = config.token_layout
        self.norm = nn.LayerNorm(channels)
        width = num_tokens if across == "tokens" else channels
        self.mlp = MixerMLP(width, config.expansion, config.dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        attended = tokens
        if self.gate is not None:
            gated = self.gate(to_maps(tokens, *self.roi_size, self.layout))
            attended = tokens + to_tokens(gated)
        normed = self.norm(attended)
        if self.across == "tokens":
            return tokens + self.mlp(normed.transpose(1, 2)).transpose(1, 2)
        return tokens + self.mlp(normed)


class ARM(nn.Module):
    """The attention-aware relation mixer on RoI maps (R, C, H, W) -> (R, C, H, W) (module
    doc)."""

    def __init__(self, channels: int, roi_size: tuple[int, int], config: ARMConfig) -> None:
        super().__init__()
        if channels % config.reduction:
            raise ValueError(f"RoI channels {channels} are not divisible by {config.reduction}")
        inner = channels // config.reduction
        num_tokens = roi_size[0] * roi_size[1]
        self.config = config
        self.roi_size = roi_size
        self.reduce = nn.Conv2d(channels, inner, 1)
        mixings = []
        if config.token_mixing:
            gate = SpatialGate(config.spatial_gate_kernel) if config.spatial_gate else None
            mixings.append(GatedMixing("tokens", num_tokens, inner, gate, config, roi_size))
        if config.channel_mixing:
            gate = ChannelGate(inner, config.gate_reduction) if config.channel_gate else None
            mixings.append(GatedMixing("channels", num_tokens, inner, gate, config, roi_size))
        self.mixer = nn.Sequential(*mixings) if mixings else None
        self.expand = nn.Conv2d(inner, channels, 1)

    def forward(self, maps: Tensor) -> Tensor:
        if tuple(maps.shape[-2:]) != self.roi_size:
            raise ValueError(f"the ARM was built for {self.roi_size} RoIs, got {maps.shape[-2:]}")
        reduced = self.reduce(maps)  # F' (R, c, H, W)
        enriched = reduced
        if self.mixer is not None:
            mixed = self.mixer(to_tokens(reduced))
            enriched = enriched + to_maps(mixed, *self.roi_size, self.config.token_layout)
        if self.config.simam:
            enriched = enriched + simam(reduced, self.config.simam_lambda)
        return self.expand(enriched)


class PSARM(SeqNet):
    """PS-ARM person search: SeqNet whose two RoI heads each have their own ARM."""

    config: PSARMConfig

    def roi_mixer(self, channels: int) -> nn.Module:
        """An ARM between RoIAlign and res5 (the re-id head gets a copy: separate weights)."""
        return ARM(channels, self.config.roi_pool.output_size, self.config.arm)
