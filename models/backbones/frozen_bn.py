"""Batch normalisation with fixed statistics and affine parameters.

Detectors train with a few images per GPU, far too few for batch statistics, so the ImageNet
statistics of the pretrained backbone are kept as constants. Everything is a buffer: the module
has no parameters, and its output is the same in train and eval mode.
"""

from typing import Any

import torch
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """`y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`, per channel.

    Its buffers have BatchNorm2d's names (`weight`, `bias`, `running_mean`, `running_var`), so a
    BatchNorm2d state dict loads into it; BatchNorm2d's `num_batches_tracked` is ignored.
    Initialised to the identity (weight 1, bias 0, mean 0, var 1).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        # One multiply-add per element: fold the four buffers into a scale and a shift.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A BatchNorm2d checkpoint counts its training steps; there are none to count here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
