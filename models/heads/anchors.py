"""Anchor boxes of anchor-based heads (the RPN, RetinaNet): sizes x scales x aspect ratios on one
or several feature levels, and the box coder that turns anchors (or proposals) into boxes.

A level's *base anchors* are centred at (0, 0). Its anchor sizes are every ``size`` of the level
times every ``scale`` (size-major), and each size makes one anchor per aspect ratio
(``ratio = height / width``), of area ``size ** 2``: width ``size / sqrt(ratio)``, height
``size * sqrt(ratio)``. Base anchors are ordered ratio-major (for each ratio, every size), as in
torchvision and mmdetection, and by default their corners are rounded to whole pixels, as
torchvision's ``AnchorGenerator`` does (SeqNet's anchors come from it).

The anchors of a stride-s level sit at ``(x * s + offset * s, y * s + offset * s)`` for every
location (y, x), torchvision's placement for offset 0. Anchors are flattened location-major
(row-major y, then x), then base anchor, level after level: the order in which
:func:`flatten_anchor_maps` flattens a head's per-anchor outputs.

Examples: SeqNet's RPN has one level (res4, stride 16) with sizes (32, 64, 128, 256, 512), scale
1 and ratios (0.5, 1, 2): 15 anchors per location. RetinaNet has five levels (P3-P7) with one
size each, 32 to 512, scales 2^0, 2^(1/3), 2^(2/3) and the same ratios: 9 per location.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import Tensor

from models.config import StrictModel
from models.ops.boxes import DEFAULT_SCALE_CLAMP, decode_boxes, encode_boxes


class AnchorConfig(StrictModel):
    """Anchor shapes per feature level."""

    sizes: tuple[tuple[float, ...], ...] = Field(
        ((32.0, 64.0, 128.0, 256.0, 512.0),),
        description="Per level, the anchor sizes (square root of the area) in input pixels.",
    )
    scales: tuple[float, ...] = Field(
        (1.0,), description="Factors applied to every size (RetinaNet: 2^0, 2^(1/3), 2^(2/3))."
    )
    aspect_ratios: tuple[float, ...] = Field(
        (0.5, 1.0, 2.0), description="Height / width of the anchors of each size."
    )
    round_corners: bool = Field(
        True, description="Round the base anchors' corners to whole pixels (torchvision)."
    )
    offset: float = Field(
        0.0, ge=0, lt=1, description="Anchor centre within its cell, in strides (0: the corner)."
    )

    @model_validator(mode="after")
    def _check(self) -> AnchorConfig:
        values = [size for level in self.sizes for size in level]
        if not self.sizes or any(not level for level in self.sizes):
            raise ValueError("sizes needs at least one level with at least one size")
        for name, numbers in (
            ("sizes", values),
            ("scales", self.scales),
            ("aspect_ratios", self.aspect_ratios),
        ):
            if not numbers or any(value <= 0 for value in numbers):
                raise ValueError(f"{name} must be positive numbers, got {list(numbers)}")
        lengths = {len(level) for level in self.sizes}
        if len(lengths) > 1:
            raise ValueError(
                "every level needs the same number of sizes (one head predicts for all levels), "
                f"got {[len(level) for level in self.sizes]}"
            )
        return self

    @property
    def num_anchors(self) -> int:
        """Anchors per location (the same on every level)."""
        return len(self.sizes[0]) * len(self.scales) * len(self.aspect_ratios)


class AnchorGenerator:
    """The anchors of a config (see the module doc), for feature maps of given sizes."""

    def __init__(self, config: AnchorConfig) -> None:
        self.config = config
        self.num_anchors = config.num_anchors

    def base_anchors(self, level: int) -> Tensor:
        """(A, 4) x1 y1 x2 y2 of a level's anchors centred at (0, 0), ratio-major."""
        sizes = torch.tensor(
            [size * scale for size in self.config.sizes[level] for scale in self.config.scales],
        )
        height_factors = torch.tensor(self.config.aspect_ratios).sqrt()
        widths = (sizes[None, :] / height_factors[:, None]).reshape(-1)
        heights = (sizes[None, :] * height_factors[:, None]).reshape(-1)
        corners = torch.stack((-widths, -heights, widths, heights), dim=1) / 2
        # float32 like torchvision, so that rounding agrees with it to the last pixel.
        return corners.round() if self.config.round_corners else corners

    def __call__(
        self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int], device=None
    ) -> Tensor:
        """(N, 4) anchors of maps of the given (height, width) and strides, N = sum over levels
        of height * width * A."""
        if len(feature_sizes) != len(self.config.sizes) or len(strides) != len(feature_sizes):
            raise ValueError(
                f"the anchors were configured for {len(self.config.sizes)} levels, got "
                f"{len(feature_sizes)} feature sizes and {len(strides)} strides"
            )
        levels = []
        for level, ((height, width), stride) in enumerate(zip(feature_sizes, strides, strict=True)):
            shift = self.config.offset * stride
            xs = torch.arange(width, device=device, dtype=torch.float32) * stride + shift
            ys = torch.arange(height, device=device, dtype=torch.float32) * stride + shift
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
            base = self.base_anchors(level).to(device)
            levels.append((centres + base[None]).reshape(-1, 4))
        return torch.cat(levels)


def flatten_anchor_maps(maps: Sequence[Tensor], values_per_anchor: int) -> Tensor:
    """Per-level head outputs (B, A * V, H_l, W_l) -> (B, N, V) in the anchors' order (location,
    then anchor, level after level); V = 1 for scores, 4 for box deltas."""
    flat = []
    for value in maps:
        batch, channels, height, width = value.shape
        anchors = channels // values_per_anchor
        per_anchor = value.view(batch, anchors, values_per_anchor, height, width)
        flat.append(per_anchor.permute(0, 3, 4, 1, 2).reshape(batch, -1, values_per_anchor))
    return torch.cat(flat, dim=1)


@dataclass(frozen=True)
class BoxCoder:
    """Faster R-CNN's box parametrisation with per-coordinate ``weights`` (wx, wy, ww, wh): the
    RPN uses (1, 1, 1, 1), Fast R-CNN heads (10, 10, 5, 5). See ``models.ops.boxes`` for the
    formulas."""

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def __post_init__(self) -> None:
        if len(self.weights) != 4 or any(not w > 0 for w in self.weights):
            raise ValueError(f"box coder weights must be 4 positive numbers, got {self.weights}")
        if not math.isfinite(self.scale_clamp):
            raise ValueError(f"scale_clamp must be finite, got {self.scale_clamp}")

    def encode(self, boxes: Tensor, references: Tensor) -> Tensor:
        """Deltas (..., 4) that turn ``references`` (anchors, proposals) into ``boxes``."""
        return encode_boxes(boxes, references, self.weights)

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """Boxes (..., 4) from deltas applied to ``references``."""
        return decode_boxes(deltas, references, self.weights, self.scale_clamp)
