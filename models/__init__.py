"""Person search networks: ops, backbones, necks, heads, assigners, losses, one module per method.

`build_model(config)` turns the `model` section of a YAML config into a network; `MODELS` maps
each config `name` to the method's config class and network class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from torch import nn

from models.alignps import AlignPS, AlignPSConfig
from models.fcos_detector import FCOSDetector, FCOSDetectorConfig
from models.leaps import Leaps, LeapsConfig


class UnknownModelError(ValueError):
    """A config names a model that is not in MODELS."""


MODELS: dict[str, tuple[type[BaseModel], type[nn.Module]]] = {
    "alignps": (AlignPSConfig, AlignPS),
    "fcos": (FCOSDetectorConfig, FCOSDetector),
    "leaps": (LeapsConfig, Leaps),
}


def build_model(config: Mapping[str, Any] | BaseModel) -> nn.Module:
    """Validate a model config (a mapping with a `name`, or a method's config object) and build
    the network it describes. Unknown names and fields are errors that say what is allowed."""
    data = config.model_dump() if isinstance(config, BaseModel) else dict(config)
    name = data.get("name")
    if name not in MODELS:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model name {name!r}; known models: {known}")
    config_class, model_class = MODELS[name]
    return model_class(config_class.model_validate(data))
