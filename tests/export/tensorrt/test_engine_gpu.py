"""TensorRT engines with the psearch plugins, run on a GPU and compared with PyTorch.

Needs a supported TensorRT (>=10.9,<12) and a CUDA GPU; elsewhere every test skips, its reason
saying what it would check. Run on a GPU node, in a pytest process of its own (the kernels'
tests set TRITON_INTERPRET for their process, which rules out compiling the plugins' kernels):

    python -m pytest tests/export/tensorrt -q -rs

Tolerances: FP32 within 1e-4 of the PyTorch reference; FP16 (half-precision inputs and data,
FP32 arithmetic inside the kernels, FP16 results) within 1e-2 relative and absolute.
"""

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.tensorrt import TENSORRT_REQUIREMENT, TensorRTUnavailableError, require_tensorrt
from export.tensorrt.builder import (
    BuildSettings,
    EngineMismatchError,
    InputShapes,
    ensure_engine,
    load_engine,
    read_sidecar,
    sidecar_path,
)
from models.ops.deform_conv import deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.roi_align import roi_align


def _missing() -> str | None:
    try:
        require_tensorrt()
    except TensorRTUnavailableError:
        return f"TensorRT {TENSORRT_REQUIREMENT} is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if os.environ.get("TRITON_INTERPRET"):
        return (
            "TRITON_INTERPRET is set in this process (tests/export/kernels/conftest.py): run "
            "`python -m pytest tests/export/tensorrt` on its own"
        )
    return None


MISSING = _missing()


def needs_gpu(checks: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}; would check {checks}")


TOLERANCES = {"fp32": {"rtol": 1e-4, "atol": 1e-4}, "fp16": {"rtol": 1e-2, "atol": 1e-2}}
ONNX_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
TORCH_TYPES = {"fp32": torch.float32, "fp16": torch.float16}


def plugin_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    """A graph of plugin nodes; ``inputs`` and ``outputs`` are (name, ONNX type, shape)."""
    graph = helper.make_graph(
        nodes,
        "plugins",
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs],
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in outputs],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid("psearch", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def plugin_node(op_type, inputs, outputs, attributes) -> onnx.NodeProto:
    """A psearch node with its attributes in the given order (make_node would sort them)."""
    node = helper.make_node(op_type, inputs, outputs, name=op_type, domain="psearch")
    node.attribute.extend(helper.make_attribute(name, value) for name, value in attributes)
    return node


def fixed(*tensors: torch.Tensor, names) -> dict[str, InputShapes]:
    return {
        name: InputShapes(*[tuple(t.shape)] * 3) for name, t in zip(names, tensors, strict=True)
    }


def build_and_run(tmp_path, model, settings, feeds: dict[str, torch.Tensor]) -> dict:
    onnx.save(model, str(tmp_path / "model.plugins.onnx"))
    engine = load_engine(ensure_engine(tmp_path, fingerprint="test", settings=settings))
    outputs = engine({name: tensor.cuda() for name, tensor in feeds.items()})
    torch.cuda.synchronize()
    return {name: tensor.cpu() for name, tensor in outputs.items()}


def fp16_settings(dtype: str) -> bool:
    """TensorRT 10 needs its FP16 flag to pick FP16 kernels; 11 follows the graph's types."""
    return dtype == "fp16" and hasattr(require_tensorrt().BuilderFlag, "FP16")


def roi_inputs(generator):
    features = torch.randn(2, 70, 12, 16, generator=generator)  # 70: two channel blocks
    rois = torch.tensor(
        [
            [0, 1.0, 2.0, 20.0, 14.0],
            [1, -4.0, -3.0, 9.0, 7.5],  # partly outside the image
            [0, 25.0, 18.0, 31.9, 23.9],  # near the far corner
            [1, 5.0, 5.0, 5.5, 5.2],  # smaller than a bin
            [0, 0.0, 0.0, 31.0, 23.0],
        ]
    )
    offsets = torch.randn(5, 3, 4, 2, generator=generator) * 0.2
    return features, rois, offsets


@needs_gpu("DynamicRoIAlign engines (FP32 and FP16, adaptive and fixed sampling) against PyTorch")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(0, 1), (2, 0)])
def test_a_dynamic_roi_align_engine_matches_pytorch(tmp_path, dtype, sampling_ratio, aligned):
    features, rois, offsets = roi_inputs(torch.Generator().manual_seed(1))
    data = ONNX_TYPES[dtype]
    node = plugin_node(
        "DynamicRoIAlign",
        ["features", "rois", "offsets"],
        ["pooled"],
        # The exporter's attribute order, not the plugin's: the builder must reorder.
        [("aligned", aligned), ("sampling_ratio", sampling_ratio), ("spatial_scale", 0.5)],
    )
    model = plugin_model(
        [node],
        [
            ("features", data, list(features.shape)),
            ("rois", TensorProto.FLOAT, ["rois", 5]),
            ("offsets", data, ["rois", 3, 4, 2]),
        ],
        [("pooled", data, ["rois", 70, 3, 4])],
    )
    settings = BuildSettings(
        {
            **fixed(features, names=["features"]),
            "rois": InputShapes((1, 5), (5, 5), (16, 5)),
            "offsets": InputShapes((1, 3, 4, 2), (5, 3, 4, 2), (16, 3, 4, 2)),
        },
        fp16=fp16_settings(dtype),
    )
    cast = TORCH_TYPES[dtype]
    feeds = {"features": features.to(cast), "rois": rois, "offsets": offsets.to(cast)}
    pooled = build_and_run(tmp_path, model, settings, feeds)["pooled"]
    expected = dynamic_roi_align(
        feeds["features"].float(),
        rois,
        feeds["offsets"].float(),
        (3, 4),
        0.5,
        sampling_ratio,
        bool(aligned),
    )
    assert pooled.dtype == cast
    torch.testing.assert_close(pooled.float(), expected, **TOLERANCES[dtype])


@dataclass(frozen=True)
class DeformCase:
    features: torch.Tensor
    offset: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int


def deform_case(name: str) -> DeformCase:
    """DCNv1 (no mask, no bias) or DCNv2 with groups, offset groups, stride and dilation."""
    generator = torch.Generator().manual_seed(2)
    if name == "v1":
        features = torch.randn(1, 8, 10, 12, generator=generator)
        weight = torch.randn(16, 8, 3, 3, generator=generator) * 0.2
        geometry = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
        groups, offset_groups, bias = 1, 1, None
    else:
        features = torch.randn(2, 8, 11, 9, generator=generator)
        weight = torch.randn(12, 4, 3, 3, generator=generator) * 0.2
        geometry = {"stride": (2, 1), "padding": (2, 1), "dilation": (2, 1)}
        groups, offset_groups = 2, 2
        bias = torch.randn(12, generator=generator)
    stride, padding, dilation = geometry["stride"], geometry["padding"], geometry["dilation"]
    out = [
        (features.shape[2 + axis] + 2 * padding[axis] - dilation[axis] * 2 - 1) // stride[axis] + 1
        for axis in (0, 1)
    ]
    taps = offset_groups * 9
    # Offsets of a few pixels: samples fall between pixels and some outside the image.
    offset = torch.randn(features.shape[0], 2 * taps, *out, generator=generator) * 2
    mask = None
    if name == "v2":
        mask = torch.rand(features.shape[0], taps, *out, generator=generator)
    return DeformCase(
        features, offset, weight, bias, mask, **geometry, groups=groups, offset_groups=offset_groups
    )


def constant_fill(name: str, shape: list[int], value: float, numpy_type) -> tuple:
    """A ConstantOfShape node and its shape initializer, as export.onnx writes fills."""
    shape_tensor = numpy_helper.from_array(np.array(shape), f"{name}_shape")
    fill_value = numpy_helper.from_array(np.full(1, value, numpy_type))
    return helper.make_node(
        "ConstantOfShape", [shape_tensor.name], [name], value=fill_value
    ), shape_tensor


def deform_model(case: DeformCase, dtype: str) -> onnx.ModelProto:
    """The DeformConv2d node as export.onnx writes it (no mask: ones; no bias: zeros)."""
    data = ONNX_TYPES[dtype]
    numpy_type = np.float16 if dtype == "fp16" else np.float32
    inputs = [
        ("features", data, list(case.features.shape)),
        ("offset", data, list(case.offset.shape)),
    ]
    nodes = []
    initializers = [numpy_helper.from_array(case.weight.numpy().astype(numpy_type), "weight")]
    if case.bias is None:
        node, shape = constant_fill("bias", [case.weight.shape[0]], 0.0, numpy_type)
        nodes.append(node)
        initializers.append(shape)
    else:
        initializers.append(numpy_helper.from_array(case.bias.numpy().astype(numpy_type), "bias"))
    mask_shape = [case.offset.shape[0], case.offset.shape[1] // 2, *case.offset.shape[2:]]
    if case.mask is None:
        node, shape = constant_fill("mask", mask_shape, 1.0, numpy_type)
        nodes.append(node)
        initializers.append(shape)
    else:
        inputs.append(("mask", data, mask_shape))
    attributes = [
        ("offset_groups", case.offset_groups),
        ("groups", case.groups),
        ("dilations", list(case.dilation)),
        ("pads", list(case.padding)),
        ("strides", list(case.stride)),
    ]
    inputs_of_node = ["features", "offset", "weight", "bias", "mask"]
    nodes.append(plugin_node("DeformConv2d", inputs_of_node, ["output"], attributes))
    output_shape = [case.offset.shape[0], case.weight.shape[0], *case.offset.shape[2:]]
    return plugin_model(nodes, inputs, [("output", data, output_shape)], initializers)


@needs_gpu(
    "DeformConv2d engines (DCNv1; DCNv2 with groups, offset groups, stride, dilation; FP32 and "
    "FP16) against PyTorch"
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["v1", "v2"])
def test_a_deformable_convolution_engine_matches_pytorch(tmp_path, dtype, name):
    case = deform_case(name)
    cast = TORCH_TYPES[dtype]
    feeds = {"features": case.features.to(cast), "offset": case.offset.to(cast)}
    if case.mask is not None:
        feeds["mask"] = case.mask.to(cast)
    settings = BuildSettings(fixed(*feeds.values(), names=list(feeds)), fp16=fp16_settings(dtype))
    output = build_and_run(tmp_path, deform_model(case, dtype), settings, feeds)["output"]
    # The reference sees the same (rounded) inputs and weights, in FP32.
    expected = deform_conv2d(
        feeds["features"].float(),
        feeds["offset"].float(),
        case.weight.to(cast).float(),
        None if case.bias is None else case.bias.to(cast).float(),
        case.stride,
        case.padding,
        case.dilation,
        None if case.mask is None else feeds["mask"].float(),
    )
    assert output.dtype == cast
    torch.testing.assert_close(output.float(), expected, **TOLERANCES[dtype])


def roi_align_model() -> tuple[onnx.ModelProto, BuildSettings, dict[str, torch.Tensor]]:
    features, rois, offsets = roi_inputs(torch.Generator().manual_seed(3))
    node = plugin_node(
        "DynamicRoIAlign",
        ["features", "rois", "offsets"],
        ["pooled"],
        [("spatial_scale", 0.5), ("sampling_ratio", 2), ("aligned", 1)],
    )
    model = plugin_model(
        [node],
        [
            ("features", TensorProto.FLOAT, list(features.shape)),
            ("rois", TensorProto.FLOAT, ["rois", 5]),
            ("offsets", TensorProto.FLOAT, ["rois", 3, 4, 2]),
        ],
        [("pooled", TensorProto.FLOAT, ["rois", 70, 3, 4])],
    )
    settings = BuildSettings(
        {
            **fixed(features, names=["features"]),
            "rois": InputShapes((1, 5), (5, 5), (8, 5)),
            "offsets": InputShapes((1, 3, 4, 2), (5, 3, 4, 2), (8, 3, 4, 2)),
        }
    )
    return model, settings, {"features": features, "rois": rois, "offsets": offsets}


@needs_gpu(
    "that a real engine is reused, rebuilt on new settings, and refused when its sidecar names "
    "another GPU"
)
def test_real_engines_are_cached_rebuilt_and_refused_as_their_sidecar_says(tmp_path):
    model, settings, _ = roi_align_model()
    onnx.save(model, str(tmp_path / "model.plugins.onnx"))
    engine_path = ensure_engine(tmp_path, fingerprint="m1", settings=settings)
    built = engine_path.stat().st_mtime_ns
    assert list(tmp_path.glob("timing.sm*-trt*.cache"))
    assert ensure_engine(tmp_path, fingerprint="m1", settings=settings) == engine_path
    assert engine_path.stat().st_mtime_ns == built

    wider = BuildSettings(
        {
            **settings.input_shapes,
            "rois": InputShapes((1, 5), (5, 5), (32, 5)),
            "offsets": InputShapes((1, 3, 4, 2), (5, 3, 4, 2), (32, 3, 4, 2)),
        }
    )
    ensure_engine(tmp_path, fingerprint="m1", settings=wider)
    assert engine_path.stat().st_mtime_ns != built

    sidecar = read_sidecar(sidecar_path(engine_path))
    sidecar["gpu"] = {"name": "NVIDIA A100", "arch": "sm80", "compute_capability": [8, 0]}
    sidecar_path(engine_path).write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatchError, match="sm80"):
        load_engine(engine_path)


@needs_gpu("that an engine refuses inputs of the wrong dtype or outside its shape ranges")
def test_an_engine_refuses_wrong_inputs_with_a_clear_error(tmp_path):
    model, settings, feeds = roi_align_model()
    onnx.save(model, str(tmp_path / "model.plugins.onnx"))
    engine = load_engine(ensure_engine(tmp_path, fingerprint="m", settings=settings))
    cuda = {name: tensor.cuda() for name, tensor in feeds.items()}
    with pytest.raises(
        TypeError, match=re.escape("'features' must be a CUDA torch.float32 tensor")
    ):
        engine({**cuda, "features": cuda["features"].half()})
    with pytest.raises(ValueError, match="outside the engine's range"):
        engine(
            {
                **cuda,
                "rois": cuda["rois"].repeat(4, 1),
                "offsets": cuda["offsets"].repeat(4, 1, 1, 1),
            }
        )


class _Heads(torch.nn.Module):
    """Deformable convolution, then RoIAlign and dynamic RoIAlign on its output."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(4)
        self.weight = torch.nn.Parameter(torch.randn(6, 4, 3, 3, generator=generator) * 0.2)

    def forward(self, features, offset, rois, offsets):
        mapped = deform_conv2d(features, offset, self.weight, None, 1, 1, 1, None)
        return (
            mapped,
            roi_align(mapped, rois, (3, 4), 0.5, 2, True),
            dynamic_roi_align(mapped, rois, offsets, (3, 4), 0.5, 2, True),
        )


@needs_gpu("torch2trt conversion of deform_conv2d, roi_align and dynamic_roi_align to the plugins")
def test_torch2trt_converts_the_custom_ops_to_the_plugins():
    pytest.importorskip("torch2trt", reason="torch2trt is not installed (from its repository)")
    from export.tensorrt.converters import convert_with_torch2trt

    generator = torch.Generator().manual_seed(5)
    inputs = [
        torch.randn(1, 4, 12, 16, generator=generator),
        torch.randn(1, 18, 12, 16, generator=generator),
        torch.tensor([[0, 1.0, 2.0, 20.0, 14.0], [0, 3.0, 1.0, 9.0, 7.5]]),
        torch.randn(2, 3, 4, 2, generator=generator) * 0.2,
    ]
    inputs = [tensor.cuda() for tensor in inputs]
    model = _Heads().cuda().eval()
    with torch.no_grad():
        expected = model(*inputs)
        converted = convert_with_torch2trt(model, inputs)
        outputs = converted(*inputs)
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, reference, **TOLERANCES["fp32"])
