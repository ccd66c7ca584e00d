"""ONNX export: every custom op's translation against the op itself, in ONNX Runtime; the
plugin graph's nodes; the checks every exported graph passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from export.onnx import (
    OPSET,
    PLUGIN_DOMAIN,
    ExportError,
    check_graph,
    custom_ops,
    export_embed_graphs,
    export_graphs,
    forbidden_grid_samples,
)
from models.ops.boxes import clip_boxes_to_image
from models.ops.deform_conv import DeformConvPack
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.nms import batched_nms, nms
from models.ops.roi_align import boxes_to_rois, roi_align
from models.preprocess import PreprocessConfig, valid_sizes

FAMILIES = ["alignps", "fcos", "leaps", "seqnet", "psarm"]

Dim = torch.export.Dim


class EveryOp(nn.Module):
    """Each custom op in the settings the models use, and in the others the ops support."""

    def __init__(self) -> None:
        super().__init__()
        # v1 without bias; v2 with groups, offset groups, stride, padding and dilation.
        self.deform_v1 = DeformConvPack(4, 6, 3, padding=1, bias=False)
        self.deform_v2 = DeformConvPack(
            4, 6, 3, stride=2, padding=2, dilation=2, groups=2, offset_groups=2, modulated=True
        )
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # offsets of a few pixels, a mask away from 0.5
            for layer in (self.deform_v1, self.deform_v2):
                weight = layer.conv_offset.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)

    def forward(
        self, features: Tensor, rois: Tensor, offsets: Tensor, boxes: Tensor, scores: Tensor
    ) -> tuple[Tensor, ...]:
        classes = (torch.arange(boxes.shape[0]) % 3).to(torch.int64)
        return (
            roi_align(features, rois, (3, 4), 0.5, 2, aligned=True),
            roi_align(features, rois, (2, 2), 0.5, -1, aligned=False),
            dynamic_roi_align(features, rois, offsets, (3, 4), 0.5, 2, aligned=True),
            dynamic_roi_align(features, rois, offsets, (3, 4), 0.5, 1, aligned=False),
            self.deform_v1(features),
            self.deform_v2(features),
            nms(boxes, scores, 0.5),
            batched_nms(boxes, scores, classes, 0.5),
        )


OUTPUTS = [
    "roi_align",
    "roi_align_unaligned_adaptive",
    "dynamic_roi_align",
    "dynamic_roi_align_unaligned",
    "deform_conv_v1",
    "deform_conv_v2",
    "nms",
    "batched_nms",
]
INPUTS = ["features", "rois", "offsets", "boxes", "scores"]


def op_inputs(seed: int, batch: int, height: int, width: int) -> tuple[Tensor, ...]:
    """Features, RoIs that cross and leave the map (spatial scale 0.5), offsets that push
    samples past the border, and boxes with equal scores, duplicates and an inverted box."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 4, height, width, generator=generator)
    rois = torch.tensor(
        [
            [0, 2.0, 3.0, 20.0, 18.0],  # inside
            [batch - 1, -6.0, -4.0, 10.0, 30.0],  # crosses the top-left corner
            [batch - 1, 2 * width - 6.0, 5.0, 2 * width + 9.0, 2 * height + 3.0],  # bottom right
            [0, 0.0, 0.0, 2.0, 2.0],  # smaller than a bin
        ]
    )
    offsets = (torch.rand(4, 3, 4, 2, generator=generator) - 0.5) * 1.2
    corners = torch.rand(12, 2, generator=generator) * 40
    sizes = torch.rand(12, 2, generator=generator) * 20 + 5
    boxes = torch.cat([corners, corners + sizes], dim=1)
    boxes[5] = boxes[2]  # a duplicate of box 2 ...
    boxes[7] = boxes[7, [2, 3, 0, 1]]  # an inverted box: empty for NMS
    scores = torch.rand(12, generator=generator)
    scores[5] = scores[2]  # ... with the same score: the lower index wins
    scores[9] = scores[4]
    return features, rois, offsets, boxes, scores


@pytest.fixture(scope="module")
def every_op():
    """The module's outputs in PyTorch and in ONNX Runtime (portable graph), on inputs of
    other sizes than the export's, and both graphs."""
    torch.manual_seed(0)
    module = EveryOp().eval()
    count, batch = Dim("count"), Dim("batch")
    height, width = Dim("height", min=3), Dim("width", min=3)  # the stride-2 output is > 1
    graphs = export_graphs(
        module,
        op_inputs(seed=0, batch=2, height=10, width=12),
        {
            "features": {0: batch, 2: height, 3: width},
            "rois": {0: count},
            "offsets": {0: count},
            "boxes": {0: Dim("boxes")},
            "scores": {0: Dim("boxes")},
        },
        INPUTS,
        OUTPUTS,
    )
    inputs = op_inputs(seed=1, batch=3, height=13, width=9)
    session = onnxruntime.InferenceSession(
        graphs.portable.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    exported = session.run(None, {name: t.numpy() for name, t in zip(INPUTS, inputs, strict=True)})
    with torch.no_grad():
        expected = [t.numpy() for t in module(*inputs)]
    return (
        dict(zip(OUTPUTS, expected, strict=True)),
        dict(zip(OUTPUTS, exported, strict=True)),
        graphs,
    )


@pytest.mark.parametrize("output", ["roi_align", "roi_align_unaligned_adaptive"])
def test_roi_align_exports_as_onnx_roi_align_with_the_same_values(every_op, output):
    expected, exported, _ = every_op
    np.testing.assert_allclose(exported[output], expected[output], atol=1e-5)


@pytest.mark.parametrize("output", ["dynamic_roi_align", "dynamic_roi_align_unaligned"])
def test_dynamic_roi_align_grid_sample_form_matches_the_op_across_borders(every_op, output):
    expected, exported, _ = every_op
    assert np.abs(expected[output]).max() > 0.1  # not vacuously zero
    np.testing.assert_allclose(exported[output], expected[output], atol=1e-5)


@pytest.mark.parametrize("output", ["deform_conv_v1", "deform_conv_v2"])
def test_deformable_convolution_exports_as_onnx_deform_conv(every_op, output):
    expected, exported, _ = every_op
    np.testing.assert_allclose(exported[output], expected[output], atol=1e-4)


@pytest.mark.parametrize("output", ["nms", "batched_nms"])
def test_nms_keeps_the_same_boxes_in_the_same_order(every_op, output):
    expected, exported, _ = every_op
    assert 2 in expected[output] and 5 not in expected[output]  # equal scores: lower index
    assert 7 in expected[output]  # the inverted box suppresses nothing and nothing suppresses it
    np.testing.assert_array_equal(exported[output], expected[output])


def test_the_portable_graph_holds_only_standard_ops(every_op):
    _, _, graphs = every_op
    check_graph(graphs.portable, plugins=False)
    assert custom_ops(graphs.portable) == set()
    op_types = {node.op_type for node in graphs.portable.graph.node}
    assert {"RoiAlign", "GridSample", "DeformConv", "NonMaxSuppression"} <= op_types


def test_roi_align_always_states_its_sampling_ratio(every_op):
    """TensorRT's parser assumes 1 when the attribute is missing; ONNX's default is 0."""
    _, _, graphs = every_op
    ratios = sorted(
        helper.get_attribute_value(attribute)
        for node in graphs.portable.graph.node
        if node.op_type == "RoiAlign"
        for attribute in node.attribute
        if attribute.name == "sampling_ratio"
    )
    assert ratios == [0, 2]  # -1 (adaptive) is ONNX's 0


def test_the_plugin_graph_has_one_plugin_node_per_op_with_plain_attributes(every_op):
    """TensorRT's Python plugins take int, float, str and 1-D array attributes only."""
    _, _, graphs = every_op
    check_graph(graphs.plugins, plugins=True)
    plugin_nodes = [n for n in graphs.plugins.graph.node if n.domain == PLUGIN_DOMAIN]
    assert sorted(n.op_type for n in plugin_nodes) == [
        "DeformConv2d",
        "DeformConv2d",
        "DynamicRoIAlign",
        "DynamicRoIAlign",
    ]
    plain = {onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.INTS}
    for node in plugin_nodes:
        assert {attribute.type for attribute in node.attribute} <= plain
    deform = [
        {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        for node in plugin_nodes
        if node.op_type == "DeformConv2d"
    ]
    v1 = {"strides": [1, 1], "pads": [1, 1], "dilations": [1, 1], "groups": 1, "offset_groups": 1}
    v2 = {"strides": [2, 2], "pads": [2, 2], "dilations": [2, 2], "groups": 2, "offset_groups": 2}
    assert sorted(deform, key=str) == sorted([v1, v2], key=str)
    assert all(len(node.input) == 5 for node in plugin_nodes if node.op_type == "DeformConv2d")


def _grid_sample_at(x: float, y: float, padding_mode: str, align_corners: int) -> float:
    """ONNX Runtime's GridSample of a 4 x 4 map of ones at pixel (x, y) (pixel centres at
    integers), with the normalisation that goes with ``align_corners``."""
    size = 4
    if align_corners:
        normalized = [2 * x / (size - 1) - 1, 2 * y / (size - 1) - 1]
    else:
        normalized = [(2 * x + 1) / size - 1, (2 * y + 1) / size - 1]
    node = helper.make_node(
        "GridSample",
        ["x", "grid"],
        ["y"],
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=align_corners,
    )
    graph = helper.make_graph(
        [node],
        "grid_sample",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, size, size]),
            helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 1, 1, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ones = np.ones((1, 1, size, size), np.float32)
    grid = np.asarray(normalized, np.float32).reshape(1, 1, 1, 2)
    return float(session.run(None, {"x": ones, "grid": grid})[0].item())


def test_grid_sample_alone_misreads_roi_align_near_the_border():
    """Why the GridSample form clamps and masks itself (a map of ones, one-sample bins).

    RoI x from -1 to 1 (aligned: -1.5 to 0.5, one bin, one sample at its centre x = -0.5):
    RoIAlign clamps x onto the border pixel and reads 1; GridSample with zero padding blends
    pixel 0 with a zero at x = -1, half each: 0.5. RoI x from -2 to 0 puts the sample at -1.5,
    more than a pixel outside: RoIAlign reads 0; border padding alone would still read 1.
    """
    ones = torch.ones(1, 1, 4, 4)
    near = torch.tensor([[0, -1.0, 1.0, 1.0, 3.0]])
    far = torch.tensor([[0, -2.0, 1.0, 0.0, 3.0]])
    zero_offsets = torch.zeros(1, 1, 1, 2)
    assert dynamic_roi_align(ones, near, zero_offsets, 1, 1.0, 1).item() == 1.0
    assert _grid_sample_at(-0.5, 1.5, "zeros", align_corners=0) == pytest.approx(0.5)
    assert dynamic_roi_align(ones, far, zero_offsets, 1, 1.0, 1).item() == 0.0
    assert _grid_sample_at(-1.5, 1.5, "border", align_corners=1) == pytest.approx(1.0)


def test_grid_sample_with_an_opset_20_mode_name_is_found():
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], name="sampler", mode="linear")
    graph = helper.make_graph([node], "g", [], [])
    assert forbidden_grid_samples(helper.make_model(graph)) == ["sampler"]


class AdaptiveDynamicRoIAlign(nn.Module):
    def forward(self, features: Tensor, rois: Tensor, offsets: Tensor) -> Tensor:
        return dynamic_roi_align(features, rois, offsets, (3, 4), 0.5, sampling_ratio=-1)


def test_adaptive_sampling_dynamic_roi_align_is_refused_with_the_fix():
    features, rois, offsets, _, _ = op_inputs(seed=0, batch=2, height=10, width=12)
    with pytest.raises(ExportError, match="sampling_ratio > 0"):
        export_graphs(
            AdaptiveDynamicRoIAlign(), (features, rois, offsets), {}, INPUTS[:3], ["pooled"]
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_graphs_pass_the_full_onnx_check_at_opset_19(exported, family):
    model_dir = exported(family).model_dir
    for path in sorted(model_dir.glob("*.onnx")):
        proto = onnx.load(str(path))
        plugins = path.name.endswith(".plugins.onnx")
        check_graph(proto, plugins)  # full_check=True, opset, GridSample modes, custom ops
        assert forbidden_grid_samples(proto) == []
        modes = {
            helper.get_attribute_value(a).decode()
            for n in proto.graph.node
            if n.op_type == "GridSample"
            for a in n.attribute
            if a.name == "mode"
        }
        assert modes <= {"bilinear"}
        if not plugins:
            assert custom_ops(proto) == set()


class ToyRoIModel(nn.Module):
    """The shape of a RoI model's query path: boxes clipped to the image, features, (dynamic)
    RoIAlign of the boxes, an embedding from the pooled features."""

    preprocess = PreprocessConfig()

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.offsets = nn.Linear(8 * 2 * 2, 2 * 2 * 2)
        self.embed = nn.Linear(8 * 2 * 2, 5)

    def embed_boxes(
        self, images: Tensor, boxes: list[Tensor], *, image_sizes: Tensor | None = None
    ) -> Tensor:
        sizes = valid_sizes(images, image_sizes)
        clipped = [clip_boxes_to_image(b, size) for b, size in zip(boxes, sizes, strict=True)]
        features = self.features(images)
        rois = boxes_to_rois(clipped)
        pooled = roi_align(features, rois, 2, 1 / 8, 2)
        offsets = self.offsets(pooled.flatten(1)).tanh().view(-1, 2, 2, 2)
        pooled = dynamic_roi_align(features, rois, offsets, 2, 1 / 8, 2)
        return torch.nn.functional.normalize(self.embed(pooled.flatten(1)), dim=1)


def test_the_query_graph_embeds_any_number_of_boxes_like_embed_boxes():
    """An 80 x 120 image padded to 96 x 160: the graph takes its size, which clips the boxes
    that reach into the padding as embed_boxes does."""
    torch.manual_seed(0)
    model = ToyRoIModel().eval()
    graphs = export_embed_graphs(model)
    check_graph(graphs.portable, plugins=False)
    check_graph(graphs.plugins, plugins=True)
    session = onnxruntime.InferenceSession(
        graphs.portable.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    image, image_sizes = torch.randn(1, 3, 96, 160), torch.tensor([[80.0, 120.0]])
    corners = torch.rand(5, 2, 2) * torch.tensor([160.0, 96.0])  # 5 boxes, 2 corners, (x, y)
    several = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    assert (several[:, 2] > 120).any()  # into the padding
    for boxes in (torch.tensor([[4.0, 8.0, 60.0, 90.0]]), several):
        inputs = {"images": image, "boxes": boxes, "image_sizes": image_sizes}
        exported = session.run(None, {name: t.numpy() for name, t in inputs.items()})[0]
        with torch.no_grad():
            expected = model.embed_boxes(image, [boxes], image_sizes=image_sizes).numpy()
        np.testing.assert_allclose(exported, expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_graphs_take_float32_image_sizes_with_the_images_batch(exported, family):
    """Inputs images (B, 3, H, W) and image_sizes (B, 2), both float32 (see export/onnx.py)
    and sharing the dynamic batch dimension."""
    for name in ("model.onnx", "model.plugins.onnx"):
        graph = onnx.load(str(exported(family).model_dir / name)).graph
        inputs = {value.name: value.type.tensor_type for value in graph.input}
        assert list(inputs) == ["images", "image_sizes"]
        assert {tensor.elem_type for tensor in inputs.values()} == {TensorProto.FLOAT}
        images, sizes = (inputs[n].shape.dim for n in inputs)
        assert sizes[0].dim_param and sizes[0].dim_param == images[0].dim_param
        assert sizes[1].dim_value == 2


@pytest.mark.parametrize("family", ["seqnet", "psarm"])
def test_two_stage_graphs_hold_their_nms_and_always_state_the_roi_align_sampling_ratio(
    exported, family
):
    """The RPN's proposal NMS and the two RoI stages' NMS are in the detect graph (three
    NonMaxSuppression nodes, in both forms), and every RoiAlign of every graph, the TensorRT
    one included (its built-in ROIAlign_TRT reads a missing sampling_ratio as 1), states the
    model's sampling ratio and legacy alignment."""
    model_dir = exported(family).model_dir
    for name in ("model.onnx", "model.plugins.onnx", "embed.onnx", "embed.plugins.onnx"):
        nodes = onnx.load(str(model_dir / name)).graph.node
        roi_aligns = [node for node in nodes if node.op_type == "RoiAlign"]
        assert roi_aligns, name
        for node in roi_aligns:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["sampling_ratio"] == 2, name
            assert attributes["coordinate_transformation_mode"] == b"output_half_pixel", name
        if name.startswith("model"):
            assert sum(node.op_type == "NonMaxSuppression" for node in nodes) == 3, name
