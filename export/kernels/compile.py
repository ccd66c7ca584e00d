"""Ahead-of-time compilation of the Triton kernels to PTX, for the TensorRT plugins.

``triton.compile`` needs no GPU: given a target ``GPUTarget("cuda", arch, 32)`` it lowers a kernel
to PTX (and, with the ``ptxas`` that ships in the ``triton`` wheel, to a cubin). The plugin loads
the PTX, whose entry point takes the kernel's non-constexpr arguments in order followed by two
pointers Triton adds (global and profile scratch: pass null when their sizes are 0), and launches
it on 1-D blocks of ``num_warps * 32`` threads with ``shared_memory`` bytes of dynamic shared
memory; the grids are in the kernels' modules.

The PTX declares ISA :data:`export.kernels.ptx.PTX_ISA_VERSION` (8.7), not the newest one the
bundled ``ptxas`` knows, so that the drivers psearch supports can load it (see that module).

Compilation needs the kernels as ``triton.jit`` made them: not in a process that imported them
with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter).
"""

from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from export.kernels import deform_conv, dynamic_roi_align
from export.kernels.ptx import PTX_ISA_VERSION

SUPPORTED_ARCHS = (80, 90)
DTYPES = ("fp32", "fp16")
# Triton appends these pointer parameters to every kernel it compiles.
SCRATCH_PARAMETERS = ("global_scratch", "profile_scratch")


@dataclass(frozen=True)
class LaunchMetadata:
    """What a launcher needs besides the PTX."""

    entry_name: str  # the PTX ``.entry``
    arch: int  # compute capability, e.g. 90 for sm_90
    dtype: str  # "fp32" or "fp16": the dtype of the data tensors
    parameters: tuple[str, ...]  # the entry's parameters, in order
    parameter_types: tuple[str, ...]  # their Triton types: "*fp16", "*fp32", "i32", "fp32"
    constexprs: dict[str, Any]  # the compile-time constants the PTX was built with
    num_warps: int
    threads_per_block: int
    shared_memory: int  # bytes of dynamic shared memory per block
    global_scratch_size: int  # bytes per program; 0 = pass a null pointer
    profile_scratch_size: int


@dataclass(frozen=True)
class _KernelSpec:
    kernel: triton.runtime.JITFunction
    data: tuple[str, ...]  # pointers to tensors of the compiled dtype
    float32_pointers: tuple[str, ...]  # pointers to float32 tensors whatever the dtype
    float32_scalars: tuple[str, ...]  # the other scalar arguments are i32
    constexprs: dict[str, Any]  # defaults
    num_warps: int


_KERNELS = {
    "dynamic_roi_align": _KernelSpec(
        kernel=dynamic_roi_align.dynamic_roi_align_kernel,
        data=("input_ptr", "offsets_ptr", "output_ptr"),
        # Box corners in float16 would be off by up to a pixel at 1500 pixels.
        float32_pointers=("rois_ptr",),
        float32_scalars=("spatial_scale",),
        constexprs={
            "BLOCK_C": dynamic_roi_align.BLOCK_C,
            "BLOCK_S": dynamic_roi_align.BLOCK_S,
        },
        num_warps=dynamic_roi_align.NUM_WARPS,
    ),
    "deform_im2col": _KernelSpec(
        kernel=deform_conv.deform_im2col_kernel,
        data=("input_ptr", "offset_ptr", "mask_ptr", "columns_ptr"),
        float32_pointers=(),
        float32_scalars=(),
        constexprs={
            "HAS_MASK": True,
            "BLOCK_L": deform_conv.IM2COL_BLOCK_L,
            "BLOCK_C": deform_conv.IM2COL_BLOCK_C,
        },
        num_warps=deform_conv.IM2COL_NUM_WARPS,
    ),
    "deform_gemm": _KernelSpec(
        kernel=deform_conv.deform_gemm_kernel,
        data=("weight_ptr", "columns_ptr", "bias_ptr", "output_ptr"),
        float32_pointers=(),
        float32_scalars=(),
        constexprs={
            "HAS_BIAS": True,
            "BLOCK_M": deform_conv.GEMM_BLOCK_M,
            "BLOCK_N": deform_conv.GEMM_BLOCK_N,
            "BLOCK_K": deform_conv.GEMM_BLOCK_K,
            "INPUT_PRECISION": deform_conv.GEMM_INPUT_PRECISION,
        },
        num_warps=deform_conv.GEMM_NUM_WARPS,
    ),
}
KERNEL_NAMES = tuple(_KERNELS)


def compile_ptx(
    kernel_name: str,
    arch: int = 90,
    dtype: str = "fp32",
    *,
    num_warps: int | None = None,
    **constexprs: Any,
) -> tuple[str, LaunchMetadata]:
    """Compile one of :data:`KERNEL_NAMES` to PTX for ``sm_<arch>``, without a GPU.

    Args:
        kernel_name: ``"dynamic_roi_align"``, ``"deform_im2col"`` or ``"deform_gemm"``.
        arch: 80 (Ampere) or 90 (Hopper).
        dtype: ``"fp32"`` or ``"fp16"``, the dtype of the data tensors (RoI boxes stay float32;
            the kernels compute in FP32 either way).
        num_warps: warps per block; the kernel module's default when None.
        **constexprs: overrides of the kernel's compile-time constants (block sizes,
            ``HAS_MASK``, ``HAS_BIAS``, ``INPUT_PRECISION``).

    Returns:
        The PTX text and the :class:`LaunchMetadata` a launcher needs.
    """
    spec = _kernel_spec(kernel_name)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    constants = _constants(spec, kernel_name, constexprs)
    if not isinstance(spec.kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "Triton interprets the kernels in this process (TRITON_INTERPRET=1 was set when they "
            "were imported): compile them in a process without it"
        )

    signature = _signature(spec, dtype, constants)
    compiled = triton.compile(
        ASTSource(spec.kernel, signature, constexprs=constants),
        target=GPUTarget("cuda", arch, 32),
        options={
            "num_warps": spec.num_warps if num_warps is None else num_warps,
            # No FMA contraction: the FP32 steps of the PyTorch reference (as the JIT launch).
            "enable_fp_fusion": False,
            # The ISA the supported drivers load (Triton's ptxas would write a newer one).
            "ptx_version": PTX_ISA_VERSION,
        },
    )
    metadata = compiled.metadata
    runtime = {name: kind for name, kind in signature.items() if kind != "constexpr"}
    return compiled.asm["ptx"], LaunchMetadata(
        entry_name=metadata.name,
        arch=arch,
        dtype=dtype,
        parameters=(*runtime, *SCRATCH_PARAMETERS),
        parameter_types=(*runtime.values(), *["*i8"] * len(SCRATCH_PARAMETERS)),
        constexprs=constants,
        num_warps=metadata.num_warps,
        threads_per_block=metadata.num_warps * metadata.warp_size,
        shared_memory=metadata.shared,
        global_scratch_size=metadata.global_scratch_size,
        profile_scratch_size=metadata.profile_scratch_size,
    )


def _kernel_spec(kernel_name: str) -> _KernelSpec:
    if kernel_name not in _KERNELS:
        raise ValueError(f"unknown kernel {kernel_name!r}; the kernels are {KERNEL_NAMES}")
    return _KERNELS[kernel_name]


def _constants(spec: _KernelSpec, kernel_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The kernel's default constexprs updated with ``overrides``."""
    unknown = set(overrides) - set(spec.constexprs)
    if unknown:
        raise ValueError(
            f"{kernel_name} has no constexpr {sorted(unknown)}; it has {sorted(spec.constexprs)}"
        )
    return spec.constexprs | overrides


def _signature(spec: _KernelSpec, dtype: str, constants: dict[str, Any]) -> dict[str, str]:
    """Triton type of every argument, in order."""

    def argument_type(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name in spec.data:
            return f"*{dtype}"
        if name in spec.float32_pointers:
            return "*fp32"
        return "fp32" if name in spec.float32_scalars else "i32"

    return {name: argument_type(name) for name in spec.kernel.arg_names}
