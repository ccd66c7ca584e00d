"""The instance interaction of Sparse R-CNN, used by LEAPS' detection head and by HIRM.

Each proposal owns two 1x1 convolutions whose weights a linear layer generates from the
proposal's feature; they are applied to that proposal's RoI features only (a batched matrix
product), each followed by LayerNorm and ReLU, and a fully connected layer then maps the
flattened result to one vector per proposal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def roi_tokens(roi_features: Tensor) -> Tensor:
    """(R, C, h, w) RoI features -> (R, h*w, C): one token per bin, channels last."""
    return roi_features.flatten(2).transpose(1, 2)


class DynamicConv(nn.Module):
    """Two proposal-specific 1x1 convs, then flatten and project.

    Args:
        channels: C, channels of the RoI features and width of the proposal features.
        dynamic_dim: inner width of the two convs (C -> dynamic_dim -> C).
        num_bins: h * w of the RoI features.
        out_dim: width of the output vector.
    """

    def __init__(self, channels: int, dynamic_dim: int, num_bins: int, out_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.dynamic_dim = dynamic_dim
        self.weight_generator = nn.Linear(channels, 2 * channels * dynamic_dim)
        self.norm_inner = nn.LayerNorm(dynamic_dim)
        self.norm_outer = nn.LayerNorm(channels)
        self.project = nn.Linear(num_bins * channels, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> Tensor:
        """(R, C) proposal features and (R, C, h, w) RoI features -> (R, out_dim)."""
        weights = self.weight_generator(proposal_features)  # (R, 2 * C * D)
        split = self.channels * self.dynamic_dim
        conv1 = weights[:, :split].reshape(-1, self.channels, self.dynamic_dim)
        conv2 = weights[:, split:].reshape(-1, self.dynamic_dim, self.channels)
        tokens = roi_tokens(roi_features)  # (R, h*w, C)
        tokens = F.relu(self.norm_inner(torch.bmm(tokens, conv1)))  # (R, h*w, D)
        tokens = F.relu(self.norm_outer(torch.bmm(tokens, conv2)))  # (R, h*w, C)
        return F.relu(self.norm_out(self.project(tokens.flatten(1))))
