"""TensorRT for psearch: engines built from the plugin graph, with our custom ops as plugins.

- :mod:`export.tensorrt.plugins`: ``psearch::DynamicRoIAlign``, ``psearch::DeformIm2col`` and
  ``psearch::DeformGemm``, TensorRT Python plugins whose kernels are the Triton kernels of
  :mod:`export.kernels`, compiled ahead of time (the engines run without Python).
- :mod:`export.tensorrt.builder`: ONNX plugin graph -> engine, cached per GPU, TensorRT version,
  NVIDIA driver and plugin build beside a JSON sidecar; loading and running an engine.
- :mod:`export.tensorrt.converters`: torch2trt converters that emit the same plugins.

Everything here needs a supported TensorRT (:data:`TENSORRT_REQUIREMENT`) and an NVIDIA GPU,
except the pure parts (cache decisions, the plugins' launch arithmetic, the ONNX rewrite), which
the package keeps importable everywhere. Its public entry points are therefore loaded on first
use: ``from export.tensorrt import build_engine`` without TensorRT raises
:class:`TensorRTUnavailableError`, which says what to install.
"""

import importlib
from types import ModuleType
from typing import Any

# The TensorRT releases psearch supports, the one place that says so: from 10.9 (ahead-of-time
# Python plugins arrived in 10.9) up to, not including, 12 (TensorRT 11 removed implicit FP16
# and EXPLICIT_BATCH, which psearch handles; a next major release is untested). README.md,
# docs/deploy.md and docker/Dockerfile.gpu quote TENSORRT_REQUIREMENT, and a test checks that
# they do.
MIN_TENSORRT_VERSION = (10, 9)
TENSORRT_VERSION_BELOW = (12, 0)
TENSORRT_REQUIREMENT = (
    f">={MIN_TENSORRT_VERSION[0]}.{MIN_TENSORRT_VERSION[1]},<{TENSORRT_VERSION_BELOW[0]}"
)

INSTALL_HINT = (
    f"TensorRT {TENSORRT_REQUIREMENT} with its Python package `tensorrt` is needed. It is "
    "installed in psearch's GPU image; elsewhere install it from NVIDIA's package index, e.g. "
    f"`pip install --extra-index-url https://pypi.nvidia.com 'tensorrt-cu12{TENSORRT_REQUIREMENT}'`"
    " (the `tensorrt` packages on PyPI only download from there), on a machine with an NVIDIA GPU."
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

__all__ = [
    *_ENTRY_POINTS,
    "MIN_TENSORRT_VERSION",
    "TENSORRT_REQUIREMENT",
    "TENSORRT_VERSION_BELOW",
    "TensorRTUnavailableError",
    "require_tensorrt",
    "tensorrt_release",
]


class TensorRTUnavailableError(ImportError):
    """TensorRT is missing, or a release psearch does not support."""


def tensorrt_release(version: str) -> tuple[int, int]:
    """``"10.16.1.11"`` -> ``(10, 16)``: the release, as the supported range counts it."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` saying what to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailableError(f"TensorRT is not installed. {INSTALL_HINT}") from error
    version = tensorrt_release(tensorrt.__version__)
    if version < MIN_TENSORRT_VERSION:
        raise TensorRTUnavailableError(
            f"TensorRT {tensorrt.__version__} is too old. {INSTALL_HINT}"
        )
    if version >= TENSORRT_VERSION_BELOW:
        raise TensorRTUnavailableError(
            f"TensorRT {tensorrt.__version__} is newer than psearch supports. {INSTALL_HINT}"
        )
    return tensorrt


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_tensorrt()
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
