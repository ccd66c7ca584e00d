"""The plugin graph as TensorRT parses it (``prepare_plugin_graph``), on hand-built ONNX graphs
shaped like the ones export.onnx writes."""

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.tensorrt.builder import (
    DEFORM_CONV2D_ATTRIBUTES,
    DEFORM_CONV2D_INPUTS,
    prepare_plugin_graph,
)
from export.tensorrt.plugins import PLUGIN_ATTRIBUTES

FLOAT = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "plugins",
        [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid("psearch", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def with_attributes(node: onnx.NodeProto, attributes: list[tuple[str, object]]) -> onnx.NodeProto:
    """``node`` with attributes in exactly this order (make_node would sort them)."""
    node.attribute.extend(helper.make_attribute(name, value) for name, value in attributes)
    return node


def deform_conv(inputs, output="y", *, groups=1, offset_groups=1) -> onnx.NodeProto:
    node = helper.make_node("DeformConv2d", inputs, [output], name="dcn", domain="psearch")
    # The order export.onnx's exporter happens to write.
    return with_attributes(
        node,
        [
            ("offset_groups", offset_groups),
            ("groups", groups),
            ("dilations", [2, 1]),
            ("pads", [2, 1]),
            ("strides", [1, 2]),
        ],
    )


def initializer(name: str, dims: list[int], values: list[float] | None = None):
    count = 1
    for dim in dims:
        count *= dim
    return helper.make_tensor(name, FLOAT, dims, values or [0.5] * count)


def fill(name: str, shape_name: str, value: float | None) -> onnx.NodeProto:
    """ConstantOfShape(shape_name) filled with ``value`` (None: ONNX's default, zero)."""
    attributes = {}
    if value is not None:
        attributes["value"] = helper.make_tensor("value", FLOAT, [1], [value])
    return helper.make_node(
        "ConstantOfShape", [shape_name], [name], name=f"fill_{name}", **attributes
    )


def attributes_of(node: onnx.NodeProto) -> list[tuple[str, object]]:
    return [(a.name, helper.get_attribute_value(a)) for a in node.attribute]


def plugin_fields(node: onnx.NodeProto) -> list[tuple[str, object]]:
    """The attributes the plugin receives: all but the namespace, which the parser reads."""
    return [(name, value) for name, value in attributes_of(node) if name != "plugin_namespace"]


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == "psearch"]


def test_a_modulated_deformable_convolution_becomes_im2col_feeding_a_gemm():
    model = make_model(
        [deform_conv(["x", "offset", "w", "b", "mask"], groups=2, offset_groups=2)],
        [("x", [1, 4, 8, 8]), ("offset", [1, 36, 8, 4]), ("mask", [1, 18, 8, 4])],
        ["y"],
        [initializer("w", [6, 2, 3, 3]), initializer("b", [6])],
    )
    im2col, gemm = prepare_plugin_graph(model).graph.node
    assert (im2col.domain, im2col.op_type, list(im2col.input)) == (
        "psearch",
        "DeformIm2col",
        ["x", "offset", "mask"],
    )
    assert plugin_fields(im2col) == [
        ("kernel_shape", [3, 3]),  # from the weight's (Cout, Cin / g, kh, kw)
        ("strides", [1, 2]),
        ("pads", [2, 1]),
        ("dilations", [2, 1]),
        ("offset_groups", 2),
        ("has_mask", 1),
    ]
    assert (gemm.domain, gemm.op_type) == ("psearch", "DeformGemm")
    assert list(gemm.input) == ["w", im2col.output[0], "b"]
    assert list(gemm.output) == ["y"]
    assert plugin_fields(gemm) == [("groups", 2), ("has_bias", 1)]


def test_the_exporter_s_ones_mask_and_zeros_bias_are_skipped_and_their_fills_dropped():
    """export.onnx fills a DCNv1 mask with ones and a missing bias with zeros
    (ConstantOfShape); the kernels skip both instead of reading them."""
    model = make_model(
        [
            fill("bias", "bias_shape", None),
            fill("ones", "mask_shape", 1.0),
            deform_conv(["x", "offset", "w", "bias", "ones"]),
        ],
        [("x", [1, 2, 8, 8]), ("offset", [1, 18, 8, 4])],
        ["y"],
        [
            initializer("w", [3, 2, 3, 3]),
            helper.make_tensor("bias_shape", TensorProto.INT64, [1], [3]),
            helper.make_tensor("mask_shape", TensorProto.INT64, [4], [1, 9, 8, 4]),
        ],
    )
    rewritten = prepare_plugin_graph(model)
    assert [node.op_type for node in rewritten.graph.node] == ["DeformIm2col", "DeformGemm"]
    im2col, gemm = rewritten.graph.node
    # The unread inputs get any tensor of the data dtype: the offset, the weight.
    assert list(im2col.input) == ["x", "offset", "offset"]
    assert dict(attributes_of(im2col))["has_mask"] == 0
    assert list(gemm.input) == ["w", im2col.output[0], "w"]
    assert dict(attributes_of(gemm))["has_bias"] == 0


def test_a_constant_mask_of_another_value_is_read_and_a_shared_fill_is_kept():
    model = make_model(
        [
            fill("halves", "mask_shape", 0.5),
            fill("ones", "mask_shape", 1.0),
            deform_conv(["x", "offset", "w", "b", "halves"], output="y"),
            deform_conv(["y", "offset", "w", "b", "ones"], output="z"),
            helper.make_node("Identity", ["ones"], ["ones_out"]),
        ],
        [("x", [1, 2, 8, 8]), ("offset", [1, 18, 8, 8])],
        ["z", "ones_out"],
        [
            initializer("w", [2, 2, 3, 3]),
            initializer("b", [2]),
            helper.make_tensor("mask_shape", TensorProto.INT64, [4], [1, 9, 8, 8]),
        ],
    )
    nodes = prepare_plugin_graph(model).graph.node
    assert [node.op_type for node in nodes if node.op_type == "ConstantOfShape"] == [
        "ConstantOfShape",
        "ConstantOfShape",
    ]
    first_im2col, second_im2col = (node for node in nodes if node.op_type == "DeformIm2col")
    assert list(first_im2col.input) == ["x", "offset", "halves"]
    assert dict(attributes_of(first_im2col))["has_mask"] == 1
    assert dict(attributes_of(second_im2col))["has_mask"] == 0


def test_dynamic_roi_align_attributes_are_put_in_the_plugin_s_order():
    node = with_attributes(
        helper.make_node(
            "DynamicRoIAlign", ["x", "rois", "offsets"], ["y"], name="roi", domain="psearch"
        ),
        [("aligned", 1), ("sampling_ratio", 2), ("spatial_scale", 0.125)],
    )
    model = make_model(
        [node], [("x", [1, 4, 8, 8]), ("rois", [3, 5]), ("offsets", [3, 2, 2, 2])], ["y"]
    )
    (rewritten,) = plugin_nodes(prepare_plugin_graph(model))
    assert plugin_fields(rewritten) == [
        ("spatial_scale", 0.125),
        ("sampling_ratio", 2),
        ("aligned", 1),
    ]
    assert list(rewritten.input) == ["x", "rois", "offsets"]
    assert attributes_of(node)[0] == ("aligned", 1)  # the input model is left as it was


def test_the_kernel_size_is_inferred_through_nodes_between_the_weight_and_the_convolution():
    model = make_model(
        [
            helper.make_node("Cast", ["w16"], ["w"], to=FLOAT),
            deform_conv(["x", "offset", "w", "b", "mask"]),
        ],
        [("x", [1, 2, 8, 8]), ("offset", [1, 30, 8, 4]), ("mask", [1, 15, 8, 4])],
        ["y"],
        [
            numpy_helper.from_array(
                numpy_helper.to_array(initializer("w16", [3, 2, 3, 5])).astype("float16"), "w16"
            ),
            initializer("b", [3]),
        ],
    )
    im2col, _ = plugin_nodes(prepare_plugin_graph(model))
    assert dict(attributes_of(im2col))["kernel_shape"] == [3, 5]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            helper.make_node("NonMaxSuppression", ["x"], ["y"], name="nms", domain="psearch"),
            "NonMaxSuppression has no TensorRT plugin",
        ),
        (
            with_attributes(
                helper.make_node("DynamicRoIAlign", ["x", "r", "o"], ["y"], domain="psearch"),
                [("spatial_scale", 0.5), ("aligned", 1)],
            ),
            "takes the attributes",
        ),
        (
            with_attributes(
                helper.make_node(
                    "DeformConv2d", ["x", "o", "x", "b", "m"], ["y"], domain="psearch"
                ),
                [("groups", 1), ("strides", [1, 1]), ("pads", [0, 0]), ("dilations", [1, 1])],
            ),
            "lacks the attributes",
        ),
        (
            # The weight is a graph input of unknown size: the kernel size is unknown.
            deform_conv(["x", "o", "weights_in", "b", "m"]),
            "needs a static 4-D shape",
        ),
    ],
)
def test_graphs_the_plugins_cannot_run_are_refused_with_the_reason(node, message):
    model = make_model([node], [("x", [1, 2, 8, 8]), ("weights_in", ["cout", 2, 3, 3])], ["y"])
    with pytest.raises(ValueError, match=message):
        prepare_plugin_graph(model)


def test_the_rewrite_reads_the_node_contract_export_onnx_declares():
    """export.onnx registers the plugin nodes' schemas: their inputs and attributes must be the
    ones the rewrite reads (a renamed attribute there must fail here, not on a GPU)."""
    import export.onnx  # noqa: F401  (registers the psearch schemas)

    roi_align = onnx.defs.get_schema("DynamicRoIAlign", 1, "psearch")
    assert set(roi_align.attributes) == set(PLUGIN_ATTRIBUTES["DynamicRoIAlign"])
    assert [formal.name for formal in roi_align.inputs] == ["input", "rois", "offsets"]
    deform = onnx.defs.get_schema("DeformConv2d", 1, "psearch")
    assert set(deform.attributes) == set(DEFORM_CONV2D_ATTRIBUTES)
    assert tuple(formal.name for formal in deform.inputs) == DEFORM_CONV2D_INPUTS


def test_every_plugin_node_names_its_namespace_in_an_attribute():
    """TensorRT 10.9 finds a plugin's namespace only in a ``plugin_namespace`` attribute (reading
    the node's domain arrived in 10.10); without it the parser looks in the default namespace,
    where the psearch plugins are not."""
    model = make_model(
        [
            deform_conv(["x", "offset", "w", "b", "mask"], output="y"),
            with_attributes(
                helper.make_node(
                    "DynamicRoIAlign", ["y", "rois", "offsets"], ["z"], domain="psearch"
                ),
                [("spatial_scale", 0.5), ("sampling_ratio", 2), ("aligned", 1)],
            ),
        ],
        [("x", [1, 2, 8, 8]), ("offset", [1, 18, 8, 8]), ("mask", [1, 9, 8, 8])],
        ["z"],
        [initializer("w", [3, 2, 3, 3]), initializer("b", [3])],
    )
    rewritten = plugin_nodes(prepare_plugin_graph(model))
    assert [node.op_type for node in rewritten] == ["DeformIm2col", "DeformGemm", "DynamicRoIAlign"]
    for node in rewritten:
        assert dict(attributes_of(node))["plugin_namespace"] == b"psearch", node.op_type
