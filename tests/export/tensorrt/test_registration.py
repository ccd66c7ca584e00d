"""register_plugins against TensorRT's rules for plugin definitions, which its plugin package
checks when the decorators run, before any GPU is touched.

TensorRT's own package cannot be imported here (tests/export/tensorrt/fake_tensorrt.py says why),
so the fake applies the same rules: a description with annotated tensors then attributes and a
TensorDesc return, tuning and kernel functions whose parameters follow the description, and a
kernel function annotated to return (str | bytes, str | bytes, KernelLaunchParams, SymIntExprs).
"""

import inspect
import sys
import typing

import pytest

from export.tensorrt import plugins
from export.tensorrt.plugins import DEFORM_GEMM, DEFORM_IM2COL, DYNAMIC_ROI_ALIGN, PLUGIN_ATTRIBUTES
from tests.export.tensorrt.fake_tensorrt import KernelLaunchParams, SymExprs, fake_tensorrt

PLUGINS = (DYNAMIC_ROI_ALIGN, DEFORM_IM2COL, DEFORM_GEMM)


@pytest.fixture
def trt(monkeypatch):
    """A fake TensorRT process with nothing registered yet."""
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trt.plugin)
    monkeypatch.setattr(plugins, "_registered", False)
    return trt


def test_every_plugin_passes_tensorrt_s_definition_rules(trt):
    plugins.register_plugins()
    for name in PLUGINS:
        definition = trt.plugin.definitions[f"psearch::{name}"]
        # The attributes in the order every producer writes them (PLUGIN_ATTRIBUTES).
        assert tuple(definition.input_attrs) == PLUGIN_ATTRIBUTES[name]
        assert definition.autotune_func is not None and definition.aot_impl_func is not None
        assert trt.registry[name, "psearch"]


def test_the_kernel_functions_declare_what_they_return(trt):
    """The annotation TensorRT's validator insists on, as real objects (not strings)."""
    plugins.register_plugins()
    for name in PLUGINS:
        returned = inspect.signature(
            trt.plugin.definitions[f"psearch::{name}"].aot_impl_func
        ).return_annotation
        name_type, ptx_type, launch_type, arguments_type = typing.get_args(returned)
        assert (name_type, ptx_type) == (str, str)
        assert issubclass(launch_type, KernelLaunchParams) and issubclass(arguments_type, SymExprs)


def test_registering_again_changes_nothing(trt):
    plugins.register_plugins()
    before = dict(trt.plugin.definitions)
    plugins.register_plugins()
    assert trt.plugin.definitions == before


def test_a_registration_that_failed_part_way_completes_on_the_next_call(trt, monkeypatch):
    """TensorRT keeps a description once made and refuses a second one: a retry must attach the
    rest to the descriptions already there, not describe them again."""
    real_aot_impl = trt.plugin.aot_impl
    failing = {f"psearch::{DEFORM_IM2COL}"}

    def flaky_aot_impl(plugin_id):
        if plugin_id in failing:
            failing.discard(plugin_id)
            raise RuntimeError("interrupted")
        return real_aot_impl(plugin_id)

    monkeypatch.setattr(trt.plugin, "aot_impl", flaky_aot_impl)
    with pytest.raises(RuntimeError, match="interrupted"):
        plugins.register_plugins()
    assert hasattr(trt.plugin.op.psearch, DEFORM_IM2COL)  # described, without its kernel
    assert trt.plugin.definitions[f"psearch::{DEFORM_IM2COL}"].aot_impl_func is None

    plugins.register_plugins()
    for name in PLUGINS:
        assert trt.plugin.definitions[f"psearch::{name}"].aot_impl_func is not None


def test_a_second_description_is_refused_by_the_fake_as_by_tensorrt(trt):
    """The rule the retry depends on, so that this fake cannot drift from it."""
    plugins.register_plugins()
    with pytest.raises(ValueError, match="already has a defintion"):
        trt.plugin.register(f"psearch::{DYNAMIC_ROI_ALIGN}")(lambda: None)


def test_a_kernel_function_without_its_return_annotation_is_refused(trt):
    """What TensorRT 10.9-11 raise for the kernel functions psearch used to register."""

    @trt.plugin.register("toy::Copy")
    def describe(x: trt.plugin.TensorDesc, scale: float) -> trt.plugin.TensorDesc:
        return x

    with pytest.raises(ValueError, match="No return annotation found for aot_impl"):
        trt.plugin.aot_impl("toy::Copy")(lambda x, scale, outputs, tactic: None)
