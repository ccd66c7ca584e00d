"""ONNX export of a person search model: the portable graph and the TensorRT plugin graph.

A model is exported once by ``torch.onnx.export``'s dynamo path (opset 19, dynamic batch,
height and width), with ``custom_translation_table`` mapping our custom ops (``models/ops``):

==============================  ===================================  ===========================
op                              plugin graph (``model.plugins``)     portable graph (``model``)
==============================  ===================================  ===========================
``psearch::roi_align``          ``RoiAlign`` (opset-16 definition)   the same
``psearch::nms`` / ``batched``  ``NonMaxSuppression`` + ``TopK`` +   the same
                                ``Compress``
``psearch::deform_conv2d``      ``psearch::DeformConv2d``            ``DeformConv`` (opset 19)
``psearch::dynamic_roi_align``  ``psearch::DynamicRoIAlign``         ``GridSample`` + masked mean
==============================  ===================================  ===========================

The export yields the plugin graph; the portable graph is the same graph with each plugin node
rewritten into standard ops (onnxscript's pattern rewriter), so the costly PyTorch export and
decomposition run once for both.

Why these forms (see docs/export.md):

- opset 19: ``DeformConv`` exists from 19; ONNX Runtime's CPU ``RoiAlign`` kernel stops at the
  opset-16 definition (a model at opset 22 fails to load), and from opset 20 ``GridSample``'s
  ``bilinear`` is called ``linear``, which TensorRT's parser reads as nearest. We write
  ``bilinear``, and :func:`check_graph` refuses the opset-20 names.
- ``RoiAlign`` always gets ``sampling_ratio`` (TensorRT's parser assumes 1 when it is absent;
  our adaptive -1 is ONNX's 0).
- Dynamic RoIAlign has no ONNX op. The portable form computes every sample point in the graph,
  zeroes samples more than one pixel outside the feature map and clamps the others onto it
  (the rules of ``models/ops/roi_align.py``), then lets ``GridSample`` interpolate. Its own
  ``zeros`` padding would be wrong: RoIAlign reads the border pixel for a sample in (-1, 0),
  where zero padding blends in zeros. With the clamp in the graph, ``border`` padding and
  ``align_corners=1`` make ``GridSample`` an exact bilinear read.
- Plugin nodes carry only int, float and 1-D int array attributes, as TensorRT's Python plugins
  accept. Their contracts are in :data:`PLUGIN_OPS`.
- ``image_sizes`` (B, 2), each image's (height, width) in the padded batch, is a float32 input:
  the models use it as floats (to scale proposals, clip boxes, compare with location centres),
  float32 holds every pixel count exactly up to 2^24, and TensorRT takes float32 inputs as they
  are, where int64 ones are narrowed to int32 or need casts around every use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import onnx_ir as ir
import onnxscript
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnx.defs import OpSchema
from onnxscript import opset19
from onnxscript.rewriter import pattern
from torch import Tensor, nn

OPSET = 19
# ONNX Runtime 1.31 loads IR versions up to 13; onnx 1.23 writes 14 by default.
IR_VERSION = 10
PLUGIN_DOMAIN = "psearch"
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "scores", "embeddings")
# The query graph of models that embed given boxes: one image, (R, 4) boxes in its pixels.
EMBED_INPUT_NAMES = ("images", "boxes", "image_sizes")
EMBED_OUTPUT_NAMES = ("embeddings",)

# GridSample modes that opset 20 renamed; TensorRT reads "linear" as nearest-neighbour.
FORBIDDEN_GRID_SAMPLE_MODES = ("linear", "cubic")

# The backbones' coarsest stride: exported image sides are larger, see _image_dim.
COARSEST_STRIDE = 32

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64


class ExportError(RuntimeError):
    """A model cannot be exported as asked (the message says why and what to change)."""


# --------------------------------------------------------------------------------------------
# Plugin node contracts


PLUGIN_OPS: dict[str, str] = {
    "DynamicRoIAlign": (
        "inputs: input (N, C, H, W), rois (K, 5) = (batch index, x1, y1, x2, y2) in input "
        "pixels, offsets (K, oh, ow, 2) = per-bin (dx, dy) in units of the RoI's width / height; "
        "attributes: spatial_scale (float), sampling_ratio (int, <= 0: adaptive), aligned "
        "(int 0/1); output (K, C, oh, ow). Semantics: models/ops/dynamic_roi_align.py."
    ),
    "DeformConv2d": (
        "inputs: input (N, Cin, H, W), offset (N, 2 * offset_groups * kh * kw, oH, oW) as "
        "(dy, dx) pairs, weight (Cout, Cin / groups, kh, kw), bias (Cout) (zeros when the layer "
        "has none), mask (N, offset_groups * kh * kw, oH, oW) (ones for DCNv1); attributes: "
        "strides, pads, dilations (1-D int arrays (h, w)), groups, offset_groups (int); output "
        "(N, Cout, oH, oW). Semantics: models/ops/deform_conv.py (torchvision's deform_conv2d)."
    ),
}

_PLUGIN_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, OpSchema.AttrType]]] = {
    "DynamicRoIAlign": (
        ("input", "rois", "offsets"),
        {
            "spatial_scale": OpSchema.AttrType.FLOAT,
            "sampling_ratio": OpSchema.AttrType.INT,
            "aligned": OpSchema.AttrType.INT,
        },
    ),
    "DeformConv2d": (
        ("input", "offset", "weight", "bias", "mask"),
        {
            "strides": OpSchema.AttrType.INTS,
            "pads": OpSchema.AttrType.INTS,
            "dilations": OpSchema.AttrType.INTS,
            "groups": OpSchema.AttrType.INT,
            "offset_groups": OpSchema.AttrType.INT,
        },
    ),
}


def _register_plugin_schemas() -> onnxscript.values.Opset:
    """Declare the plugin ops to ONNX (in this process), so that onnxscript emits them as plain
    nodes (no function body that a consumer could inline instead of using the plugin) and the
    checker validates their inputs and attributes."""
    for name, (inputs, attributes) in _PLUGIN_SIGNATURES.items():
        if onnx.defs.has(name, PLUGIN_DOMAIN):
            continue
        schema = OpSchema(
            name,
            PLUGIN_DOMAIN,
            1,
            PLUGIN_OPS[name],
            inputs=[OpSchema.FormalParameter(input_name, "T") for input_name in inputs],
            outputs=[OpSchema.FormalParameter("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
            attributes=[
                OpSchema.Attribute(attr_name, attr_type, required=True)
                for attr_name, attr_type in attributes.items()
            ],
        )
        onnx.defs.register_schema(schema)
    return onnxscript.values.Opset(PLUGIN_DOMAIN, 1)


plugin_opset = _register_plugin_schemas()


# --------------------------------------------------------------------------------------------
# Graph-building helpers. ``op`` is whatever records nodes: onnxscript's opset 19 while the
# exporter translates a node, the rewriter's builder while a plugin node is expanded.


def _ints(op, *values: int):
    return op.Constant(value_ints=list(values))


def _int(op, value: int):
    return op.Constant(value_int=int(value))


def _float(op, value: float):
    return op.Constant(value_float=float(value))


def _column(op, table, index: int):
    """Column ``index`` of a (K, M) table, as (K,)."""
    return op.Gather(table, _int(op, index), axis=1)


def _static_dim(value, axis: int, what: str) -> int:
    shape = value.shape
    dim = shape[axis] if shape is not None and len(shape) > axis else None
    if not isinstance(dim, int):
        raise ExportError(f"{what} must have a static size along axis {axis}, got {dim}")
    return dim


def _float_range(op, count: int):
    """(count,) float: 0, 1, ..., count - 1."""
    return op.Cast(op.Range(_int(op, 0), _int(op, count), _int(op, 1)), to=FLOAT)


def _filled(op, shape, dtype: int, value: float | bool):
    """A tensor of ``shape`` (a 1-D int64 tensor) filled with ``value``."""
    return op.ConstantOfShape(shape, value=onnx.helper.make_tensor("value", dtype, [1], [value]))


# --------------------------------------------------------------------------------------------
# psearch::roi_align -> RoiAlign


def roi_align_to_onnx(
    input,
    rois,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
):
    """``RoiAlign`` with torchvision's semantics: ``half_pixel`` is ``aligned=True``, and
    ``output_half_pixel`` (no shift, RoI size raised to 1) is ``aligned=False``."""
    op = opset19
    boxes = op.Slice(rois, _ints(op, 1), _ints(op, 5), _ints(op, 1))
    batch_indices = op.Cast(_column(op, rois, 0), to=INT64)
    return op.RoiAlign(
        input,
        boxes,
        batch_indices,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=pooled_height,
        output_width=pooled_width,
        sampling_ratio=max(sampling_ratio, 0),  # always written: TensorRT's default is 1
        spatial_scale=float(spatial_scale),
    )


# --------------------------------------------------------------------------------------------
# psearch::nms, psearch::batched_nms -> NonMaxSuppression

_LOWEST_FLOAT = -3.4028234663852886e38


def _kept_in_score_order(boxes, scores, class_scores, iou_threshold: float):
    """Indices kept by ``NonMaxSuppression``, by decreasing score (ties: lower index first).

    ``class_scores`` (1, C, N): the score of each box in its class, -inf elsewhere.
    ``NonMaxSuppression`` keeps a box unless a kept one overlaps it with IoU > threshold, visits
    equal scores by index and keeps only scores > ``score_threshold``: with the lowest float as
    threshold, exactly the boxes of each class. It treats an inverted box as the box between its
    corners where ours counts it as empty, so inverted boxes are flattened to zero area first.
    """
    op = opset19
    x1, y1, x2, y2 = (_column(op, boxes, i) for i in range(4))
    corners = (x1, y1, op.Max(x1, x2), op.Max(y1, y2))
    flattened = op.Concat(*(op.Unsqueeze(v, _ints(op, 1)) for v in corners), axis=1)
    count = op.Shape(scores)  # (1,) = N
    selected = op.NonMaxSuppression(
        op.Unsqueeze(flattened, _ints(op, 0)),
        class_scores,
        count,
        op.Constant(value_floats=[float(iou_threshold)]),
        op.Constant(value_floats=[_LOWEST_FLOAT]),
    )  # (S, 3) = (batch, class, box)
    kept = op.Gather(selected, _int(op, 2), axis=1)
    is_kept = op.ScatterElements(
        _filled(op, count, onnx.TensorProto.BOOL, False),
        kept,
        _filled(op, op.Shape(kept), onnx.TensorProto.BOOL, True),
        axis=0,
    )
    _, by_score = op.TopK(scores, count, axis=0, largest=1, sorted=1)  # ties: lower index first
    return op.Compress(by_score, op.Gather(is_kept, by_score), axis=0)


def nms_to_onnx(boxes, scores, iou_threshold: float):
    """Greedy NMS of one class."""
    class_scores = opset19.Unsqueeze(scores, _ints(opset19, 0, 1))  # (1, 1, N)
    return _kept_in_score_order(boxes, scores, class_scores, iou_threshold)


def batched_nms_to_onnx(boxes, scores, idxs, iou_threshold: float):
    """Greedy NMS per category: category c is class c of ``NonMaxSuppression``."""
    op = opset19
    with_empty = op.Concat(idxs, _ints(op, -1), axis=0)  # C = 0 when there are no boxes
    num_classes = op.Add(op.ReduceMax(with_empty, keepdims=0), _int(op, 1))
    classes = op.Unsqueeze(op.Range(_int(op, 0), num_classes, _int(op, 1)), _ints(op, 1))
    member = op.Equal(op.Unsqueeze(idxs, _ints(op, 0)), classes)  # (C, N)
    class_scores = op.Where(member, op.Unsqueeze(scores, _ints(op, 0)), _float(op, -math.inf))
    return _kept_in_score_order(
        boxes, scores, op.Unsqueeze(class_scores, _ints(op, 0)), iou_threshold
    )


# --------------------------------------------------------------------------------------------
# psearch::dynamic_roi_align -> psearch::DynamicRoIAlign -> GridSample


def dynamic_roi_align_to_plugin(
    input, rois, offsets, spatial_scale: float, sampling_ratio: int, aligned: bool
):
    """One ``psearch::DynamicRoIAlign`` node (contract in :data:`PLUGIN_OPS`)."""
    return plugin_opset.DynamicRoIAlign(
        input,
        rois,
        offsets,
        spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio),
        aligned=int(aligned),
    )


def _axis_samples(op, start, size, bins: int, samples: int, shifts, bin_axis: int):
    """Sample coordinates along one axis, computed in the order models/ops/roi_align.py does:
    ``start + bin * bin_size + shift * size + (i + 0.5) * bin_size / samples``.

    ``start``, ``size`` (K,): the RoI on the feature map; ``shifts`` (K, oh, ow): the bins'
    learned offsets. Returns a (K, oh, gy, ow, gx)-broadcastable tensor: bins on ``bin_axis``
    (1 for y, 3 for x) and samples on the axis after it.
    """
    per_roi = op.Unsqueeze(start, _ints(op, 1, 2, 3, 4))  # (K, 1, 1, 1, 1)
    roi_size = op.Unsqueeze(size, _ints(op, 1, 2, 3, 4))
    bin_size = op.Div(roi_size, _float(op, bins))
    bin_shape, sample_shape = [1] * 5, [1] * 5
    bin_shape[bin_axis], sample_shape[bin_axis + 1] = bins, samples
    bin_index = op.Reshape(_float_range(op, bins), _ints(op, *bin_shape))
    sample_index = op.Reshape(_float_range(op, samples), _ints(op, *sample_shape))
    bin_start = op.Add(
        op.Add(per_roi, op.Mul(bin_index, bin_size)),
        op.Mul(op.Unsqueeze(shifts, _ints(op, 2, 4)), roi_size),
    )
    in_bin = op.Div(op.Mul(op.Add(sample_index, _float(op, 0.5)), bin_size), _float(op, samples))
    return op.Add(bin_start, in_bin)


def _inside(op, coord, size):
    """RoIAlign reads a sample only when -1 <= coord <= size."""
    return op.And(op.GreaterOrEqual(coord, _float(op, -1.0)), op.LessOrEqual(coord, size))


def _normalized(op, coord, size):
    """Pixel coordinate -> GridSample's [-1, 1] with align_corners=1 (pixel centres at the
    ends); a size of 1 maps everything to its only pixel."""
    extent = op.Max(op.Sub(size, _float(op, 1.0)), _float(op, 1.0))
    return op.Sub(op.Div(op.Mul(coord, _float(op, 2.0)), extent), _float(op, 1.0))


def dynamic_roi_align_from_grid_sample(
    op, input, rois, offsets, spatial_scale: float, sampling_ratio: int, aligned: bool
):
    """Dynamic RoIAlign from standard ops: sample points, border rules, one ``GridSample``,
    masked mean.

    The batch is laid side by side along the width, ``(N, C, H, W) -> (1, C, H, N * W)``, and
    each RoI's x coordinates move into its image's strip, so that a single ``GridSample`` reads
    exactly the RoIs' samples (no image is sampled at another image's RoIs). Coordinates are
    clamped into their own image first, so interpolation never reaches into a neighbour.
    """
    pooled_h = _static_dim(offsets, 1, "dynamic_roi_align offsets")
    pooled_w = _static_dim(offsets, 2, "dynamic_roi_align offsets")
    samples = sampling_ratio
    shift = 0.5 if aligned else 0.0

    def scaled(column: int):
        return op.Sub(
            op.Mul(_column(op, rois, column), _float(op, spatial_scale)), _float(op, shift)
        )

    start_x, start_y = scaled(1), scaled(2)
    width, height = op.Sub(scaled(3), start_x), op.Sub(scaled(4), start_y)
    if not aligned:
        width, height = op.Max(width, _float(op, 1.0)), op.Max(height, _float(op, 1.0))
    shift_x = op.Gather(offsets, _int(op, 0), axis=3)  # (K, oh, ow)
    shift_y = op.Gather(offsets, _int(op, 1), axis=3)
    x = _axis_samples(op, start_x, width, pooled_w, samples, shift_x, bin_axis=3)
    y = _axis_samples(op, start_y, height, pooled_h, samples, shift_y, bin_axis=1)
    grid_shape = op.Max(op.Shape(x), op.Shape(y))  # (K, oh, g, ow, g)
    x, y = op.Expand(x, grid_shape), op.Expand(y, grid_shape)

    feature_shape = op.Shape(input)
    batch = op.Gather(feature_shape, _int(op, 0))
    size_h = op.Cast(op.Gather(feature_shape, _int(op, 2)), to=FLOAT)
    size_w = op.Cast(op.Gather(feature_shape, _int(op, 3)), to=FLOAT)
    mask = op.Cast(op.And(_inside(op, x, size_w), _inside(op, y, size_h)), to=FLOAT)
    x = op.Clip(x, _float(op, 0.0), op.Sub(size_w, _float(op, 1.0)))
    y = op.Clip(y, _float(op, 0.0), op.Sub(size_h, _float(op, 1.0)))
    image = op.Unsqueeze(_column(op, rois, 0), _ints(op, 1, 2, 3, 4))
    x = op.Add(x, op.Mul(image, size_w))
    strips_w = op.Mul(op.Cast(batch, to=FLOAT), size_w)
    grid = op.Concat(
        op.Unsqueeze(_normalized(op, x, strips_w), _ints(op, 5)),
        op.Unsqueeze(_normalized(op, y, size_h), _ints(op, 5)),
        axis=5,
    )
    grid = op.Reshape(grid, _ints(op, 1, -1, pooled_w * samples, 2))  # (1, K*oh*g, ow*g, 2)

    channels_height = op.Slice(feature_shape, _ints(op, 1), _ints(op, 3))
    strips = op.Reshape(
        op.Transpose(input, perm=[1, 2, 0, 3]),  # (C, H, N, W)
        op.Concat(_ints(op, 1), channels_height, _ints(op, -1), axis=0),
    )  # (1, C, H, N * W)
    sampled = op.GridSample(strips, grid, mode="bilinear", padding_mode="border", align_corners=1)
    per_roi_shape = op.Concat(
        op.Slice(feature_shape, _ints(op, 1), _ints(op, 2)),
        _ints(op, -1, pooled_h, samples, pooled_w, samples),
        axis=0,
    )
    sampled = op.Reshape(sampled, per_roi_shape)  # (C, K, oh, g, ow, g)
    sampled = op.Mul(sampled, op.Unsqueeze(mask, _ints(op, 0)))
    pooled = op.ReduceMean(sampled, _ints(op, 3, 5), keepdims=0)  # (C, K, oh, ow)
    return op.Transpose(pooled, perm=[1, 0, 2, 3])


# --------------------------------------------------------------------------------------------
# psearch::deform_conv2d -> psearch::DeformConv2d -> DeformConv


def deform_conv2d_to_plugin(
    input,
    offset,
    weight,
    bias,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask,
):
    """One ``psearch::DeformConv2d`` node with all five inputs (contract in
    :data:`PLUGIN_OPS`): a missing bias is zeros, a missing mask (DCNv1) is ones."""
    op = opset19
    kernel_h = _static_dim(weight, 2, "deform_conv2d weight")
    kernel_w = _static_dim(weight, 3, "deform_conv2d weight")
    in_channels = _static_dim(input, 1, "deform_conv2d input")
    groups = in_channels // _static_dim(weight, 1, "deform_conv2d weight")
    offset_groups = _static_dim(offset, 1, "deform_conv2d offset") // (2 * kernel_h * kernel_w)
    if bias is None:
        bias = _filled(op, op.Slice(op.Shape(weight), _ints(op, 0), _ints(op, 1)), FLOAT, 0.0)
    if mask is None:
        offset_shape = op.Shape(offset)
        mask_shape = op.Concat(
            op.Slice(offset_shape, _ints(op, 0), _ints(op, 1)),
            _ints(op, offset_groups * kernel_h * kernel_w),
            op.Slice(offset_shape, _ints(op, 2), _ints(op, 4)),
            axis=0,
        )
        mask = _filled(op, mask_shape, FLOAT, 1.0)
    return plugin_opset.DeformConv2d(
        input,
        offset,
        weight,
        bias,
        mask,
        strides=list(stride),
        pads=list(padding),
        dilations=list(dilation),
        groups=groups,
        offset_groups=offset_groups,
    )


def _is_constant_one_mask(mask: ir.Value) -> bool:
    """Whether ``mask`` is the ones that :func:`deform_conv2d_to_plugin` made for DCNv1."""
    producer = mask.producer()
    if producer is None or producer.op_type != "ConstantOfShape":
        return False
    value = producer.attributes.get("value")
    return value is not None and value.value.numpy().tolist() == [1.0]


def deform_conv2d_from_plugin(op, input, offset, weight, bias, mask, strides, pads, dilations,
                              groups, offset_groups):  # fmt: skip
    """ONNX ``DeformConv``: the same offset layout ((dy, dx) per tap) and mask as ours; a DCNv1
    layer's mask of ones is left out."""
    pad_h, pad_w = pads.value
    return op.DeformConv(
        input,
        weight,
        offset,
        bias,
        None if _is_constant_one_mask(mask) else mask,
        dilations=list(dilations.value),
        group=groups.value,
        kernel_shape=[_static_dim(weight, 2, "weight"), _static_dim(weight, 3, "weight")],
        offset_group=offset_groups.value,
        pads=[pad_h, pad_w, pad_h, pad_w],
        strides=list(strides.value),
    )


# --------------------------------------------------------------------------------------------
# Plugin graph -> portable graph


def _dynamic_roi_align_pattern(op, input, rois, offsets, spatial_scale, sampling_ratio, aligned):
    return op.DynamicRoIAlign(
        input,
        rois,
        offsets,
        _domain=PLUGIN_DOMAIN,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )


def _dynamic_roi_align_replacement(
    op, input, rois, offsets, spatial_scale, sampling_ratio, aligned
):
    return dynamic_roi_align_from_grid_sample(
        op,
        input,
        rois,
        offsets,
        spatial_scale.value,
        sampling_ratio.value,
        bool(aligned.value),
    )


def _deform_conv_pattern(op, input, offset, weight, bias, mask, strides, pads, dilations, groups,
                         offset_groups):  # fmt: skip
    return op.DeformConv2d(
        input,
        offset,
        weight,
        bias,
        mask,
        _domain=PLUGIN_DOMAIN,
        strides=strides,
        pads=pads,
        dilations=dilations,
        groups=groups,
        offset_groups=offset_groups,
    )


PORTABLE_RULES = [
    pattern.RewriteRule(_dynamic_roi_align_pattern, _dynamic_roi_align_replacement),
    pattern.RewriteRule(_deform_conv_pattern, deform_conv2d_from_plugin),
]


def _check_portable(model: ir.Model) -> None:
    """Refuse what the portable graph cannot express, with the reason and the fix."""
    for node in model.graph.all_nodes():
        adaptive = (
            node.op_type == "DynamicRoIAlign" and node.attributes["sampling_ratio"].value <= 0
        )
        if node.domain == PLUGIN_DOMAIN and adaptive:
            raise ExportError(
                "dynamic_roi_align with adaptive sampling (sampling_ratio <= 0) has a "
                "data-dependent number of samples per bin and no GridSample form; set the "
                "model's sampling_ratio > 0 (LEAPS: reid.sampling_ratio, 2 in the paper)"
            )


def portable_graph(plugin_model: ir.Model) -> ir.Model:
    """A copy of the plugin graph with every plugin node expanded into standard ops."""
    _check_portable(plugin_model)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(plugin_model))
    model = onnxscript.rewriter.rewrite(model, PORTABLE_RULES)
    model.opset_imports.pop(PLUGIN_DOMAIN, None)
    onnxscript.optimizer.optimize(model)
    return model


# --------------------------------------------------------------------------------------------
# Export


def translation_table() -> dict[Any, Callable[..., Any]]:
    """Our custom ops -> onnxscript functions for ``torch.onnx.export`` (the plugin graph)."""
    ops = torch.ops.psearch
    return {
        ops.roi_align.default: roi_align_to_onnx,
        ops.nms.default: nms_to_onnx,
        ops.batched_nms.default: batched_nms_to_onnx,
        ops.dynamic_roi_align.default: dynamic_roi_align_to_plugin,
        ops.deform_conv2d.default: deform_conv2d_to_plugin,
    }


class DetectGraph(nn.Module):
    """``images (B, 3, H, W), image_sizes (B, 2) -> (boxes, scores, embeddings)``: the model's
    Detections as a tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        detections = self.model(images, image_sizes=image_sizes)
        return detections.boxes, detections.scores, detections.embeddings


class EmbedGraph(nn.Module):
    """``images (1, 3, H, W), boxes (R, 4), image_sizes (1, 2) -> embeddings (R, D)``:
    ``model.embed_boxes``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, boxes: Tensor, image_sizes: Tensor) -> Tensor:
        return self.model.embed_boxes(images, [boxes], image_sizes=image_sizes)


def has_embed_graph(model: nn.Module) -> bool:
    """RoI models embed given boxes (``embed_boxes``); the others embed detections."""
    return callable(getattr(model, "embed_boxes", None))


def _example_images(model: nn.Module, batch: int) -> tuple[Tensor, Tensor]:
    """A small example batch whose sizes equal no other dimension of the model, so that
    torch.export keeps them symbolic, and its float32 ``image_sizes``: the first image fills
    the batch, the others are smaller (padded)."""
    divisor = model.preprocess.size_divisor
    generator = torch.Generator().manual_seed(0)
    height, width = 9 * divisor, 11 * divisor
    images = torch.randn(batch, 3, height, width, generator=generator)
    sizes = torch.tensor([[height - 7.0 * i, width - 5.0 * i] for i in range(batch)])
    return images, sizes


def _capture(
    module: nn.Module, args: tuple[Tensor, ...], dynamic_shapes: dict[str, dict[int, Any]]
) -> torch.export.ExportedProgram:
    """``torch.export``, raising a dimension's lower bound where the model needs it (e.g.
    FCOS's P7 must have more than one row: inputs of at least 129 pixels)."""
    with torch.no_grad():
        try:
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        except torch._dynamo.exc.UserError as error:  # a dimension's range is too wide
            if "Suggested fixes" not in error.msg:
                message = f"torch.export cannot keep the shapes dynamic: {error.msg}"
                raise ExportError(message) from error
            refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(
                error.msg, dynamic_shapes
            )
            return torch.export.export(module, args, dynamic_shapes=refined, strict=False)


def _image_dim(name: str) -> torch.export.Dim:
    """A dynamic image side. Its map at the backbone's coarsest stride (32) has more than one
    row or column, which the models' broadcasting assumes."""
    return torch.export.Dim(name, min=COARSEST_STRIDE + 1)


def _to_onnx(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(portable, plugin) ONNX models of an exported program."""
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        opset_version=OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        custom_translation_table=translation_table(),
        optimize=True,
        verify=False,
        report=False,
    )
    plugin_model = onnx_program.model
    portable_model = portable_graph(plugin_model)
    protos = []
    for model in (portable_model, plugin_model):
        proto = ir.serde.serialize_model(model)
        proto.ir_version = min(proto.ir_version, IR_VERSION)
        protos.append(proto)
    return protos[0], protos[1]


def input_minimums(program: torch.export.ExportedProgram) -> dict[str, int]:
    """The smallest value of every dynamic input dimension the program was exported for."""
    minimums = {}
    for node in program.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, Tensor):
            continue
        for axis, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                lower = program.range_constraints[size.node.expr].lower
                minimums[f"{node.name}.{axis}"] = int(lower)
    return minimums


class ExportedGraphs(NamedTuple):
    """The two forms of one exported graph, and the smallest size of every dynamic input
    dimension it was exported for (``"images.2"``: the height of ``images``)."""

    portable: onnx.ModelProto
    plugins: onnx.ModelProto
    minimums: dict[str, int]


def export_graphs(
    module: nn.Module,
    args: tuple[Tensor, ...],
    dynamic_shapes: dict[str, dict[int, Any]],
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> ExportedGraphs:
    """Export ``module(*args)`` once (torch.export + the dynamo exporter with our translation
    table) into the plugin graph, and rewrite that into the portable graph."""
    program = _capture(module.eval(), args, dynamic_shapes)
    portable, plugins = _to_onnx(program, input_names, output_names)
    return ExportedGraphs(portable, plugins, input_minimums(program))


def export_detect_graphs(model: nn.Module) -> ExportedGraphs:
    """The inference graph ``images (B, 3, H, W), image_sizes (B, 2) -> boxes, scores,
    embeddings`` with a dynamic batch, height and width."""
    batch, height, width = torch.export.Dim("batch"), _image_dim("height"), _image_dim("width")
    return export_graphs(
        DetectGraph(model),
        _example_images(model, batch=2),
        {"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}},
        INPUT_NAMES,
        OUTPUT_NAMES,
    )


def export_embed_graphs(model: nn.Module) -> ExportedGraphs:
    """The query graph ``images (1, 3, H, W), boxes (R, 4), image_sizes (1, 2) -> embeddings
    (R, D)`` of a model with ``embed_boxes``; height, width and R are dynamic."""
    height, width, count = _image_dim("height"), _image_dim("width"), torch.export.Dim("count")
    boxes = torch.tensor([[10.0, 20.0, 60.0, 140.0], [100.0, 30.0, 180.0, 150.0]])
    images, image_sizes = _example_images(model, batch=1)
    return export_graphs(
        EmbedGraph(model),
        (images, boxes, image_sizes),
        {"images": {2: height, 3: width}, "boxes": {0: count}, "image_sizes": None},
        EMBED_INPUT_NAMES,
        EMBED_OUTPUT_NAMES,
    )


def min_input_side(graphs: ExportedGraphs, input_name: str = "images") -> int:
    """The smallest height or width of ``input_name`` (N, C, H, W) the graphs accept."""
    return max(graphs.minimums.get(f"{input_name}.{axis}", 1) for axis in (2, 3))


# --------------------------------------------------------------------------------------------
# Checks and files


def _all_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = list(proto.graph.node)
    for function in proto.functions:
        nodes.extend(function.node)
    return nodes


def forbidden_grid_samples(proto: onnx.ModelProto) -> list[str]:
    """Names of GridSample nodes with an opset-20 mode name (``linear`` / ``cubic``)."""
    found = []
    for node in _all_nodes(proto):
        if node.op_type != "GridSample":
            continue
        for attribute in node.attribute:
            if attribute.name == "mode" and attribute.s.decode() in FORBIDDEN_GRID_SAMPLE_MODES:
                found.append(node.name)
    return found


def custom_ops(proto: onnx.ModelProto) -> set[str]:
    """``domain::op_type`` of every node outside the standard ONNX domain."""
    return {
        f"{n.domain}::{n.op_type}" for n in _all_nodes(proto) if n.domain not in ("", "ai.onnx")
    }


def check_graph(proto: onnx.ModelProto, plugins: bool) -> None:
    """What every exported graph passes: ONNX's full check with shape inference, opset 19, no
    opset-20 GridSample mode, and custom-domain nodes only in the plugin graph (only ours)."""
    onnx.checker.check_model(proto, full_check=True)
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise ExportError(f"expected opset {OPSET}, the graph imports {opsets}")
    bad_modes = forbidden_grid_samples(proto)
    if bad_modes:
        raise ExportError(f"GridSample nodes {bad_modes} use an opset-20 mode name")
    allowed = {f"{PLUGIN_DOMAIN}::{name}" for name in PLUGIN_OPS} if plugins else set()
    unexpected = custom_ops(proto) - allowed
    if unexpected:
        raise ExportError(f"unexpected custom-domain ops {sorted(unexpected)} in the graph")


def save_graph(proto: onnx.ModelProto, path: Path, plugins: bool) -> None:
    """Check and write a graph (weights inline: our models are far below the 2 GB limit)."""
    check_graph(proto, plugins)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))


def write_onnx_graphs(model: nn.Module, directory: Path) -> dict[str, Any]:
    """Export, check and write every graph of a model into ``directory``.

    Returns the ``onnx`` section of the manifest (``export.artifact.GraphFiles``).
    """
    from export.artifact import (
        EMBED_ONNX_FILE,
        EMBED_PLUGIN_ONNX_FILE,
        ONNX_FILE,
        PLUGIN_ONNX_FILE,
    )

    detect = export_detect_graphs(model)
    save_graph(detect.portable, directory / ONNX_FILE, plugins=False)
    save_graph(detect.plugins, directory / PLUGIN_ONNX_FILE, plugins=True)
    files: dict[str, Any] = {
        "opset": OPSET,
        "min_input_side": min_input_side(detect),
        "detect": ONNX_FILE,
        "detect_plugins": PLUGIN_ONNX_FILE,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
    }
    if has_embed_graph(model):
        embed = export_embed_graphs(model)
        save_graph(embed.portable, directory / EMBED_ONNX_FILE, plugins=False)
        save_graph(embed.plugins, directory / EMBED_PLUGIN_ONNX_FILE, plugins=True)
        files.update(
            embed=EMBED_ONNX_FILE,
            embed_plugins=EMBED_PLUGIN_ONNX_FILE,
            embed_inputs=list(EMBED_INPUT_NAMES),
            embed_outputs=list(EMBED_OUTPUT_NAMES),
        )
    return files
