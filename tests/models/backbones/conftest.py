"""torchvision's ResNet state dict layout, written out by hand as the specification to match.

torchvision's `resnet18/34/50` modules, in registration order: `conv1` (7x7, stride 2), `bn1`,
then `layer1`..`layer4`, then `fc`. A BasicBlock holds conv1/bn1/conv2/bn2 (both 3x3); a
Bottleneck holds conv1/bn1 (1x1), conv2/bn2 (3x3), conv3/bn3 (1x1, 4x the width). The first block
of a stage has `downsample.0` (1x1 conv) and `downsample.1` (BatchNorm) when it changes resolution
or width. A BatchNorm2d contributes weight, bias, running_mean, running_var, num_batches_tracked.
"""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

Shapes = dict[str, tuple[int, ...]]

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def _batch_norm(prefix: str, channels: int) -> Shapes:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def _basic_block(prefix: str, in_channels: int, width: int) -> Shapes:
    return {
        f"{prefix}.conv1.weight": (width, in_channels, 3, 3),
        **_batch_norm(f"{prefix}.bn1", width),
        f"{prefix}.conv2.weight": (width, width, 3, 3),
        **_batch_norm(f"{prefix}.bn2", width),
    }


def _bottleneck(prefix: str, in_channels: int, width: int) -> Shapes:
    return {
        f"{prefix}.conv1.weight": (width, in_channels, 1, 1),
        **_batch_norm(f"{prefix}.bn1", width),
        f"{prefix}.conv2.weight": (width, width, 3, 3),
        **_batch_norm(f"{prefix}.bn2", width),
        f"{prefix}.conv3.weight": (4 * width, width, 1, 1),
        **_batch_norm(f"{prefix}.bn3", 4 * width),
    }


def torchvision_resnet_layout(depth: int, base_width: int = 64) -> Shapes:
    """Every key of torchvision's `resnet{depth}().state_dict()` with its shape, in order
    (fc included, 1000 classes); `base_width` scales every width (64 = torchvision)."""
    block, expansion = (_bottleneck, 4) if depth == 50 else (_basic_block, 1)
    shapes = {"conv1.weight": (base_width, 3, 7, 7), **_batch_norm("bn1", base_width)}
    in_channels = base_width
    for stage, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        width = base_width * 2**stage
        out_channels = width * expansion
        for index in range(num_blocks):
            prefix = f"layer{stage + 1}.{index}"
            shapes |= block(prefix, in_channels, width)
            changes_shape = stage > 0 or in_channels != out_channels
            if index == 0 and changes_shape:
                shapes[f"{prefix}.downsample.0.weight"] = (out_channels, in_channels, 1, 1)
                shapes |= _batch_norm(f"{prefix}.downsample.1", out_channels)
            in_channels = out_channels
    shapes |= {"fc.weight": (1000, in_channels), "fc.bias": (1000,)}
    return shapes


def random_torchvision_state_dict(depth: int, base_width: int, seed: int = 0) -> dict[str, Tensor]:
    """A state dict in torchvision's layout with random values; variances are positive."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnet_layout(depth, base_width).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


@pytest.fixture
def torchvision_layout() -> Callable[..., Shapes]:
    return torchvision_resnet_layout


@pytest.fixture
def torchvision_state_dict() -> Callable[..., dict[str, Tensor]]:
    return random_torchvision_state_dict
