"""TensorRT plugins of psearch's custom ops, with the Triton kernels compiled ahead of time.

Plugins (namespace ``psearch``), inputs -> output, with their attributes in the order TensorRT
receives them:

``DynamicRoIAlign(features (N, C, H, W), rois (K, 5) float32, offsets (K, oh, ow, 2))``
    ``spatial_scale: float, sampling_ratio: int, aligned: int`` -> ``(K, C, oh, ow)``; the node
    ``export.onnx`` writes, semantics of ``models/ops/dynamic_roi_align.py``.
``DeformIm2col(features (N, Cin, H, W), offset (N, 2 * og * kh * kw, oH, oW), mask)``
    ``kernel_shape, strides, pads, dilations: int32[2] (h, w), offset_groups: int,
    has_mask: int`` -> columns ``(N, Cin * kh * kw, oH, oW)``. ``has_mask=0`` (DCNv1): the mask
    input is not read (any tensor of the data dtype, e.g. the offset).
``DeformGemm(weight (Cout, Cin / g, kh, kw), columns, bias (Cout))``
    ``groups: int, has_bias: int`` -> ``(N, Cout, oH, oW)``. ``has_bias=0``: bias is not read.

The ONNX node ``psearch::DeformConv2d`` becomes ``DeformIm2col`` + ``DeformGemm``
(:func:`export.tensorrt.builder.prepare_plugin_graph`): a TensorRT ahead-of-time plugin launches
exactly one kernel and has no scratch memory, and the deformable convolution is two kernels with
the columns in between; as two plugins, TensorRT allocates the columns like any tensor.

Data tensors are float32 or float16 (one dtype per plugin instance), RoI boxes float32, layouts
linear. Each plugin's ``aot_impl`` returns the kernel's PTX, its launch parameters as symbolic
expressions of the input shapes, and the kernel's scalar arguments. Two facts of TensorRT's
launcher shape that code:

- TensorRT passes ``(input pointers, scalar arguments, output pointers)`` and null for any
  further parameter; Triton compiles ``(pointers in declaration order, scalars, 2 scratch
  pointers)``. :func:`compile_for_tensorrt` reorders the parameter list of the PTX entry (the
  body refers to parameters by name; :func:`tensorrt_parameter_order`), and the scratch pointers
  stay last, where TensorRT's nulls are what Triton passes when, as here, no scratch memory is
  used.
- Scalar arguments are 32-bit integers; a float (``spatial_scale``) is passed as its bit pattern
  (:func:`float32_bits`), which the kernel reads as the ``.f32`` parameter it declares.

PTX targets: ``sm_90a`` on compute capability 9.0 (Hopper), else ``sm_80``, which the driver
compiles for any newer GPU when the engine loads (:func:`ptx_arch`).
"""

import functools
import hashlib
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import export.kernels as kernels
from export.kernels.ptx import driver_cuda_version, driver_rejection
from export.tensorrt import require_tensorrt

# Triton and the kernels (export.kernels.compile) are imported where a kernel is compiled: the
# launch arithmetic and the registration do not need them.
if TYPE_CHECKING:
    from export.kernels.compile import LaunchMetadata

NAMESPACE = "psearch"
DYNAMIC_ROI_ALIGN = "DynamicRoIAlign"
DEFORM_IM2COL = "DeformIm2col"
DEFORM_GEMM = "DeformGemm"

# Each plugin's attributes in its registration order: TensorRT hands them to the plugin in the
# order it received them, so every producer (ONNX rewrite, torch2trt converters) uses this one.
PLUGIN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    DYNAMIC_ROI_ALIGN: ("spatial_scale", "sampling_ratio", "aligned"),
    DEFORM_IM2COL: ("kernel_shape", "strides", "pads", "dilations", "offset_groups", "has_mask"),
    DEFORM_GEMM: ("groups", "has_bias"),
}

# Supported (input..., output) dtypes, all linear: "|" ties the positions to one choice, so the
# data tensors are all FP32 or all FP16, while RoI boxes stay FP32 (in FP16 a box corner near
# 1500 pixels would be off by up to a pixel).
TYPE_COMBINATIONS: dict[str, str] = {
    DYNAMIC_ROI_ALIGN: "FP32|FP16, FP32, FP32|FP16, FP32|FP16",
    DEFORM_IM2COL: "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16",
    DEFORM_GEMM: "FP32|FP16, FP32|FP16, FP32|FP16, FP32|FP16",
}

CeilDiv = Callable[[Any, int], Any]


# --------------------------------------------------------------------------------------------
# Launch arithmetic. The dimensions are ints or TensorRT shape expressions (``trtp.ShapeExpr``,
# which supports +, *, // with ints); ``ceil_div`` is ``trtp.cdiv`` for the latter.


@dataclass(frozen=True)
class Launch:
    """A kernel launch: its grid and its scalar arguments by parameter name."""

    grid: tuple[Any, Any, Any]
    scalars: dict[str, Any]


def ceil_div(numerator: int, denominator: int) -> int:
    """``ceil(numerator / denominator)`` for non-negative ints."""
    return -(-numerator // denominator)


def float32_bits(value: float) -> int:
    """The IEEE float32 bit pattern of ``value`` as a signed 32-bit integer."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def roi_align_launch(
    num_rois: Any,
    channels: Any,
    height: Any,
    width: Any,
    pooled_h: Any,
    pooled_w: Any,
    *,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: int,
    block_c: int,
    ceil_div: CeilDiv = ceil_div,
) -> Launch:
    """``dynamic_roi_align_kernel``: one program per (RoI, bin) and block of channels."""
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be positive, got {spatial_scale}")
    return Launch(
        grid=(num_rois * pooled_h * pooled_w, ceil_div(channels, block_c), 1),
        scalars={
            "channels": channels,
            "height": height,
            "width": width,
            "pooled_h": pooled_h,
            "pooled_w": pooled_w,
            "spatial_scale": float32_bits(spatial_scale),
            # The kernel reads any ratio <= 0 as adaptive; 0 keeps the symbolic constant
            # non-negative, like the dimensions TensorRT's expressions are made for.
            "sampling_ratio": max(sampling_ratio, 0),
            "aligned": aligned,
        },
    )


def im2col_launch(
    batch: Any,
    channels: Any,
    height: Any,
    width: Any,
    out_h: Any,
    out_w: Any,
    *,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    offset_groups: int,
    block_l: int,
    block_c: int,
    ceil_div: CeilDiv = ceil_div,
) -> Launch:
    """``deform_im2col_kernel``: (pixel block, (image, offset group, tap), channel block)."""
    length = out_h * out_w
    taps = kernel_shape[0] * kernel_shape[1]
    return Launch(
        grid=(
            ceil_div(length, block_l),
            batch * (offset_groups * taps),
            ceil_div(channels // offset_groups, block_c),
        ),
        scalars={
            "channels": channels,
            "height": height,
            "width": width,
            "out_w": out_w,
            "length": length,
            "kernel_h": kernel_shape[0],
            "kernel_w": kernel_shape[1],
            "stride_h": strides[0],
            "stride_w": strides[1],
            "pad_h": pads[0],
            "pad_w": pads[1],
            "dilation_h": dilations[0],
            "dilation_w": dilations[1],
            "offset_groups": offset_groups,
        },
    )


def gemm_launch(
    batch: Any,
    out_channels: Any,
    in_per_group: Any,
    kernel_h: Any,
    kernel_w: Any,
    out_h: Any,
    out_w: Any,
    *,
    groups: int,
    block_m: int,
    block_n: int,
    ceil_div: CeilDiv = ceil_div,
) -> Launch:
    """``deform_gemm_kernel``: (output tile, (image, group))."""
    out_per_group = out_channels // groups
    length = out_h * out_w
    return Launch(
        grid=(ceil_div(out_per_group, block_m) * ceil_div(length, block_n), batch * groups, 1),
        scalars={
            "out_per_group": out_per_group,
            "reduction": in_per_group * kernel_h * kernel_w,
            "length": length,
            "groups": groups,
        },
    )


def dynamic_roi_align_output_shape(
    features: Sequence[Any], rois: Sequence[Any], offsets: Sequence[Any]
) -> tuple[Any, ...]:
    """``(K, C, oh, ow)`` from ``features (N, C, H, W)``, ``rois (K, 5)``, ``offsets (K, oh, ow,
    2)``."""
    return (rois[0], features[1], offsets[1], offsets[2])


def im2col_output_shape(
    features: Sequence[Any], offset: Sequence[Any], kernel_shape: Sequence[int]
) -> tuple[Any, ...]:
    """Columns ``(N, Cin * kh * kw, oH, oW)``: the offset already has the output's ``oH, oW``."""
    return (features[0], features[1] * kernel_shape[0] * kernel_shape[1], offset[2], offset[3])


def gemm_output_shape(weight: Sequence[Any], columns: Sequence[Any]) -> tuple[Any, ...]:
    """``(N, Cout, oH, oW)`` from ``weight (Cout, ...)`` and columns ``(N, R, oH, oW)``."""
    return (columns[0], weight[0], columns[2], columns[3])


def scalar_parameters(metadata: "LaunchMetadata") -> tuple[str, ...]:
    """The kernel's scalar (non-pointer) parameters, in order."""
    return tuple(
        name
        for name, kind in zip(metadata.parameters, metadata.parameter_types, strict=True)
        if not kind.startswith("*")
    )


def ordered_scalars(metadata: "LaunchMetadata", scalars: Mapping[str, Any]) -> tuple[Any, ...]:
    """``scalars`` in the order of the kernel's scalar parameters (they must name them all)."""
    expected = scalar_parameters(metadata)
    if set(scalars) != set(expected):
        raise ValueError(
            f"{metadata.entry_name} takes the scalars {expected}, got {sorted(scalars)}"
        )
    return tuple(scalars[name] for name in expected)


# --------------------------------------------------------------------------------------------
# PTX for TensorRT


def ptx_arch(capability: tuple[int, int]) -> int:
    """The PTX target for a GPU of compute ``capability``: 90 (``sm_90a``, which runs on 9.0
    only) on Hopper, 80 everywhere else from Ampere on."""
    major, minor = capability
    if (major, minor) == (9, 0):
        return 90
    if major >= 8:
        return 80
    raise ValueError(
        f"the plugins' kernels need compute capability 8.0 or newer; this GPU has {major}.{minor}"
    )


def reorder_entry_parameters(ptx: str, entry_name: str, order: Sequence[int]) -> str:
    """The PTX with the parameters of ``.entry entry_name`` declared in ``order`` (old indices).

    Only the launch ABI changes: the body names parameters, not positions.
    """
    match = re.search(rf"\.entry\s+{re.escape(entry_name)}\s*\(([^)]*)\)", ptx)
    if match is None:
        raise ValueError(f"the PTX has no entry {entry_name!r}")
    declarations = [declaration.strip() for declaration in match.group(1).split(",")]
    if sorted(order) != list(range(len(declarations))):
        raise ValueError(f"{list(order)} is not a permutation of {len(declarations)} parameters")
    for index, declaration in enumerate(declarations):
        if not declaration.endswith(f"_param_{index}"):
            raise ValueError(f"unexpected declaration of parameter {index}: {declaration!r}")
    listed = ",\n\t".join(declarations[index] for index in order)
    return f"{ptx[: match.start(1)]}\n\t{listed}\n{ptx[match.end(1) :]}"


def tensorrt_parameter_order(metadata: "LaunchMetadata", num_outputs: int = 1) -> list[int]:
    """Triton's ``(inputs, outputs, scalars, scratch)`` -> TensorRT's ``(inputs, scalars,
    outputs, scratch)``, as old parameter indices. The last ``num_outputs`` data pointers are
    the outputs (true of every kernel in :mod:`export.kernels`)."""
    from export.kernels.compile import SCRATCH_PARAMETERS

    kinds = "".join(
        "x" if name in SCRATCH_PARAMETERS else "p" if kind.startswith("*") else "s"
        for name, kind in zip(metadata.parameters, metadata.parameter_types, strict=True)
    )
    if not re.fullmatch(r"p+s*x*", kinds):
        raise ValueError(
            f"{metadata.entry_name}: expected pointers, then scalars, then scratch pointers, "
            f"got {list(zip(metadata.parameters, metadata.parameter_types, strict=True))}"
        )
    pointers = [index for index, kind in enumerate(kinds) if kind == "p"]
    if len(pointers) <= num_outputs:
        raise ValueError(f"{metadata.entry_name} has no input pointers left for the plugin")
    scalars = [index for index, kind in enumerate(kinds) if kind == "s"]
    scratch = [index for index, kind in enumerate(kinds) if kind == "x"]
    return pointers[:-num_outputs] + scalars + pointers[-num_outputs:] + scratch


class UnsupportedDriverError(RuntimeError):
    """The NVIDIA driver is too old to load the plugins' PTX (docs/deploy.md, GPU drivers)."""


def require_supported_driver() -> tuple[int, int]:
    """The driver's CUDA version, or :class:`UnsupportedDriverError` saying which is needed.

    Checked before TensorRT builds or loads an engine: TensorRT itself fails only when it loads
    the PTX, with an error that names neither the ISA nor the driver.
    """
    driver = driver_cuda_version()
    rejection = driver_rejection(driver)
    if rejection is not None:
        raise UnsupportedDriverError(rejection)
    return driver


def plugin_source_sha256() -> str:
    """SHA-256 of the sources the plugins' PTX and launches come from: the kernels' package and
    this module. An edited kernel changes it, so cached engines are rebuilt with the new PTX."""
    digest = hashlib.sha256()
    sources = [*sorted(Path(kernels.__file__).parent.glob("*.py")), Path(__file__)]
    for source in sources:
        digest.update(f"{source.parent.name}/{source.name}\0".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class PluginKernel:
    """A kernel ready for a TensorRT AOT plugin: PTX in TensorRT's parameter order."""

    ptx: str
    metadata: "LaunchMetadata"


@functools.cache
def compile_for_tensorrt(
    kernel_name: str, arch: int, dtype: str, **constexprs: Any
) -> PluginKernel:
    """:func:`export.kernels.compile.compile_ptx`, with the entry's parameters in TensorRT's
    launch order (one output per kernel). Cached: TensorRT asks once per tuning candidate."""
    from export.kernels.compile import compile_ptx

    ptx, metadata = compile_ptx(kernel_name, arch, dtype, **constexprs)
    order = tensorrt_parameter_order(metadata)
    return PluginKernel(reorder_entry_parameters(ptx, metadata.entry_name, order), metadata)


@functools.cache
def target_arch() -> int:
    """The PTX target for the current CUDA device (the one TensorRT builds for)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("building the plugins needs the GPU they will run on; none is visible")
    return ptx_arch(torch.cuda.get_device_capability())


# --------------------------------------------------------------------------------------------
# Registration with tensorrt.plugin


_registered = False


def register_plugins() -> None:
    """Register the three plugins with TensorRT: needed to build engines (the engines embed the
    kernels and load without Python).

    Calling it again does nothing. A call that failed part-way can be repeated: TensorRT refuses
    to describe a plugin twice in a process, so a description already there is kept and the
    tuning and kernel functions are attached to it again. Raises
    :class:`export.tensorrt.TensorRTUnavailableError` without a supported TensorRT.
    """
    global _registered
    if _registered:
        return
    trt = require_tensorrt()
    import tensorrt.plugin as trtp

    for register in (_register_dynamic_roi_align, _register_deform_im2col, _register_deform_gemm):
        register(trt, trtp)
    _registered = True


def _describe_once(trtp: Any, name: str, describe: Callable[..., Any]) -> None:
    """``@trtp.register`` the description of plugin ``name`` unless this process already has."""
    namespace = getattr(trtp.op, NAMESPACE, None)
    if namespace is None or not hasattr(namespace, name):
        trtp.register(f"{NAMESPACE}::{name}")(describe)


def _dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16"}
    if dtype not in names:
        raise TypeError(f"the plugins take float32 or float16 data, got {dtype}")
    return names[dtype]


def _check_rank(name: str, desc: Any, rank: int) -> None:
    if desc.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got {desc.ndim}")


def _aot_result(trtp: Any, kernel: PluginKernel, launch: Launch) -> tuple[str, str, Any, Any]:
    """``aot_impl``'s answer: entry name, PTX, launch parameters, scalar arguments."""
    metadata = kernel.metadata
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x = metadata.threads_per_block
    params.shared_mem = metadata.shared_memory
    scalars = ordered_scalars(metadata, launch.scalars)
    extra_args = trtp.SymIntExprs(len(scalars))
    for index, value in enumerate(scalars):
        extra_args[index] = trtp.SymInt32(value)
    return metadata.entry_name, kernel.ptx, params, extra_args


def _pair(values: npt.NDArray[np.int32]) -> tuple[int, int]:
    if np.size(values) != 2:
        raise ValueError(f"expected an (h, w) pair, got {values}")
    return int(values[0]), int(values[1])


def _register_dynamic_roi_align(trt: Any, trtp: Any) -> None:
    plugin_id = f"{NAMESPACE}::{DYNAMIC_ROI_ALIGN}"

    def describe(
        features: trtp.TensorDesc,
        rois: trtp.TensorDesc,
        offsets: trtp.TensorDesc,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: int,
    ) -> trtp.TensorDesc:
        for name, desc, rank in (
            ("features", features, 4),
            ("rois", rois, 2),
            ("offsets", offsets, 4),
        ):
            _check_rank(name, desc, rank)
        shape = dynamic_roi_align_output_shape(
            features.shape_expr, rois.shape_expr, offsets.shape_expr
        )
        return trtp.from_shape_expr(shape, dtype=features.dtype)

    _describe_once(trtp, DYNAMIC_ROI_ALIGN, describe)

    @trtp.autotune(plugin_id)
    def tune(features, rois, offsets, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[DYNAMIC_ROI_ALIGN], "LINEAR")]

    # TensorRT requires the return annotation (its validator refuses an aot_impl without one).
    @trtp.aot_impl(plugin_id)
    def compile_kernel(
        features, rois, offsets, spatial_scale, sampling_ratio, aligned, outputs, tactic
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        kernel = compile_for_tensorrt(
            "dynamic_roi_align", target_arch(), _dtype_name(trt, features.dtype)
        )
        shape = features.shape_expr
        launch = roi_align_launch(
            rois.shape_expr[0],
            shape[1],
            shape[2],
            shape[3],
            offsets.shape_expr[1],
            offsets.shape_expr[2],
            spatial_scale=float(spatial_scale),
            sampling_ratio=int(sampling_ratio),
            aligned=int(aligned),
            block_c=kernel.metadata.constexprs["BLOCK_C"],
            ceil_div=trtp.cdiv,
        )
        return _aot_result(trtp, kernel, launch)


def _register_deform_im2col(trt: Any, trtp: Any) -> None:
    plugin_id = f"{NAMESPACE}::{DEFORM_IM2COL}"

    def describe(
        features: trtp.TensorDesc,
        offset: trtp.TensorDesc,
        mask: trtp.TensorDesc,
        kernel_shape: npt.NDArray[np.int32],
        strides: npt.NDArray[np.int32],
        pads: npt.NDArray[np.int32],
        dilations: npt.NDArray[np.int32],
        offset_groups: int,
        has_mask: int,
    ) -> trtp.TensorDesc:
        _check_rank("features", features, 4)
        _check_rank("offset", offset, 4)
        shape = im2col_output_shape(features.shape_expr, offset.shape_expr, _pair(kernel_shape))
        return trtp.from_shape_expr(shape, dtype=features.dtype)

    _describe_once(trtp, DEFORM_IM2COL, describe)

    @trtp.autotune(plugin_id)
    def tune(features, offset, mask, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[DEFORM_IM2COL], "LINEAR")]

    @trtp.aot_impl(plugin_id)
    def compile_kernel(
        features,
        offset,
        mask,
        kernel_shape,
        strides,
        pads,
        dilations,
        offset_groups,
        has_mask,
        outputs,
        tactic,
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        kernel = compile_for_tensorrt(
            "deform_im2col",
            target_arch(),
            _dtype_name(trt, features.dtype),
            HAS_MASK=bool(has_mask),
        )
        shape = features.shape_expr
        launch = im2col_launch(
            shape[0],
            shape[1],
            shape[2],
            shape[3],
            offset.shape_expr[2],
            offset.shape_expr[3],
            kernel_shape=_pair(kernel_shape),
            strides=_pair(strides),
            pads=_pair(pads),
            dilations=_pair(dilations),
            offset_groups=int(offset_groups),
            block_l=kernel.metadata.constexprs["BLOCK_L"],
            block_c=kernel.metadata.constexprs["BLOCK_C"],
            ceil_div=trtp.cdiv,
        )
        return _aot_result(trtp, kernel, launch)


def _register_deform_gemm(trt: Any, trtp: Any) -> None:
    plugin_id = f"{NAMESPACE}::{DEFORM_GEMM}"

    def describe(
        weight: trtp.TensorDesc,
        columns: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        groups: int,
        has_bias: int,
    ) -> trtp.TensorDesc:
        _check_rank("weight", weight, 4)
        _check_rank("columns", columns, 4)
        shape = gemm_output_shape(weight.shape_expr, columns.shape_expr)
        return trtp.from_shape_expr(shape, dtype=columns.dtype)

    _describe_once(trtp, DEFORM_GEMM, describe)

    @trtp.autotune(plugin_id)
    def tune(weight, columns, bias, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(TYPE_COMBINATIONS[DEFORM_GEMM], "LINEAR")]

    @trtp.aot_impl(plugin_id)
    def compile_kernel(
        weight, columns, bias, groups, has_bias, outputs, tactic
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        kernel = compile_for_tensorrt(
            "deform_gemm",
            target_arch(),
            _dtype_name(trt, columns.dtype),
            HAS_BIAS=bool(has_bias),
        )
        weight_shape, columns_shape = weight.shape_expr, columns.shape_expr
        launch = gemm_launch(
            columns_shape[0],
            weight_shape[0],
            weight_shape[1],
            weight_shape[2],
            weight_shape[3],
            columns_shape[2],
            columns_shape[3],
            groups=int(groups),
            block_m=kernel.metadata.constexprs["BLOCK_M"],
            block_n=kernel.metadata.constexprs["BLOCK_N"],
            ceil_div=trtp.cdiv,
        )
        return _aot_result(trtp, kernel, launch)
