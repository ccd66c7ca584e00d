"""Person search networks: ops, backbones, necks, heads, assigners, losses, one module per method.

`build_model(config)` turns the `model` section of a YAML config into a network; `MODELS` maps
each config `name` to the method's config class and network class.

Every network has the same contract:

- `model(images, targets, *, image_sizes=None) -> dict[str, Tensor]` in training mode: named,
  already weighted losses. `images` (B, 3, H, W) is a zero-padded float batch
  (`models.preprocess.pad_batch`); `targets[i]` holds `boxes` (n, 4) x1 y1 x2 y2 in input pixels
  and `pids` (n,) long, -1 = unlabeled.
- `model(images, *, image_sizes=None) -> Detections` in eval mode (`models.types`).
- `image_sizes` (B, 2) is the (height, width) of each image's valid region, at the top left of
  its slot in the batch (any real dtype; exported graphs take float32). Models treat the rest
  as outside the image: no detection there, boxes clipped to the image, proposals relative to
  the image; so an image's results do not depend on what it is batched with. None means every
  image fills the whole batch.
- Models that embed a given box (RoI heads) also have
  `embed_boxes(images, boxes, *, image_sizes=None) -> (R, D)`, `boxes` a list of (r_i, 4),
  L2-normalised: the query embedding of a box ("GT-box" mode).
- Models whose search similarity is the cosine times the detection score (SeqNet's
  confidence-weighted similarity) say so with `confidence_weighted_similarity = True`; their
  embeddings stay L2-normalised and the evaluation applies the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from torch import nn

from models.alignps import AlignPS, AlignPSConfig
from models.fcos_detector import FCOSDetector, FCOSDetectorConfig
from models.leaps import Leaps, LeapsConfig
from models.psarm import PSARM, PSARMConfig
from models.seqnet import SeqNet, SeqNetConfig


class UnknownModelError(ValueError):
    """A config names a model that is not in MODELS."""


MODELS: dict[str, tuple[type[BaseModel], type[nn.Module]]] = {
    "alignps": (AlignPSConfig, AlignPS),
    "fcos": (FCOSDetectorConfig, FCOSDetector),
    "leaps": (LeapsConfig, Leaps),
    "psarm": (PSARMConfig, PSARM),
    "seqnet": (SeqNetConfig, SeqNet),
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
