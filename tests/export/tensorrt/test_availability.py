"""Without TensorRT (or torch2trt) the entry points fail with an error that says what to install;
the torch2trt converters' registration and call routing, with torch2trt and TensorRT faked.

Every test here hides or fakes the packages through ``sys.modules``, so they run the same
whether or not TensorRT is installed.
"""

import importlib
import importlib.machinery
import sys
from types import ModuleType

import pytest
import torch

import export.tensorrt
from export.tensorrt import TensorRTUnavailableError, plugins
from models.ops.deform_conv import deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.roi_align import roi_align, roi_align_op

roi_align_module = sys.modules["models.ops.roi_align"]  # models.ops.roi_align is the function

CONVERTERS = "export.tensorrt.converters"


def fake_module(name: str) -> ModuleType:
    module = ModuleType(name)
    # A spec, as imported modules have: PyTorch probes some packages with find_spec.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def fake_tensorrt(version: str = "10.9.0.34") -> ModuleType:
    module = fake_module("tensorrt")
    module.__version__ = version
    return module


def fake_torch2trt() -> ModuleType:
    """Registers converters in ``converters``; ``torch2trt(...)`` calls ``on_convert``."""
    module = fake_module("torch2trt")
    module.converters = {}

    def tensorrt_converter(key):
        def register(function):
            module.converters[key] = function
            return function

        return register

    module.tensorrt_converter = tensorrt_converter
    module.torch2trt = lambda model, inputs, **kwargs: module.on_convert(model, inputs, **kwargs)
    return module


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


@pytest.fixture
def converters(monkeypatch, import_converters) -> ModuleType:
    """export.tensorrt.converters imported over fakes of TensorRT and torch2trt."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "torch2trt", fake_torch2trt())
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
