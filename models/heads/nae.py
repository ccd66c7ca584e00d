"""Norm-aware embedding (NAE; Chen et al., "Norm-Aware Embedding for Efficient Person Search",
CVPR 2020), as SeqNet and PS-ARM use it.

Each input feature (SeqNet: the pooled res4 RoI map and the pooled res5 output) is projected by a
linear layer + BatchNorm1d to its share of the embedding (256 = 128 + 128; a remainder goes to
the last parts). The concatenation is split into an angle and a norm: the L2-normalised vector
is the re-id embedding, and the norm, through a BatchNorm1d of one channel, is the person logit
(trained with binary cross-entropy: a person has a large norm, background a small one).
Initialisation as the released code: weights ~ N(0, 0.01), BatchNorm weights too, biases 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def split_dimension(dim: int, parts: int) -> list[int]:
    """``dim`` split into ``parts`` near-equal shares, the remainder on the last ones."""
    shares = [dim // parts] * parts
    for index in range(dim % parts):
        shares[-1 - index] += 1
    return shares


class NormAwareEmbedding(nn.Module):
    """``nae(features)`` -> (embeddings (R, D) L2-normalised, person logits (R,)).

    Args:
        in_channels: channels of each input feature (R, C_i).
        dim: D, the embedding dimension.
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256) -> None:
        super().__init__()
        if not in_channels or dim < len(in_channels):
            raise ValueError(f"need 1 to {dim} input features, got {list(in_channels)}")
        self.dim = dim
        self.projectors = nn.ModuleList()
        for channels, share in zip(
            in_channels, split_dimension(dim, len(in_channels)), strict=True
        ):
            linear, norm = nn.Linear(channels, share), nn.BatchNorm1d(share)
            for layer in (linear, norm):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
            self.projectors.append(nn.Sequential(linear, norm))
        self.rescaler = nn.BatchNorm1d(1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(features) != len(self.projectors):
            raise ValueError(f"expected {len(self.projectors)} features, got {len(features)}")
        parts = [
            project(feature) for project, feature in zip(self.projectors, features, strict=True)
        ]
        projected = torch.cat(parts, dim=1)  # (R, D)
        norms = projected.norm(dim=1, keepdim=True)  # (R, 1)
        embeddings = projected / norms.clamp(min=1e-12)
        return embeddings, self.rescaler(norms)[:, 0]
