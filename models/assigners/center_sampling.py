"""FCOS center sampling (Tian et al., 2019; "center sampling" of FCOS v2 and ATSS).

A location is a positive of a ground-truth box when it lies in the box's center region, a square
of half-size ``radius * stride`` around the box center clipped to the box, and, for a pyramid
with size ranges, when the box's largest regression distance from the location lies in the range
of the location's level. A location claimed by several boxes goes to the one of smallest area.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from models.config import StrictModel
from models.ops.boxes import box_area


class CenterSamplingConfig(StrictModel):
    name: Literal["center_sampling"] = Field(
        "center_sampling", description="Assigner name (registry key)."
    )
    radius: float = Field(
        1.5, gt=0, description="Half-size of the center region, in strides of the level."
    )
    size_ranges: tuple[float, ...] = Field(
        (),
        description="Boundaries between the levels' regression ranges, in pixels (FCOS: 64, 128, "
        "256, 512 for P3-P7: level i takes boxes whose largest distance from the location is in "
        "(b[i-1], b[i]]); one per level boundary, or empty for no scale constraint (one level).",
    )

    @field_validator("size_ranges")
    @classmethod
    def _ascending(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(b <= 0 for b in value) or list(value) != sorted(set(value)):
            raise ValueError(f"size_ranges must be positive and strictly ascending, got {value}")
        return value


class CenterSamplingAssigner:
    """Assigns locations to ground-truth boxes by FCOS center sampling (see the module doc)."""

    def __init__(self, config: CenterSamplingConfig) -> None:
        self.config = config

    @torch.no_grad()
    def __call__(
        self,
        *,
        points: Tensor,
        strides: Tensor,
        level_ids: Tensor,
        gt_boxes: Tensor,
        cls_logits: Tensor | None = None,
        pred_boxes: Tensor | None = None,
    ) -> Tensor:
        """Assigned ground-truth index per location, -1 = negative.

        Args:
            points: (P, 2) location x, y in input pixels.
            strides: (P,) stride of each location's level.
            level_ids: (P,) pyramid level index of each location (0 = finest).
            gt_boxes: (G, 4) x1 y1 x2 y2.
            cls_logits, pred_boxes: unused (center sampling looks at geometry only).

        Returns:
            (P,) long.
        """
        num_points = points.shape[0]
        if gt_boxes.shape[0] == 0:
            return torch.full((num_points,), -1, dtype=torch.long, device=points.device)
        in_center = self._in_center_region(points, strides, gt_boxes)  # (G, P)
        candidates = in_center & self._in_size_range(points, level_ids, gt_boxes)
        areas = box_area(gt_boxes)[:, None].expand_as(candidates)
        area_if_candidate = torch.where(candidates, areas, math.inf)
        smallest_area, gt_index = area_if_candidate.min(dim=0)
        return torch.where(torch.isfinite(smallest_area), gt_index, -1)

    def _in_center_region(self, points: Tensor, strides: Tensor, gt_boxes: Tensor) -> Tensor:
        """(G, P): the location is strictly inside the box's clipped center square."""
        centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
        half_size = (self.config.radius * strides)[None, :, None]  # (1, P, 1)
        region_min = torch.maximum(centers[:, None] - half_size, gt_boxes[:, None, :2])
        region_max = torch.minimum(centers[:, None] + half_size, gt_boxes[:, None, 2:])
        inside = (points[None] > region_min) & (points[None] < region_max)  # (G, P, 2)
        return inside.all(dim=-1)

    def _in_size_range(self, points: Tensor, level_ids: Tensor, gt_boxes: Tensor) -> Tensor:
        """(G, P): the box's largest regression distance fits the location's level."""
        boundaries = self.config.size_ranges
        if not boundaries:
            return torch.ones(
                gt_boxes.shape[0], points.shape[0], dtype=torch.bool, device=points.device
            )
        if int(level_ids.max()) > len(boundaries):
            raise ValueError(
                f"size_ranges {boundaries} define {len(boundaries) + 1} levels, but a location "
                f"is on level {int(level_ids.max())}"
            )
        edges = points.new_tensor([0.0, *boundaries, math.inf])
        low, high = edges[level_ids], edges[level_ids + 1]  # (P,)
        distances = torch.cat(
            (points[None] - gt_boxes[:, None, :2], gt_boxes[:, None, 2:] - points[None]), dim=-1
        )  # (G, P, 4): left, top, right, bottom
        largest = distances.max(dim=-1).values
        return (largest > low) & (largest <= high)
