"""torch2trt converters for psearch's custom ops: they add the plugins of
:mod:`export.tensorrt.plugins`, exactly as the ONNX path does.

================================================  ==========================================
converter key (what torch2trt intercepts)         plugins added
================================================  ==========================================
``torch.ops.psearch.dynamic_roi_align.default``   ``DynamicRoIAlign``
``torch.ops.psearch.roi_align.default``           ``DynamicRoIAlign`` with zero offsets
``torch.ops.psearch.deform_conv2d.default``       ``DeformIm2col`` + ``DeformGemm``
================================================  ==========================================

torch2trt converts while the model runs on example inputs: for that run it replaces each key's
attribute with a wrapper that also calls the converter. Our models never look that attribute
up: ``roi_align()`` and ``dynamic_roi_align()`` call their op's ``CustomOpDef``, and
``deform_conv2d()`` the op's ``OpOverloadPacket``, both of which hold the overload itself. A
plain ``torch2trt(model, ...)`` would therefore never meet the wrappers: use
:func:`convert_with_torch2trt`, which converts inside :func:`calls_through_op_overloads`.

Inside torch2trt's conversion ``tensor.shape`` yields ``IntWrapper`` values (ints that add
shape layers to the network when used in arithmetic); plugin attributes must be plain ``int``
(``tensorrt.plugin`` refuses anything else), so the converters read shapes with the wrapping
off, as torch2trt's own helpers do.

torch2trt networks have the static shapes of the example inputs, and torch2trt creates them
with TensorRT's ``EXPLICIT_BATCH`` flag, which TensorRT 11 removed: on TensorRT 11
:func:`convert_with_torch2trt` refuses with :class:`Torch2trtUnsupportedError` (export through
ONNX instead: ``psearch-export --format tensorrt``). Importing this module needs a supported
TensorRT and torch2trt, which is not on PyPI: install it from its repository,
https://github.com/NVIDIA-AI-IOT/torch2trt (``pip install .`` where TensorRT is installed).
"""

import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import models.ops.deform_conv  # noqa: F401  (defines psearch::deform_conv2d)
from export.tensorrt import require_tensorrt
from export.tensorrt.plugins import (
    DEFORM_GEMM,
    DEFORM_IM2COL,
    DYNAMIC_ROI_ALIGN,
    NAMESPACE,
    PLUGIN_ATTRIBUTES,
    register_plugins,
    require_supported_driver,
)

TORCH2TRT_HINT = (
    "torch2trt is not installed. It is not on PyPI: install it from "
    "https://github.com/NVIDIA-AI-IOT/torch2trt (`pip install .` in a checkout, where TensorRT "
    "is installed)."
)


def _import_torch2trt() -> ModuleType:
    require_tensorrt()  # first: torch2trt's own import error would blame the wrong package
    try:
        import torch2trt
    except ImportError as error:
        raise ImportError(TORCH2TRT_HINT) from error
    return torch2trt


_torch2trt = _import_torch2trt()
tensorrt_converter = _torch2trt.tensorrt_converter

# Where the models' calls hold an op instead of looking up its overload: module globals that
# the Python entry points call (roi_align() calls roi_align_op, a CustomOpDef), and the
# OpOverloadPacket that deform_conv2d() calls, whose __call__ calls its `_op`.
_OP_GLOBALS = {
    "roi_align": (importlib.import_module("models.ops.roi_align"), "roi_align_op"),
    "dynamic_roi_align": (
        importlib.import_module("models.ops.dynamic_roi_align"),
        "dynamic_roi_align_op",
    ),
}
_OVERLOAD_PACKETS = ("deform_conv2d",)


class Torch2trtUnsupportedError(RuntimeError):
    """torch2trt cannot build networks with the installed TensorRT."""


def convert_with_torch2trt(model: nn.Module, inputs: Sequence[Tensor], **kwargs: Any) -> Any:
    """``torch2trt.torch2trt(model, inputs, **kwargs)`` with our ops converted to plugins.

    Returns torch2trt's ``TRTModule``. Raises :class:`Torch2trtUnsupportedError` on TensorRT 11
    and :class:`export.tensorrt.plugins.UnsupportedDriverError` on a driver too old for the
    plugins.
    """
    trt = require_tensorrt()
    if not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        raise Torch2trtUnsupportedError(
            f"torch2trt cannot run on TensorRT {trt.__version__}: it creates every network with "
            "the EXPLICIT_BATCH flag, which TensorRT 11 removed. Build the engine from the ONNX "
            "plugin graph instead (psearch-export --format tensorrt, or "
            "export.tensorrt.ensure_engine), which works on every supported TensorRT"
        )
    require_supported_driver()
    register_plugins()
    with calls_through_op_overloads():
        return _torch2trt.torch2trt(model, list(inputs), **kwargs)


@contextmanager
def calls_through_op_overloads() -> Iterator[None]:
    """While active, calls of our ops from Python go through the attribute
    ``torch.ops.psearch.<op>.default``, whatever it is at the time of the call."""
    originals: list[tuple[Any, str, Any]] = []
    try:
        for name, (module, attribute) in _OP_GLOBALS.items():
            originals.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, _call_by_name(name))
        for name in _OVERLOAD_PACKETS:
            packet = getattr(torch.ops.psearch, name)
            originals.append((packet, "_op", packet._op))
            packet._op = _call_by_name(name)
        yield
    finally:
        for owner, attribute, value in reversed(originals):
            setattr(owner, attribute, value)


def _call_by_name(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(torch.ops.psearch, name).default(*args, **kwargs)

    return call


# --------------------------------------------------------------------------------------------
# Converters


def _shape_wrapping_off() -> Any:
    """torch2trt's ``use_shape_wrapping(False)``; nothing for releases without shape wrapping."""
    use_shape_wrapping = getattr(_torch2trt, "use_shape_wrapping", None)
    return nullcontext() if use_shape_wrapping is None else use_shape_wrapping(False)


def _plain_shapes(converter: Callable[[Any], None]) -> Callable[[Any], None]:
    """Run ``converter`` with ``tensor.shape`` giving plain ints (see the module docstring)."""

    @functools.wraps(converter)
    def convert(ctx: Any) -> None:
        with _shape_wrapping_off():
            converter(ctx)

    return convert


@tensorrt_converter("torch.ops.psearch.dynamic_roi_align.default")
@_plain_shapes
def convert_dynamic_roi_align(ctx: Any) -> None:
    features, rois, offsets, spatial_scale, sampling_ratio, aligned = _arguments(
        ctx, torch.ops.psearch.dynamic_roi_align.default
    )
    _add_roi_align(ctx, features, rois, offsets, spatial_scale, sampling_ratio, aligned)


@tensorrt_converter("torch.ops.psearch.roi_align.default")
@_plain_shapes
def convert_roi_align(ctx: Any) -> None:
    features, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = _arguments(
        ctx, torch.ops.psearch.roi_align.default
    )
    offsets = features.new_zeros(rois.shape[0], pooled_h, pooled_w, 2)
    _add_roi_align(ctx, features, rois, offsets, spatial_scale, sampling_ratio, aligned)


@tensorrt_converter("torch.ops.psearch.deform_conv2d.default")
@_plain_shapes
def convert_deform_conv2d(ctx: Any) -> None:
    features, offset, weight, bias, stride, padding, dilation, mask = _arguments(
        ctx, torch.ops.psearch.deform_conv2d.default
    )
    dtype = _trt_tensor(ctx, features).dtype
    taps = weight.shape[2] * weight.shape[3]
    offset_trt = _trt_tensor(ctx, offset, dtype)
    columns = _add_plugin(
        ctx,
        DEFORM_IM2COL,
        # Without a mask (DCNv1) the kernel never reads that input: pass the offset.
        [
            _trt_tensor(ctx, features),
            offset_trt,
            offset_trt if mask is None else _trt_tensor(ctx, mask, dtype),
        ],
        kernel_shape=_int32_pair(weight.shape[2:]),
        strides=_int32_pair(stride),
        pads=_int32_pair(padding),
        dilations=_int32_pair(dilation),
        offset_groups=offset.shape[1] // (2 * taps),
        has_mask=int(mask is not None),
    )
    weight_trt = _trt_tensor(ctx, weight, dtype)
    ctx.method_return._trt = _add_plugin(
        ctx,
        DEFORM_GEMM,
        [weight_trt, columns, weight_trt if bias is None else _trt_tensor(ctx, bias, dtype)],
        groups=features.shape[1] // weight.shape[1],
        has_bias=int(bias is not None),
    )


def _add_roi_align(
    ctx: Any,
    features: Tensor,
    rois: Tensor,
    offsets: Tensor,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> None:
    trt = require_tensorrt()
    features_trt = _trt_tensor(ctx, features)
    ctx.method_return._trt = _add_plugin(
        ctx,
        DYNAMIC_ROI_ALIGN,
        [
            features_trt,
            _trt_tensor(ctx, rois, trt.float32),
            _trt_tensor(ctx, offsets, features_trt.dtype),
        ],
        spatial_scale=float(spatial_scale),
        sampling_ratio=int(sampling_ratio),
        aligned=int(aligned),
    )


def _arguments(ctx: Any, op: Any) -> list[Any]:
    """The intercepted call's arguments in the op's schema order."""
    names = [argument.name for argument in op._schema.arguments]
    given = list(ctx.method_args)
    return given + [ctx.method_kwargs[name] for name in names[len(given) :]]


def _trt_tensor(ctx: Any, tensor: Tensor, dtype: Any = None) -> Any:
    """The network tensor torch2trt traced for ``tensor``, or a constant of its values (weights,
    zero offsets), cast to ``dtype`` when given."""
    if not hasattr(tensor, "_trt"):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        # TensorRT reads constants when it builds, from this buffer: keep it alive until then.
        ctx.__dict__.setdefault("psearch_constants", []).append(array)
        tensor._trt = ctx.network.add_constant(tuple(tensor.shape), array).get_output(0)
    result = tensor._trt
    if dtype is not None and result.dtype != dtype:
        result = ctx.network.add_cast(result, dtype).get_output(0)
    return result


def _int32_pair(values: Sequence[int]) -> np.ndarray:
    return np.array([int(value) for value in values], dtype=np.int32)


def _add_plugin(ctx: Any, name: str, inputs: list[Any], **attributes: Any) -> Any:
    """Add plugin ``psearch::name`` (its AOT implementation); returns its output tensor."""
    import tensorrt.plugin as trtp

    ordered = {key: attributes[key] for key in PLUGIN_ATTRIBUTES[name]}
    plugin = getattr(getattr(trtp.op, NAMESPACE), name)(*inputs, **ordered)
    return ctx.network.add_plugin(plugin, aot=True).get_output(0)
