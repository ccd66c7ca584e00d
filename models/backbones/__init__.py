"""Backbones by name, for configs: `build_backbone("resnet50", frozen_stages=1, pretrained=...)`."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.backbones.config import BackboneConfig
from models.backbones.frozen_bn import FrozenBatchNorm2d
from models.backbones.pretrained import describe_resnet_state_dict, load_pretrained
from models.backbones.resnet import STAGE_NAMES, STAGE_STRIDES, BasicBlock, Bottleneck, ResNet


def resnet18(**options: Any) -> ResNet:
    """ResNet-18; `options` are ResNet's keyword arguments other than depth."""
    return ResNet(18, **options)


def resnet34(**options: Any) -> ResNet:
    """ResNet-34; `options` are ResNet's keyword arguments other than depth."""
    return ResNet(34, **options)


def resnet50(**options: Any) -> ResNet:
    """ResNet-50 (v1.5); `options` are ResNet's keyword arguments other than depth."""
    return ResNet(50, **options)


BACKBONES: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build_backbone(name: str, *, pretrained: str | Path | None = None, **options: Any) -> ResNet:
    """Build the backbone registered as `name` with `options`, and load `pretrained` weights
    (a local torchvision-layout state dict file) if given."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    backbone = BACKBONES[name](**options)
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone


def backbone_from_config(config: BackboneConfig, out_stages: tuple[str, ...]) -> ResNet:
    """Build the backbone a model config describes, returning `out_stages`."""
    return build_backbone(config.name, **config.build_options(out_stages))


__all__ = [
    "BACKBONES",
    "STAGE_NAMES",
    "STAGE_STRIDES",
    "BackboneConfig",
    "BasicBlock",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "ResNet",
    "backbone_from_config",
    "build_backbone",
    "describe_resnet_state_dict",
    "load_pretrained",
    "resnet18",
    "resnet34",
    "resnet50",
]
