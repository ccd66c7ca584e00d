"""TensorRT for psearch: engines built from the plugin graph, with our custom ops as plugins.

- :mod:`export.tensorrt.plugins`: ``psearch::DynamicRoIAlign``, ``psearch::DeformIm2col`` and
  ``psearch::DeformGemm``, TensorRT Python plugins whose kernels are the Triton kernels of
  :mod:`export.kernels`, compiled ahead of time (the engines run without Python).
- :mod:`export.tensorrt.builder`: ONNX plugin graph -> engine, cached per GPU architecture and
  TensorRT version beside a JSON sidecar; loading and running an engine.
- :mod:`export.tensorrt.converters`: torch2trt converters that emit the same plugins.

Everything here needs TensorRT >= 10.9 and an NVIDIA GPU, except the pure parts (cache
decisions, the plugins' launch arithmetic, the ONNX rewrite), which the package keeps importable
everywhere. Its public entry points are therefore loaded on first use: ``from export.tensorrt
import build_engine`` without TensorRT raises :class:`TensorRTUnavailableError`, which says what
to install.
"""

import importlib
from types import ModuleType
from typing import Any

MIN_TENSORRT_VERSION = (10, 9)

INSTALL_HINT = (
    "TensorRT >= 10.9 with its Python package `tensorrt` is needed (ahead-of-time Python plugins "
    "arrived in 10.9). It is installed in psearch's GPU image; elsewhere install it from NVIDIA's "
    "package index, e.g. `pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12` "
    "(the `tensorrt` packages on PyPI only download from there), on a machine with an NVIDIA GPU."
)

# Public name -> the module that defines it.
_ENTRY_POINTS = {
    "build_engine": "export.tensorrt.builder",
    "ensure_engine": "export.tensorrt.builder",
    "load_engine": "export.tensorrt.builder",
    "BuildSettings": "export.tensorrt.builder",
    "InputShapes": "export.tensorrt.builder",
    "TensorRTEngine": "export.tensorrt.builder",
    "EngineMismatchError": "export.tensorrt.builder",
    "register_plugins": "export.tensorrt.plugins",
    "convert_with_torch2trt": "export.tensorrt.converters",
}

__all__ = [*_ENTRY_POINTS, "MIN_TENSORRT_VERSION", "TensorRTUnavailableError", "require_tensorrt"]


class TensorRTUnavailableError(ImportError):
    """TensorRT is missing or too old for psearch's plugins."""


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` saying what to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailableError(f"TensorRT is not installed. {INSTALL_HINT}") from error
    version = tuple(int(part) for part in tensorrt.__version__.split(".")[:2])
    if version < MIN_TENSORRT_VERSION:
        raise TensorRTUnavailableError(
            f"TensorRT {tensorrt.__version__} is too old. {INSTALL_HINT}"
        )
    return tensorrt


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_tensorrt()
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
