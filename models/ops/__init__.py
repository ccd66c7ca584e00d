"""Exact geometric ops, each a `torch.library.custom_op` in the "psearch" namespace with a
PyTorch implementation (CPU and CUDA), a fake implementation for `torch.export`, and autograd
where it applies. Slow loop references that define their semantics are in `models.ops.reference`.
Every op takes tensors of any memory layout, computes half precision in float32 and follows
torchvision's autocast rule (`models.ops.precision`).
"""

from models.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_scale,
    box_xyxy_to_cxcywh,
    clip_boxes_to_image,
    decode_boxes,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    encode_boxes,
    generalized_box_iou,
)
from models.ops.deform_conv import DeformConv2d, DeformConvPack, deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.nms import batched_nms, nms
from models.ops.roi_align import RoIAlign, boxes_to_rois, roi_align

__all__ = [
    "DeformConv2d",
    "DeformConvPack",
    "RoIAlign",
    "batched_nms",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_scale",
    "box_xyxy_to_cxcywh",
    "boxes_to_rois",
    "clip_boxes_to_image",
    "decode_boxes",
    "deform_conv2d",
    "dynamic_roi_align",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "encode_boxes",
    "generalized_box_iou",
    "nms",
    "roi_align",
]
