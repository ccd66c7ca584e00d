"""Loss-aware label assignment (LLA; Ge et al., 2021, section 3.3).

For every anchor-GT pair the restricted cost (eq. 4) is

    C = C_cls + lambda * C_reg + C_inbox

with C_cls the focal loss of the anchor's score as a positive, C_reg the IoU loss of the anchor's
decoded box against the GT box, and C_inbox a large constant when the anchor point lies outside
the GT box (eq. 3: +inf in theory; 10^2 in the paper, 10^3 in the authors' released code). The
K lowest-cost anchors of each GT are its positives; an anchor chosen by several GTs goes to the
GT it costs least, as the released code decides it: the cheapest of all GTs, not only of those
that chose it. There is no scale prior and no center prior: which level and which part of a
person an anchor covers is decided by the model's own losses.

Ignore regions (CrowdHuman's crowds and reflections) are assigned like persons by the head,
which passes them as extra GT boxes: they claim their K cheapest anchors, which the head then
leaves out of every loss, as the released code does.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from models.config import StrictModel
from models.losses.detection import IoULossKind, iou_loss, sigmoid_focal_loss


class LLAConfig(StrictModel):
    name: Literal["lla"] = Field("lla", description="Assigner name (registry key).")
    top_k: int = Field(10, gt=0, description="Positives per GT: the K lowest-cost anchors.")
    reg_weight: float = Field(
        1.5,
        ge=0,
        description="lambda of eq. 2 (paper Sec. 4.2: 1.3 for FCOS; the authors' released "
        "LLA.FCOS config: 1.5).",
    )
    inbox_cost: float = Field(
        1000.0,
        ge=0,
        description="C_inbox for an anchor point outside the GT box (eq. 3; paper 10^2, the "
        "authors' released code 10^3).",
    )
    reg_cost: IoULossKind = Field(
        "iou",
        description="IoU loss used as C_reg before assignment (paper 4.1: IoU loss; the loss "
        "after assignment is the head's box_loss, GIoU).",
    )
    focal_alpha: float = Field(0.25, description="Focal loss alpha of C_cls.")
    focal_gamma: float = Field(2.0, ge=0, description="Focal loss gamma of C_cls.")


class LLAAssigner:
    """Assigns anchors to ground-truth boxes by their joint loss (see the module doc)."""

    def __init__(self, config: LLAConfig) -> None:
        self.config = config

    @torch.no_grad()
    def __call__(
        self,
        *,
        points: Tensor,
        gt_boxes: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
        strides: Tensor | None = None,
        level_ids: Tensor | None = None,
    ) -> Tensor:
        """Assigned ground-truth index per anchor, -1 = negative.

        Args:
            points: (P, 2) anchor point x, y in input pixels.
            gt_boxes: (G, 4) x1 y1 x2 y2.
            cls_logits: (P,) the anchors' person logits.
            pred_boxes: (P, 4) the anchors' decoded boxes, x1 y1 x2 y2.
            strides, level_ids: unused (LLA has no scale prior).

        Returns:
            (P,) long.
        """
        if gt_boxes.shape[0] == 0:
            return torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
        return assign_lowest_costs(
            self.cost_matrix(points, gt_boxes, cls_logits, pred_boxes), self.config.top_k
        )

    def cost_matrix(
        self, points: Tensor, gt_boxes: Tensor, cls_logits: Tensor, pred_boxes: Tensor
    ) -> Tensor:
        """The restricted cost matrix C_r (eq. 4): (G, P)."""
        cfg = self.config
        num_gt, num_points = gt_boxes.shape[0], points.shape[0]
        # One class (person): an anchor's classification cost is the same for every GT.
        cls_cost = sigmoid_focal_loss(
            cls_logits, torch.ones_like(cls_logits), cfg.focal_alpha, cfg.focal_gamma
        )  # (P,)
        reg_cost = iou_loss(
            pred_boxes[None].expand(num_gt, num_points, 4),
            gt_boxes[:, None].expand(num_gt, num_points, 4),
            kind=cfg.reg_cost,
        )  # (G, P)
        outside = ~points_inside_boxes(points, gt_boxes)
        return cls_cost[None] + cfg.reg_weight * reg_cost + cfg.inbox_cost * outside


def points_inside_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """(P, 2) points, (G, 4) boxes -> (G, P) bool: the point lies strictly inside the box."""
    after_top_left = (points[None] > boxes[:, None, :2]).all(dim=-1)
    before_bottom_right = (points[None] < boxes[:, None, 2:]).all(dim=-1)
    return after_top_left & before_bottom_right


def assign_lowest_costs(costs: Tensor, top_k: int) -> Tensor:
    """Top-K selection of LLA on a (G, P) cost matrix -> (P,) GT index or -1.

    Each GT (row) takes its ``min(top_k, P)`` lowest-cost anchors (columns). An anchor taken by
    several GTs goes to the GT of lowest cost in its whole column, as the authors' released code
    resolves it (that GT may be one that did not take it).
    """
    num_gt, num_anchors = costs.shape
    if num_gt == 0 or num_anchors == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=costs.device)
    _, chosen_anchors = costs.topk(min(top_k, num_anchors), dim=1, largest=False)
    chosen = torch.zeros_like(costs, dtype=torch.bool).scatter_(1, chosen_anchors, True)
    times_chosen = chosen.sum(dim=0)  # (P,)
    chooser = chosen.int().argmax(dim=0)  # the only GT that chose an anchor chosen once
    cheapest = costs.argmin(dim=0)
    assigned = torch.where(times_chosen > 1, cheapest, chooser)
    return torch.where(times_chosen > 0, assigned, -1)
