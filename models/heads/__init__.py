"""Detection heads shared by model families: the FCOS dense head (pedestrians, AlignPS)."""

from models.heads.fcos import (
    IGNORED,
    NEGATIVE,
    AnchorPoints,
    FCOSHead,
    FCOSHeadConfig,
    FCOSInferenceConfig,
    FCOSOutputs,
    anchor_points,
    centerness_targets,
    distances_to_boxes,
    flatten_levels,
)

__all__ = [
    "IGNORED",
    "NEGATIVE",
    "AnchorPoints",
    "FCOSHead",
    "FCOSHeadConfig",
    "FCOSInferenceConfig",
    "FCOSOutputs",
    "anchor_points",
    "centerness_targets",
    "distances_to_boxes",
    "flatten_levels",
]
