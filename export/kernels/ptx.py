"""Which PTX the kernels are compiled to ahead of time, and which NVIDIA drivers can load it.

TensorRT's plugins carry the kernels as PTX, which the NVIDIA driver compiles for the GPU when
an engine is built and loaded. A driver compiles PTX up to the ISA version of its CUDA release:
a CUDA 12.8 driver (R570) reads ISA 8.7 at most, a CUDA 13.0 driver ISA 9.0. Left alone, Triton
writes the newest ISA its bundled ``ptxas`` knows (9.4 for sm_90 with Triton 3.9, 8.8 for
sm_80), which no CUDA 12 driver loads. :data:`PTX_ISA_VERSION` pins the ISA instead, so the
plugins load on every driver from :data:`MIN_DRIVER_CUDA` on (docs/deploy.md, "GPU drivers").

This module needs neither Triton nor a GPU to import.
"""

import ctypes
import functools
import re

# PTX ISA 8.7: the newest that CUDA 12.8 drivers (R570, the GPU image's CUDA) compile.
PTX_ISA_VERSION = 87
# The oldest driver CUDA version that loads PTX_ISA_VERSION, and its driver branch.
MIN_DRIVER_CUDA = (12, 8)
MIN_DRIVER_BRANCH = "R570"


def ptx_isa_version(ptx: str) -> int:
    """The PTX ISA version the text declares, numbered as Triton does: ``.version 8.7`` -> 87."""
    match = re.search(r"^\.version\s+(\d+)\.(\d+)", ptx, re.MULTILINE)
    if match is None:
        raise ValueError("the PTX declares no .version")
    return int(match.group(1)) * 10 + int(match.group(2))


def loadable_isa(driver_cuda: tuple[int, int]) -> int:
    """The newest PTX ISA a driver of CUDA version ``driver_cuda`` compiles (Triton's table)."""
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{driver_cuda[0]}.{driver_cuda[1]}")


def driver_rejection(driver_cuda: tuple[int, int]) -> str | None:
    """Why a driver of CUDA version ``driver_cuda`` cannot run the plugins, or None if it can.

    An older driver would refuse the PTX only when TensorRT loads it, with an error that names
    neither the ISA nor the driver.
    """
    if loadable_isa(driver_cuda) >= PTX_ISA_VERSION:
        return None
    return (
        f"this NVIDIA driver supports CUDA {driver_cuda[0]}.{driver_cuda[1]}, and psearch's "
        f"TensorRT plugins are PTX ISA {PTX_ISA_VERSION // 10}.{PTX_ISA_VERSION % 10}, which "
        f"needs a driver for CUDA {MIN_DRIVER_CUDA[0]}.{MIN_DRIVER_CUDA[1]} or newer "
        f"({MIN_DRIVER_BRANCH} or a later branch): update the driver, or serve with the "
        "onnxruntime backend (docs/deploy.md, GPU drivers)"
    )


@functools.cache
def driver_cuda_version() -> tuple[int, int]:
    """The CUDA version of the installed NVIDIA driver (``cuDriverGetVersion``)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise RuntimeError(f"no NVIDIA driver: libcuda.so.1 cannot be loaded ({error})") from None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        raise RuntimeError("cuDriverGetVersion failed: is the NVIDIA driver installed?")
    return version.value // 1000, version.value % 1000 // 10


@functools.cache
def driver_version() -> str | None:
    """The NVIDIA driver's own version (``570.124.06``) from NVML, or None without NVML."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buffer, len(buffer)) != 0:
            return None
        return buffer.value.decode()
    finally:
        nvml.nvmlShutdown()
