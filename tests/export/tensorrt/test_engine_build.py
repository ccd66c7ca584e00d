"""build_engine and load_engine end to end over a fake TensorRT (the GPU and driver faked too):
what a first run on a GPU node depends on before any kernel runs.

The fake parser and runtime follow TensorRT where it matters here
(tests/export/tensorrt/fake_tensorrt.py): ONNX ``RoiAlign`` needs TensorRT's own plugins
initialised, a custom node's plugin is found by its ``plugin_namespace`` attribute (or, from
10.10 on, its domain), and an engine holding TensorRT's own plugins deserialises only once they
are initialised in that process.
"""

import json
import sys
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

from export.tensorrt import builder, plugins
from export.tensorrt.builder import (
    BuildSettings,
    GpuInfo,
    InputShapes,
    build_engine,
    load_engine,
    read_sidecar,
    sidecar_path,
)
from export.tensorrt.plugins import UnsupportedDriverError
from tests.export.tensorrt.fake_tensorrt import fake_tensorrt

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.fixture
def node(monkeypatch):
    """A GPU node: an H100, a CUDA 12.8 driver, and ``node.start(version)`` starting a fresh
    TensorRT process of that version (nothing registered)."""

    def start(version: str = "10.16.1.11"):
        trt = fake_tensorrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "tensorrt.plugin", trt.plugin)
        monkeypatch.setattr(plugins, "_registered", False)
        return trt

    monkeypatch.setattr(builder, "current_gpu", lambda: H100)
    monkeypatch.setattr(builder, "driver_version", lambda: "570.124.06")
    state = SimpleNamespace(start=start, driver=(12, 8))
    monkeypatch.setattr(plugins, "driver_cuda_version", lambda: state.driver)
    return state


def graph_file(tmp_path, nodes, inputs) -> tuple:
    """``model.plugins.onnx`` of ``nodes``; inputs are (name, shape); fixed shapes settings."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 19), helper.make_opsetid("psearch", 1)]
    path = tmp_path / "model.plugins.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    shapes = {name: InputShapes(*[tuple(shape)] * 3) for name, shape in inputs}
    return path, BuildSettings(shapes)


def roi_align_graph(tmp_path) -> tuple:
    """LEAPS's RoIAlign as the portable graph writes it: ONNX RoiAlign (TensorRT's plugin)."""
    node = helper.make_node(
        "RoiAlign",
        ["x", "rois", "index"],
        ["out"],
        coordinate_transformation_mode="half_pixel",
        sampling_ratio=2,
        output_height=7,
        output_width=7,
    )
    return graph_file(tmp_path, [node], [("x", [1, 4, 8, 8]), ("rois", [3, 4]), ("index", [3])])


def dynamic_roi_align_graph(tmp_path) -> tuple:
    node = helper.make_node(
        "DynamicRoIAlign", ["x", "rois", "offsets"], ["out"], name="droi", domain="psearch"
    )
    node.attribute.extend(
        helper.make_attribute(name, value)
        for name, value in (("spatial_scale", 0.5), ("sampling_ratio", 2), ("aligned", 1))
    )
    inputs = [("x", [1, 4, 8, 8]), ("rois", [3, 5]), ("offsets", [3, 2, 2, 2])]
    return graph_file(tmp_path, [node], inputs)


def test_tensorrt_s_own_plugins_are_initialised_before_a_graph_is_parsed(node, tmp_path):
    node.start()
    onnx_path, settings = roi_align_graph(tmp_path)
    engine = build_engine(onnx_path, tmp_path / "e.engine", fingerprint="m", settings=settings)
    assert json.loads(engine.read_bytes())["plugins"] == ["ROIAlign_TRT"]


def test_an_engine_holding_tensorrt_s_own_plugins_deserialises_in_a_fresh_process(node, tmp_path):
    node.start()
    onnx_path, settings = roi_align_graph(tmp_path)
    engine = build_engine(onnx_path, tmp_path / "e.engine", fingerprint="m", settings=settings)
    node.start()  # a new process: the server, after the export
    assert load_engine(engine, fingerprint="m").sidecar["fingerprint"] == "m"


@pytest.mark.parametrize("version", ["10.9.0.34", "10.10.0.31", "11.1.0.106"])
def test_the_psearch_plugins_are_found_on_every_supported_tensorrt(node, tmp_path, version):
    """TensorRT 10.9 reads a plugin's namespace from the plugin_namespace attribute only."""
    node.start(version)
    onnx_path, settings = dynamic_roi_align_graph(tmp_path)
    engine = build_engine(onnx_path, tmp_path / "e.engine", fingerprint="m", settings=settings)
    assert json.loads(engine.read_bytes())["plugins"] == ["DynamicRoIAlign"]
    recorded = read_sidecar(sidecar_path(engine))
    assert recorded["tensorrt_version"] == version
    assert recorded["driver"] == {"version": "570.124.06", "cuda": "12.8"}
    assert recorded["plugins"]["ptx_isa"] == "8.7"


@pytest.mark.parametrize("driver", [(12, 4), (12, 7)])
def test_a_driver_too_old_for_the_plugins_is_refused_before_anything_is_built(
    node, tmp_path, driver
):
    node.start()
    node.driver = driver
    onnx_path, settings = dynamic_roi_align_graph(tmp_path)
    with pytest.raises(UnsupportedDriverError) as raised:
        build_engine(onnx_path, tmp_path / "e.engine", fingerprint="m", settings=settings)
    message = str(raised.value)
    assert f"supports CUDA {driver[0]}.{driver[1]}" in message
    assert "PTX ISA 8.7" in message and "CUDA 12.8 or newer (R570" in message
    assert not (tmp_path / "e.engine").exists()


def test_loading_on_a_driver_too_old_for_the_plugins_is_refused(node, tmp_path):
    node.start()
    onnx_path, settings = dynamic_roi_align_graph(tmp_path)
    engine = build_engine(onnx_path, tmp_path / "e.engine", fingerprint="m", settings=settings)
    node.driver = (12, 2)
    with pytest.raises(UnsupportedDriverError, match=r"supports CUDA 12\.2"):
        load_engine(engine)
