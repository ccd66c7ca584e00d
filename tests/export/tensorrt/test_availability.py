"""Without a supported TensorRT (or torch2trt) the entry points fail with an error that says what
to install; the torch2trt converters' registration, call routing and plugin attributes, with
torch2trt and TensorRT faked (tests/export/tensorrt/fake_tensorrt.py says how the fakes follow
the real libraries).

Every test here hides or fakes the packages through ``sys.modules``, so they run the same
whether or not TensorRT is installed.
"""

import importlib
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

import export.tensorrt
from export.tensorrt import TensorRTUnavailableError, plugins
from export.tensorrt.plugins import UnsupportedDriverError
from models.ops.deform_conv import deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.roi_align import roi_align, roi_align_op
from tests.export.tensorrt.fake_tensorrt import (
    ITensor,
    fake_tensorrt,
    fake_torch2trt,
    shape_wrapping,
)

roi_align_module = sys.modules["models.ops.roi_align"]  # models.ops.roi_align is the function

CONVERTERS = "export.tensorrt.converters"


@pytest.fixture
def import_converters(monkeypatch):
    """Imports export.tensorrt.converters afresh; puts back whatever was there before."""
    previous = sys.modules.pop(CONVERTERS, None)
    previous_attribute = export.tensorrt.__dict__.pop("converters", None)

    def load() -> ModuleType:
        sys.modules.pop(CONVERTERS, None)
        return importlib.import_module(CONVERTERS)

    yield load
    sys.modules.pop(CONVERTERS, None)
    export.tensorrt.__dict__.pop("converters", None)
    if previous is not None:
        sys.modules[CONVERTERS] = previous
        export.tensorrt.converters = previous_attribute


def test_the_tensorrt_entry_points_say_what_to_install_when_tensorrt_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError) as raised:
        from export.tensorrt import build_engine  # noqa: F401
    message = str(raised.value)
    assert "TensorRT is not installed" in message
    assert "tensorrt-cu12" in message and "pypi.nvidia.com" in message
    assert isinstance(raised.value, ImportError)


def test_a_tensorrt_older_than_10_9_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.8.0.43"))
    with pytest.raises(TensorRTUnavailableError, match=r"TensorRT 10\.8\.0\.43 is too old"):
        export.tensorrt.load_engine  # noqa: B018


@pytest.mark.parametrize("version", ["12.0.0.1", "13.1.0.2"])
def test_a_tensorrt_newer_than_the_supported_range_is_refused(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    with pytest.raises(TensorRTUnavailableError, match=f"TensorRT {version} is newer than"):
        export.tensorrt.load_engine  # noqa: B018


@pytest.mark.parametrize("version", ["10.9.0.34", "10.16.1.11", "11.0.0.114", "11.4.0.106"])
def test_every_release_of_the_supported_range_is_accepted(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    assert export.tensorrt.require_tensorrt().__version__ == version
    assert export.tensorrt.TENSORRT_REQUIREMENT == ">=10.9,<12"


def test_registering_the_plugins_needs_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(plugins, "_registered", False)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        plugins.register_plugins()


def test_an_unknown_name_is_an_attribute_error_not_an_install_hint():
    with pytest.raises(AttributeError, match="no attribute 'build_engines'"):
        export.tensorrt.build_engines  # noqa: B018


def test_the_converters_say_torch2trt_is_not_on_pypi_when_it_is_missing(
    monkeypatch, import_converters
):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "torch2trt", None)
    with pytest.raises(ImportError, match=r"torch2trt is not installed\. It is not on PyPI"):
        import_converters()


def test_the_converters_blame_tensorrt_first_when_both_are_missing(monkeypatch, import_converters):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "torch2trt", None)
    with pytest.raises(TensorRTUnavailableError):
        import_converters()


def use_fake_tensorrt(monkeypatch, version: str = "10.9.0.34") -> ModuleType:
    """A fake TensorRT (and its plugin package) in sys.modules, the plugins not yet registered."""
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trt.plugin)
    monkeypatch.setattr(plugins, "_registered", False)
    return trt


@pytest.fixture
def converters(monkeypatch, import_converters) -> ModuleType:
    """export.tensorrt.converters imported over fakes of TensorRT and torch2trt, on a machine
    whose driver supports CUDA 12.8."""
    use_fake_tensorrt(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch2trt", fake_torch2trt())
    monkeypatch.setattr(plugins, "driver_cuda_version", lambda: (12, 8))
    return import_converters()


def test_one_converter_is_registered_per_op_overload(converters):
    assert set(sys.modules["torch2trt"].converters) == {
        "torch.ops.psearch.roi_align.default",
        "torch.ops.psearch.dynamic_roi_align.default",
        "torch.ops.psearch.deform_conv2d.default",
    }


def op_calls() -> dict[str, torch.Tensor]:
    """One call of each op through the models' entry points, on tiny inputs."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 2, 6, 6, generator=generator)
    rois = torch.tensor([[0.0, 0.5, 1.0, 4.0, 5.0]])
    offsets = torch.randn(1, 2, 2, 2, generator=generator) * 0.1
    weight = torch.randn(3, 2, 3, 3, generator=generator)
    offset = torch.randn(1, 18, 4, 4, generator=generator)
    return {
        "roi_align": roi_align(features, rois, 2),
        "dynamic_roi_align": dynamic_roi_align(features, rois, offsets, 2),
        "deform_conv2d": deform_conv2d(features, offset, weight),
    }


def test_while_converting_the_models_op_calls_go_through_the_overload_attributes(
    converters, monkeypatch
):
    """torch2trt intercepts ``torch.ops.psearch.<op>.default`` by replacing that attribute: the
    models' calls must look it up, and get the same results."""
    seen = []
    for name in ("roi_align", "dynamic_roi_align", "deform_conv2d"):
        packet = getattr(torch.ops.psearch, name)

        def spy(*args, _name=name, _overload=packet.default, **kwargs):
            seen.append(_name)
            return _overload(*args, **kwargs)

        monkeypatch.setattr(packet, "default", spy)

    direct = op_calls()
    assert seen == []
    with converters.calls_through_op_overloads():
        routed = op_calls()
    assert seen == ["roi_align", "dynamic_roi_align", "deform_conv2d"]
    for name, output in direct.items():
        torch.testing.assert_close(routed[name], output, rtol=0, atol=0)


def test_the_routing_is_undone_even_when_the_conversion_fails(converters):
    packet_op = torch.ops.psearch.deform_conv2d._op
    with (
        pytest.raises(RuntimeError, match="conversion failed"),
        converters.calls_through_op_overloads(),
    ):
        assert roi_align_module.roi_align_op is not roi_align_op
        raise RuntimeError("conversion failed")
    assert roi_align_module.roi_align_op is roi_align_op
    assert torch.ops.psearch.deform_conv2d._op is packet_op


def test_convert_with_torch2trt_registers_the_plugins_and_converts_with_routing(
    converters, monkeypatch
):
    registered = []
    monkeypatch.setattr(converters, "register_plugins", lambda: registered.append(True))
    fake = sys.modules["torch2trt"]
    fake.on_convert = lambda model, inputs, **kwargs: (
        model,
        inputs,
        kwargs,
        roi_align_module.roi_align_op is not roi_align_op,
    )
    model = torch.nn.Identity()
    inputs = (torch.zeros(1),)
    assert converters.convert_with_torch2trt(model, inputs, fp16_mode=True) == (
        model,
        list(inputs),
        {"fp16_mode": True},
        True,
    )
    assert registered == [True]


def test_on_tensorrt_11_torch2trt_is_refused_with_the_onnx_route_named(
    monkeypatch, import_converters
):
    """torch2trt creates its networks with EXPLICIT_BATCH, which TensorRT 11 removed: without
    the check its conversion would stop on an AttributeError deep inside torch2trt."""
    trt = use_fake_tensorrt(monkeypatch, "11.1.0.106")
    fake = fake_torch2trt()
    fake.on_convert = lambda model, inputs, **kwargs: (
        trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    )
    monkeypatch.setitem(sys.modules, "torch2trt", fake)
    monkeypatch.setattr(plugins, "driver_cuda_version", lambda: (12, 8))
    converters = import_converters()
    with pytest.raises(converters.Torch2trtUnsupportedError, match="EXPLICIT_BATCH") as raised:
        converters.convert_with_torch2trt(torch.nn.Identity(), [torch.zeros(1)])
    assert "psearch-export --format tensorrt" in str(raised.value)


def test_torch2trt_conversion_refuses_a_driver_too_old_for_the_plugins(converters, monkeypatch):
    monkeypatch.setattr(plugins, "driver_cuda_version", lambda: (12, 4))
    sys.modules["torch2trt"].on_convert = lambda *args, **kwargs: pytest.fail("converted")
    with pytest.raises(UnsupportedDriverError, match=r"CUDA 12\.8 or newer \(R570"):
        converters.convert_with_torch2trt(torch.nn.Identity(), [torch.zeros(1)])


def network_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as torch2trt leaves a traced tensor: with the network tensor in ``_trt``."""
    tensor._trt = ITensor(name)
    return tensor


def conversion_context(args: tuple) -> SimpleNamespace:
    network = sys.modules["tensorrt"].Builder(None).create_network()
    return SimpleNamespace(
        method_args=args,
        method_kwargs={},
        method_return=torch.zeros(1),
        network=network,
    )


def test_the_converters_give_the_plugins_plain_int_attributes_while_shapes_are_wrapped(
    converters,
):
    """In torch2trt's conversion, shapes of traced tensors are IntWrapper values; TensorRT's
    plugin package refuses an attribute that is not exactly ``int``."""
    plugins.register_plugins()
    features = network_tensor(torch.zeros(1, 4, 6, 6), "features")
    offset = network_tensor(torch.zeros(1, 2 * 2 * 9, 6, 6), "offset")
    mask = network_tensor(torch.zeros(1, 2 * 9, 6, 6), "mask")
    weight = torch.zeros(6, 2, 3, 3)  # a parameter: a constant once converted
    rois = network_tensor(torch.tensor([[0, 1.0, 1.0, 4.0, 5.0]]), "rois")
    offsets = network_tensor(torch.zeros(1, 2, 2, 2), "offsets")
    deform = conversion_context((features, offset, weight, None, [1, 1], [1, 1], [1, 1], mask))
    roi = conversion_context((features, rois, 0.5, 2, 2, 2, True))
    dynamic = conversion_context((features, rois, offsets, 0.5, 2, True))
    with shape_wrapping():
        assert type(offset.shape[1]) is not int  # the wrapping is on
        converters.convert_deform_conv2d(deform)
        converters.convert_roi_align(roi)
        converters.convert_dynamic_roi_align(dynamic)

    im2col, gemm = deform.network.plugins
    assert im2col.plugin_id == "psearch::DeformIm2col" and gemm.plugin_id == "psearch::DeformGemm"
    assert im2col.attrs["offset_groups"] == 2 and gemm.attrs["groups"] == 2
    assert im2col.attrs["kernel_shape"].tolist() == [3, 3]
    assert im2col.attrs["kernel_shape"].dtype == np.int32
    for plugin in (im2col, gemm, *roi.network.plugins, *dynamic.network.plugins):
        for name, value in plugin.attrs.items():
            assert type(value) in (int, float, np.ndarray), (plugin.plugin_id, name, type(value))
    # roi_align becomes DynamicRoIAlign with zero offsets (a (K, oh, ow, 2) constant).
    (plugin,) = roi.network.plugins
    assert plugin.plugin_id == "psearch::DynamicRoIAlign"
    assert roi.network.constants[-1][0] == (1, 2, 2, 2)
