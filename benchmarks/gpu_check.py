"""One command for a GPU machine: is the GPU path right, and how fast is it?

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR [--parts ops triton ...]
                                                [--repeat 5] [--train-iterations 3]

Sized for a short lease (under 8 minutes on one H100 with every part), from a plain checkout
with no psearch install. Each part checks what it needs and is skipped, with the reason, when it
is missing; on a machine without a GPU every part is skipped and the script exits 0. It prints
one table per part and writes ``DIR/gpu_check.json`` (the machine, then each part: its status,
its reason or error, its rows). The exit status is 1 when a part failed or a check in it did
(a result off by more than its tolerance, a non-finite loss), else 0.

Parts:

- ``ops``: psearch's ops on CUDA (their PyTorch implementations, what training runs) against
  torchvision's CUDA kernels: ``roi_align`` (aligned), ``deform_conv2d`` v1 and v2, forward and
  backward, and ``nms`` forward; in float32, float16 and under autocast (float16). Results and
  gradients must agree within the dtype's tolerance and have torchvision's dtype; times as
  ratios ours / torchvision.
- ``triton``: the Triton kernels of ``export/kernels`` against the ops on the GPU.
- ``aot_ptx``: the ahead-of-time PTX of the TensorRT plugins (ISA 8.7), loaded through the
  driver API (CuPy, or cuda-python) and launched with the plugins' own launch parameters and
  parameter order, against the ops.
- ``latency``: eager inference of every paper config in ``configs/*.yaml``, 1500x900, batch 1
  and 8, float32 and AMP.
- ``training``: a few AMP training iterations of every paper config at its batch size, on
  synthetic 1500x900 images: losses finite, peak memory.
- ``tensorrt``: the TensorRT engine tests (``tests/export/tensorrt``) when TensorRT and pytest are
  importable.
- ``faiss_gpu``: exact and IVF search on the GPU against the CPU, through ``indexer.index``.
- ``cuda_graphs``: whether replaying the batch-1 forward as a CUDA graph helps, per config (last:
  a failed capture may leave CUDA unusable). torch.compile is not tried: compiling ResNet-50
  models takes minutes each, beyond a short lease.

Configs are found by globbing ``configs/*.yaml``: new paper configs join without a change here.
Speed figures are ratios measured side by side in one run; they are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(ROOT))

from export.kernels.ptx import PTX_ISA_VERSION, driver_cuda_version, driver_version  # noqa: E402

PAPER_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Largest error relative to the reference's largest magnitude, by the dtype of the result.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
PARTS = (
    "ops",
    "triton",
    "aot_ptx",
    "latency",
    "training",
    "tensorrt",
    "faiss_gpu",
    "cuda_graphs",
)


class Skip(Exception):
    """The part cannot run on this machine; the message says why."""


@dataclass
class PartResult:
    name: str
    status: str = "ok"  # ok, skipped, failed
    reason: str = ""
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, passed: bool, what: str) -> bool:
        """Record a check; a failed one fails the part."""
        if not passed:
            self.failures.append(what)
            self.status = "failed"
        return passed


# --------------------------------------------------------------------------------------------
# Requirements and timing


def needs_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (torch.cuda.is_available() is False)")


def needs_module(name: str, purpose: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise Skip(f"{name} is not installed ({purpose})")


@contextmanager
def imports_of(part: str) -> Iterator[None]:
    """A missing package skips the part, named (a bare GPU machine has no package index: carry
    the wheel) instead of failing it."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise Skip(
            f"{error.name} is not installed ({part} imports it; without a package index, carry "
            "its wheel)"
        ) from None


def needs_compiled_triton() -> None:
    needs_module("triton", "the kernels are Triton kernels")
    if os.environ.get("TRITON_INTERPRET"):
        raise Skip("TRITON_INTERPRET is set: Triton would interpret the kernels, not compile them")


def cuda_ms(function: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    """Median milliseconds of ``function`` on the current stream, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    scale = max(reference.abs().max().item(), 1e-12)
    return (value.double() - reference).abs().max().item() / scale


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "packages": {
            name: version_of(name)
            for name in (
                "triton",
                "torchvision",
                "cupy-cuda12x",
                "cupy-cuda13x",
                "cuda-python",
                "tensorrt",
                "tensorrt-cu12",
                "onnxruntime-gpu",
                "onnxruntime",
                "faiss-gpu-cu12",
                "pytest",
            )
        },
        "plugin_ptx_isa": f"{PTX_ISA_VERSION // 10}.{PTX_ISA_VERSION % 10}",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["compute_capability"] = list(torch.cuda.get_device_capability())
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    try:
        info["driver_cuda"] = ".".join(map(str, driver_cuda_version()))
        info["driver_version"] = driver_version()
    except RuntimeError as error:
        info["driver_cuda"] = f"unavailable: {error}"
    return info


# --------------------------------------------------------------------------------------------
# ops: psearch's ops against torchvision's CUDA kernels


def _deform_tensors(
    generator: torch.Generator, channels: int, out_channels: int, size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """DCNv2 inputs of a 3x3, padding-1 convolution on the GPU (float32)."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).cuda()

    return {
        "features": randn(2, channels, *size),
        "offset": randn(2, 18, *size, scale=2.0),
        "weight": randn(out_channels, channels, 3, 3, scale=0.02),
        "bias": randn(out_channels),
        "mask": torch.rand(2, 9, *size, generator=generator).cuda(),
    }


def _op_cases(generator: torch.Generator) -> dict[str, dict[str, Any]]:
    """Inputs at the sizes of a 1216 x 800 image's stride-8 map (float32, on the GPU)."""
    corners = torch.rand(512, 2, generator=generator) * torch.tensor([1100.0, 700.0])
    sizes = 16 + torch.rand(512, 2, generator=generator) * 200
    batch_index = torch.randint(0, 2, (512, 1), generator=generator).float()
    rois = torch.cat([batch_index, corners, corners + sizes], dim=1).cuda()
    deform = _deform_tensors(generator, 256, 256, (100, 152))
    boxes = torch.cat([corners, corners + sizes], dim=1)[:, None].repeat(1, 10, 1).view(-1, 4)
    boxes = (boxes + torch.randn(boxes.shape, generator=generator) * 20).cuda()
    scores = torch.rand(boxes.shape[0], generator=generator).cuda()
    v1 = {name: deform[name] for name in ("features", "offset", "weight", "bias")}
    return {
        "roi_align": {"tensors": {"features": deform["features"], "rois": rois}},
        "deform_conv2d_v1": {"tensors": v1},
        "deform_conv2d_v2": {"tensors": deform},
        "nms": {"tensors": {"boxes": boxes, "scores": scores}},
    }


# What an autocast region hands the ops: activations in float16, parameters and boxes float32.
ACTIVATIONS = ("features", "offset", "mask", "scores")
NOT_DIFFERENTIABLE = ("rois", "boxes", "scores")


def _op_calls(name: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(ours, torchvision's) for the case ``name``, both called with the case's tensors."""
    import torchvision.ops as tv

    import models.ops as ops

    if name == "roi_align":
        return (
            lambda features, rois: ops.roi_align(features, rois, 7, 0.125, 2, True),
            lambda features, rois: tv.roi_align(features, rois, 7, 0.125, 2, True),
        )
    if name == "nms":
        return (
            lambda boxes, scores: ops.nms(boxes, scores, 0.5),
            lambda boxes, scores: tv.nms(boxes, scores, 0.5),
        )
    return (
        lambda features, offset, weight, bias, mask=None: ops.deform_conv2d(
            features, offset, weight, bias, 1, 1, 1, mask
        ),
        lambda features, offset, weight, bias, mask=None: tv.deform_conv2d(
            features, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask
        ),
    )


def _in_mode(tensors: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """fp32: as they are; fp16: every float tensor in float16; autocast: activations only."""
    if mode == "fp32":
        return dict(tensors)
    return {
        name: tensor.half() if mode == "fp16" or name in ACTIVATIONS else tensor
        for name, tensor in tensors.items()
    }


def _run_op(function, tensors, mode, dtype=None):
    """Output and the gradients of a fixed projection of it w.r.t. every float input but the
    boxes; ``dtype``: first cast the float tensors to it (the float64 reference)."""
    leaves = {}
    for name, tensor in tensors.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        leaves[name] = (
            tensor.detach()
            .clone()
            .requires_grad_(tensor.is_floating_point() and name not in NOT_DIFFERENTIABLE)
        )
    with torch.autocast("cuda", dtype=torch.float16, enabled=mode == "autocast"):
        output = function(**leaves)
    names = [name for name, leaf in leaves.items() if leaf.requires_grad]
    if not names:
        return output, {}
    weights = torch.linspace(-1, 1, output.numel(), device=output.device).view(output.shape)
    loss = (output.double() * weights).sum()
    gradients = torch.autograd.grad(loss, [leaves[name] for name in names])
    return output.detach(), dict(zip(names, gradients, strict=True))


def _worst_error(values, gradients, reference, reference_gradients) -> float:
    errors = [relative_error(values, reference)]
    errors += [relative_error(gradients[k], reference_gradients[k]) for k in gradients]
    return max(errors)


def _tolerance(*tensors: torch.Tensor) -> float:
    """By the least precise dtype among the results: float32 1e-4, half precision 1e-2."""
    return max(1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-4 for t in tensors)


def check_ops(args: argparse.Namespace, result: PartResult) -> None:
    needs_cuda()
    needs_module("torchvision", "the reference CUDA kernels")
    with imports_of("models.ops"):
        import models.ops  # noqa: F401
    for name, case in _op_cases(torch.Generator().manual_seed(0)).items():
        ours, theirs = _op_calls(name)
        for mode in ("fp32", "fp16", "autocast"):
            tensors = _in_mode(case["tensors"], mode)
            out, out_grads = _run_op(ours, tensors, mode)
            ref, ref_grads = _run_op(theirs, tensors, mode)
            row: dict[str, Any] = {"op": name, "mode": mode}
            if name == "nms":
                row["same_kept_boxes"] = result.check(
                    torch.equal(out, ref), f"nms {mode}: kept boxes differ from torchvision"
                )
            else:
                exact, exact_grads = _run_op(ours, tensors, "fp32", dtype=torch.float64)
                row["dtype"] = str(out.dtype).removeprefix("torch.")
                row["torchvision_dtype"] = str(ref.dtype).removeprefix("torch.")
                result.check(out.dtype == ref.dtype, f"{name} {mode}: dtype unlike torchvision's")
                row["error_ours"] = _worst_error(out, out_grads, exact, exact_grads)
                row["error_torchvision"] = _worst_error(ref, ref_grads, exact, exact_grads)
                row["ours_vs_torchvision"] = _worst_error(out, out_grads, ref, ref_grads)
                tolerance = _tolerance(out, *out_grads.values())
                result.check(
                    row["error_ours"] <= tolerance,
                    f"{name} {mode}: error {row['error_ours']:.2e} > {tolerance:g}",
                )
            for label, function in (("ours", ours), ("torchvision", theirs)):
                forward = functools.partial(_forward_only, function, tensors, mode)
                row[f"fwd_ms_{label}"] = cuda_ms(forward, args.repeat)
                if out_grads:
                    both = functools.partial(_run_op, function, tensors, mode)
                    row[f"fwd_bwd_ms_{label}"] = cuda_ms(both, args.repeat)
            row["fwd_ratio"] = row["fwd_ms_ours"] / row["fwd_ms_torchvision"]
            if out_grads:
                row["fwd_bwd_ratio"] = row["fwd_bwd_ms_ours"] / row["fwd_bwd_ms_torchvision"]
            result.rows.append(row)


def _forward_only(function, tensors, mode):
    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=mode == "autocast"):
        return function(**tensors)


# --------------------------------------------------------------------------------------------
# triton: the Triton kernels against the ops


def check_triton(args: argparse.Namespace, result: PartResult) -> None:
    needs_cuda()
    needs_compiled_triton()
    with imports_of("export.kernels"):
        import models.ops as ops
        from export.kernels.deform_conv import deform_conv2d_triton
        from export.kernels.dynamic_roi_align import dynamic_roi_align_triton

    case = _op_cases(torch.Generator().manual_seed(1))
    deform = case["deform_conv2d_v2"]["tensors"]
    features, rois = deform["features"], case["roi_align"]["tensors"]["rois"]
    offsets = 0.1 * torch.randn(rois.shape[0], 7, 7, 2, device="cuda")
    for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        x, shifts = features.to(dtype), offsets.to(dtype)
        d = _deform_args({k: v.to(dtype) for k, v in deform.items()})
        runs = {
            "dynamic_roi_align": (
                functools.partial(dynamic_roi_align_triton, x, rois, shifts, 0.125, 2, True),
                functools.partial(ops.dynamic_roi_align, x, rois.to(dtype), shifts, 7, 0.125, 2),
            ),
            "deform_conv2d (im2col + torch matmul)": (
                functools.partial(deform_conv2d_triton, *d, gemm="torch"),
                functools.partial(ops.deform_conv2d, *d),
            ),
            "deform_conv2d (im2col + Triton GEMM)": (
                functools.partial(deform_conv2d_triton, *d, gemm="triton"),
                functools.partial(ops.deform_conv2d, *d),
            ),
        }
        # The reference reads the same values in float32 (the kernel takes float32 boxes; the
        # op would round them to the data dtype).
        references = {
            "dynamic_roi_align": functools.partial(
                ops.dynamic_roi_align, x.float(), rois, shifts.float(), 7, 0.125, 2
            ),
        }
        for name, (kernel, op) in runs.items():
            with torch.no_grad():
                error = relative_error(kernel(), references.get(name, op)())
                row = {
                    "kernel": name,
                    "dtype": label,
                    "max_rel_error": error,
                    "triton_ms": cuda_ms(kernel, args.repeat),
                    "op_ms": cuda_ms(op, args.repeat),
                }
            row["ratio"] = row["triton_ms"] / row["op_ms"]
            result.check(error <= TOLERANCE[label], f"{name} {label}: error {error:.2e}")
            result.rows.append(row)


def _deform_args(tensors: dict[str, torch.Tensor]) -> tuple:
    t = tensors
    return t["features"], t["offset"], t["weight"], t["bias"], (1, 1), (1, 1), (1, 1), t["mask"]


# --------------------------------------------------------------------------------------------
# aot_ptx: the plugins' PTX through the driver API


class _CupyLauncher:
    """Loads PTX with CuPy (``cuModuleLoad``: the driver JIT-compiles it, as under TensorRT)."""

    name = "cupy"

    def __init__(self, ptx: str, entry: str, folder: Path) -> None:
        import cupy

        path = folder / f"{entry}.ptx"
        path.write_text(ptx)
        self.cupy = cupy
        self.function = cupy.RawModule(path=str(path)).get_function(entry)

    def launch(self, grid, block: int, shared: int, arguments: list[Any]) -> None:
        import numpy as np

        converted = [
            self.cupy.from_dlpack(a)
            if isinstance(a, torch.Tensor)
            else np.uint64(0)
            if a is None
            else np.int32(a)
            for a in arguments
        ]
        self.function(tuple(grid), (block, 1, 1), tuple(converted), shared_mem=shared)


class _CudaPythonLauncher:
    """Loads PTX with cuda-python's driver bindings (``cuModuleLoadData``)."""

    name = "cuda-python"

    def __init__(self, ptx: str, entry: str, folder: Path) -> None:
        try:
            from cuda.bindings import driver
        except ImportError:
            from cuda import cuda as driver
        self.driver = driver
        torch.cuda.init()  # PyTorch's primary context becomes current
        self.module = self._call(driver.cuModuleLoadData(ptx.encode() + b"\0"))
        self.function = self._call(driver.cuModuleGetFunction(self.module, entry.encode()))

    def _call(self, returned):
        error, *values = returned
        if int(error) != 0:
            raise RuntimeError(f"CUDA driver error {error}")
        return values[0] if values else None

    def launch(self, grid, block: int, shared: int, arguments: list[Any]) -> None:
        values = [
            ctypes.c_void_p(a.data_ptr())
            if isinstance(a, torch.Tensor)
            else ctypes.c_void_p(0)
            if a is None
            else ctypes.c_int32(a)
            for a in arguments
        ]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        stream = torch.cuda.current_stream().cuda_stream
        self._call(
            self.driver.cuLaunchKernel(
                self.function, *grid, block, 1, 1, shared, stream, ctypes.addressof(pointers), 0
            )
        )


def _launcher_class() -> type:
    if importlib.util.find_spec("cupy") is not None:
        return _CupyLauncher
    if importlib.util.find_spec("cuda") is not None:
        return _CudaPythonLauncher
    raise Skip("neither CuPy nor cuda-python is installed (the driver API to load the PTX)")


def _launch_plugin_kernel(launcher_class, folder, name, dtype, constexprs, launch, tensors):
    """Compile as the plugin does, load the PTX, launch with the plugin's launch parameters.

    ``tensors``: the inputs then the output, in TensorRT's order; the scalars go between them.
    """
    from export.tensorrt.plugins import compile_for_tensorrt, ordered_scalars, ptx_arch

    arch = ptx_arch(torch.cuda.get_device_capability())
    kernel = compile_for_tensorrt(name, arch, dtype, **constexprs)
    launcher = launcher_class(kernel.ptx, kernel.metadata.entry_name, folder)
    scalars = list(ordered_scalars(kernel.metadata, launch(kernel.metadata.constexprs).scalars))
    arguments = [*tensors[:-1], *scalars, tensors[-1], None, None]  # + the 2 scratch pointers
    grid = launch(kernel.metadata.constexprs).grid
    launcher.launch(
        grid, kernel.metadata.threads_per_block, kernel.metadata.shared_memory, arguments
    )
    torch.cuda.synchronize()
    return kernel, launcher.name


def check_aot_ptx(args: argparse.Namespace, result: PartResult) -> None:
    needs_cuda()
    needs_module("triton", "the plugins' kernels are compiled by Triton")
    launcher_class = _launcher_class()
    with imports_of("export.tensorrt.plugins"):
        from export.kernels.compile import compile_ptx  # noqa: F401
        from export.kernels.ptx import driver_rejection
        from export.tensorrt.plugins import compile_for_tensorrt  # noqa: F401

    driver = driver_cuda_version()
    result.check(driver_rejection(driver) is None, f"driver CUDA {driver} rejects the plugins")
    generator = torch.Generator().manual_seed(2)
    deform = _deform_tensors(generator, 32, 64, (50, 76))
    rois = _op_cases(generator)["roi_align"]["tensors"]["rois"][:64].contiguous()
    offsets = 0.1 * torch.randn(64, 7, 7, 2, generator=generator).cuda()
    with torch.no_grad(), tempfile.TemporaryDirectory() as temporary:
        for dtype, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            tensors = {name: tensor.to(torch_dtype) for name, tensor in deform.items()}
            tensors["offsets"] = offsets.to(torch_dtype)
            _check_roi_align_ptx(result, launcher_class, Path(temporary), dtype, tensors, rois)
            _check_deform_ptx(result, launcher_class, Path(temporary), dtype, tensors)


def _check_roi_align_ptx(result, launcher_class, folder, dtype, tensors, rois) -> None:
    import models.ops as ops
    from export.tensorrt.plugins import roi_align_launch

    features, offsets = tensors["features"], tensors["offsets"]
    pooled = features.new_empty(rois.shape[0], features.shape[1], 7, 7)
    kernel, used = _launch_plugin_kernel(
        launcher_class,
        folder,
        "dynamic_roi_align",
        dtype,
        {},
        lambda constexprs: roi_align_launch(
            rois.shape[0],
            *features.shape[1:],
            7,
            7,
            spatial_scale=0.125,
            sampling_ratio=2,
            aligned=1,
            block_c=constexprs["BLOCK_C"],
        ),
        [features, rois, offsets, pooled],  # boxes stay float32
    )
    expected = ops.dynamic_roi_align(features.float(), rois, offsets.float(), 7, 0.125, 2)
    _ptx_row(result, "dynamic_roi_align", dtype, kernel, used, pooled, expected)


def _check_deform_ptx(result, launcher_class, folder, dtype, tensors) -> None:
    import models.ops as ops
    from export.tensorrt.plugins import gemm_launch, im2col_launch

    t = tensors
    batch, channels, height, width = t["features"].shape
    out_channels = t["weight"].shape[0]
    columns = t["features"].new_empty(batch, channels * 9, height, width)
    _launch_plugin_kernel(
        launcher_class,
        folder,
        "deform_im2col",
        dtype,
        {"HAS_MASK": True},
        lambda constexprs: im2col_launch(
            batch,
            channels,
            height,
            width,
            height,
            width,
            kernel_shape=(3, 3),
            strides=(1, 1),
            pads=(1, 1),
            dilations=(1, 1),
            offset_groups=1,
            block_l=constexprs["BLOCK_L"],
            block_c=constexprs["BLOCK_C"],
        ),
        [t["features"], t["offset"], t["mask"], columns],
    )
    output = t["features"].new_empty(batch, out_channels, height, width)
    kernel, used = _launch_plugin_kernel(
        launcher_class,
        folder,
        "deform_gemm",
        dtype,
        {"HAS_BIAS": True},
        lambda constexprs: gemm_launch(
            batch,
            out_channels,
            channels,
            3,
            3,
            height,
            width,
            groups=1,
            block_m=constexprs["BLOCK_M"],
            block_n=constexprs["BLOCK_N"],
        ),
        [t["weight"], columns, t["bias"], output],
    )
    float32 = {name: tensor.float() for name, tensor in t.items()}
    expected = ops.deform_conv2d(*_deform_args(float32))
    _ptx_row(result, "deform_im2col + deform_gemm", dtype, kernel, used, output, expected)


def _ptx_row(result, name, dtype, kernel, launcher, output, expected) -> None:
    from export.kernels.ptx import ptx_isa_version

    error = relative_error(output, expected)
    result.rows.append(
        {
            "kernel": name,
            "dtype": dtype,
            "launcher": launcher,
            "ptx_isa": ptx_isa_version(kernel.ptx),
            "max_rel_error": error,
        }
    )
    result.check(error <= TOLERANCE[dtype], f"AOT {name} {dtype}: error {error:.2e}")


# --------------------------------------------------------------------------------------------
# latency and training: every paper config


@dataclass(frozen=True)
class ModelRun:
    """Where and how the model parts run: the paper configs on the GPU, or (``--smoke``) the
    tiny configs on the CPU, to check this script itself where there is no GPU."""

    device: str
    amp_dtype: torch.dtype
    configs: tuple[Path, ...]
    image_size: tuple[int, int]  # height, width
    padded_size: tuple[int, int]
    batches: tuple[int, ...]

    def config_list(self) -> str:
        return ", ".join(path.stem for path in self.configs)

    def require(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise Skip(
                "no CUDA device (torch.cuda.is_available() is False); would run "
                f"{self.config_list()}"
            )

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def milliseconds(self, function: Callable[[], Any], repeat: int) -> float:
        if self.device == "cuda":
            return cuda_ms(function, repeat)
        function()  # warm-up
        started = time.perf_counter()
        for _ in range(repeat):
            function()
        return (time.perf_counter() - started) * 1000 / repeat

    def reset_peak_memory(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None


GPU_RUN = ModelRun(
    device="cuda",
    amp_dtype=torch.float16,
    configs=tuple(PAPER_CONFIGS),
    image_size=(900, 1500),  # the papers' test size
    padded_size=(928, 1504),  # padded to a multiple of 32, as the preprocessing does
    batches=(1, 8),
)
SMOKE_RUN = ModelRun(
    device="cpu",
    amp_dtype=torch.bfloat16,
    configs=tuple(sorted((ROOT / "configs/tiny").glob("*.yaml"))),
    image_size=(60, 90),
    padded_size=(64, 96),
    batches=(2,),
)


def _models(run: ModelRun):
    """(config path, TrainConfig, model) of every config; a config that does not build is
    reported as (path, None, the error), not fatal."""
    with imports_of("the model parts (models/, training/)"):
        import models
        from training.config import load_config
        from training.trainer import build_optimizer  # noqa: F401  (the training part's)

    for path in run.configs:
        try:
            config = load_config(path)
            torch.manual_seed(0)
            model = models.build_model(config.model)
        except Exception as error:  # a config of a family this checkout cannot build
            yield path, None, f"{type(error).__name__}: {error}"
            continue
        yield path, config, model.to(run.device)


def _images(run: ModelRun, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded batch of random images of ``run.image_size`` and their sizes."""
    images = torch.zeros(batch, 3, *run.padded_size, device=run.device)
    height, width = run.image_size
    images[:, :, :height, :width] = torch.randn(batch, 3, height, width, device=run.device)
    sizes = torch.tensor([run.image_size] * batch, device=run.device, dtype=torch.float32)
    return images, sizes


def _infer(run: ModelRun, model: torch.nn.Module, images, sizes, amp: bool) -> Any:
    with torch.no_grad(), torch.autocast(run.device, run.amp_dtype, enabled=amp):
        return model(images, image_sizes=sizes)


def check_latency(args: argparse.Namespace, result: PartResult) -> None:
    run = args.run
    run.require()
    for path, config, model in _models(run):
        if config is None:
            result.check(False, f"{path.name}: does not build ({model})")
            continue
        model.eval()
        search = getattr(model, "embedding_dim", 0) > 0
        for batch in run.batches:
            images, sizes = _images(run, batch)
            for amp in (False, True):
                forward = functools.partial(_infer, run, model, images, sizes, amp)
                run.reset_peak_memory()
                milliseconds = run.milliseconds(forward, args.repeat)
                result.rows.append(
                    {
                        "config": path.stem,
                        "search_model": search,
                        "batch": batch,
                        "precision": "amp" if amp else "fp32",
                        "ms_per_batch": milliseconds,
                        "ms_per_image": milliseconds / batch,
                        "peak_gib": run.peak_gib(),
                    }
                )
        del model


def check_cuda_graphs(args: argparse.Namespace, result: PartResult) -> None:
    """Batch 1 replayed as a CUDA graph against eager, per config. Last, because a capture that
    fails (a host sync inside the forward) may leave CUDA unusable for the rest of the run."""
    run = args.run
    if run.device != "cuda":
        raise Skip("CUDA graphs need the GPU run (not --smoke)")
    run.require()
    images, sizes = _images(run, 1)
    for path, config, model in _models(run):
        if config is None:
            result.check(False, f"{path.name}: does not build ({model})")
            continue
        model.eval()
        for amp in (False, True):
            forward = functools.partial(_infer, run, model, images, sizes, amp)
            result.rows.append(
                {
                    "config": path.stem,
                    "precision": "amp" if amp else "fp32",
                    "eager_ms": cuda_ms(forward, args.repeat),
                    "cuda_graph": _cuda_graph_ms(forward, args.repeat),
                }
            )
        del model


def _cuda_graph_ms(forward: Callable[[], Any], repeat: int) -> str:
    """The forward replayed as a CUDA graph, or why it cannot be captured (a sync inside)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        return f"{cuda_ms(graph.replay, repeat):.2f} ms"
    except Exception as error:
        torch.cuda.synchronize()
        return f"not capturable: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def _targets(run: ModelRun, batch: int, generator: torch.Generator) -> list[dict[str, Any]]:
    """Per image: 6 people inside the image, ids 0-3 and one unlabeled (-1); no ignored boxes.
    Ids this small fit every dataset's identity table."""
    height, width = run.image_size
    targets = []
    for _ in range(batch):
        size = torch.tensor([width, height]) * (0.1 + 0.2 * torch.rand(6, 2, generator=generator))
        corner = (torch.tensor([width, height]) - size) * torch.rand(6, 2, generator=generator)
        targets.append(
            {
                "boxes": torch.cat([corner, corner + size], dim=1).to(run.device),
                "pids": torch.tensor([0, 1, 2, 3, -1, 0], device=run.device),
                "ignore_boxes": torch.zeros(0, 4, device=run.device),
            }
        )
    return targets


def check_training(args: argparse.Namespace, result: PartResult) -> None:
    """A few AMP iterations as the trainer takes them (training/trainer.py, ``Trainer._step``):
    autocast forward, summed losses, scaled backward, optimizer step."""
    run = args.run
    run.require()
    from training.trainer import build_optimizer

    generator = torch.Generator().manual_seed(0)
    for path, config, model in _models(run):
        if config is None:
            result.check(False, f"{path.name}: does not build ({model})")
            continue
        model.train()
        optimizer = build_optimizer(model, config)
        scaler = torch.amp.GradScaler(run.device)
        batch = config.data.batch_size
        images, sizes = _images(run, batch)
        run.reset_peak_memory()
        losses: dict[str, float] = {}
        started = time.perf_counter()
        for _ in range(args.train_iterations):
            targets = _targets(run, batch, generator)
            with torch.autocast(run.device, dtype=run.amp_dtype):
                named = model(images, targets, image_sizes=sizes)
            total = sum(named.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            losses = {name: float(value.detach()) for name, value in named.items()}
        run.synchronize()
        finite = all(math.isfinite(value) for value in losses.values())
        result.check(finite, f"{path.stem}: non-finite losses {losses}")
        result.rows.append(
            {
                "config": path.stem,
                "batch": batch,
                "iterations": args.train_iterations,
                "s_per_iteration": (time.perf_counter() - started) / args.train_iterations,
                "peak_gib": run.peak_gib(),
                "losses_finite": finite,
                "last_losses": losses,
            }
        )
        del model, optimizer


# --------------------------------------------------------------------------------------------
# tensorrt and faiss_gpu


def check_tensorrt(args: argparse.Namespace, result: PartResult) -> None:
    needs_cuda()
    from export.tensorrt import TensorRTUnavailableError, require_tensorrt

    try:
        trt = require_tensorrt()
    except TensorRTUnavailableError as error:
        raise Skip(str(error).split(". ")[0]) from None
    for module in ("pytest", "hypothesis", "onnx"):
        needs_module(module, "the TensorRT engine tests need it")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/export/tensorrt",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    process = subprocess.run(
        command,
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=args.tensorrt_timeout,
        check=False,
    )
    summary = (
        process.stdout.strip().splitlines()[-1] if process.stdout.strip() else process.stderr[-300:]
    )
    result.rows.append(
        {"tensorrt": trt.__version__, "pytest": summary, "exit_status": process.returncode}
    )
    result.check(process.returncode == 0, f"TensorRT engine tests: {summary}")


def check_faiss_gpu(args: argparse.Namespace, result: PartResult) -> None:
    needs_module("faiss", "faiss-gpu-cu12")
    import numpy as np

    with imports_of("indexer.index"):
        from indexer.index import VectorIndex, gpu_available, resolve_spec

    if not gpu_available():
        raise Skip("this FAISS build has no GPU support or sees no GPU")
    rng = np.random.default_rng(0)
    dim, count = 256, args.faiss_vectors
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(count, 1000, replace=False)] + 0.05 * rng.standard_normal(
        (1000, dim), dtype=np.float32
    )
    ids = np.arange(count, dtype=np.int64)
    for index_type in ("flat", "ivf_flat"):
        timings, found = {}, {}
        for gpu in (False, True):
            spec = resolve_spec(index_type, dim, count, gpu=gpu)
            index = VectorIndex.new(spec, dim, training=vectors if spec.needs_training else None)
            index.add(ids, vectors)
            index.search(queries[:10], 10)  # the GPU copy is made on first use
            started = time.perf_counter()
            _, found[gpu] = index.search(queries, 10)
            timings[gpu] = time.perf_counter() - started
        agreement = float(
            np.mean(
                [len(set(a) & set(b)) / 10 for a, b in zip(found[False], found[True], strict=True)]
            )
        )
        if index_type == "flat":
            result.check(agreement == 1.0, f"exact search on GPU agrees on {agreement:.1%}")
        result.rows.append(
            {
                "index": index_type,
                "vectors": count,
                "queries": 1000,
                "cpu_ms": timings[False] * 1000,
                "gpu_ms": timings[True] * 1000,
                "gpu_over_cpu": timings[True] / timings[False],
                "top10_agreement": agreement,
            }
        )


CHECKS: dict[str, Callable[[argparse.Namespace, PartResult], None]] = {
    "ops": check_ops,
    "triton": check_triton,
    "aot_ptx": check_aot_ptx,
    "latency": check_latency,
    "training": check_training,
    "tensorrt": check_tensorrt,
    "faiss_gpu": check_faiss_gpu,
    "cuda_graphs": check_cuda_graphs,
}


# --------------------------------------------------------------------------------------------
# Running and reporting


def run_part(name: str, args: argparse.Namespace) -> PartResult:
    result = PartResult(name)
    started = time.perf_counter()
    try:
        CHECKS[name](args, result)
    except Skip as reason:
        result.status, result.reason = "skipped", str(reason)
    except Exception as error:
        result.status = "failed"
        result.reason = f"{type(error).__name__}: {error}"
        result.failures.append(traceback.format_exc(limit=6))
    result.seconds = time.perf_counter() - started
    return result


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return str(value)


def print_table(result: PartResult) -> None:
    headline = f"== {result.name}: {result.status} ({result.seconds:.0f} s)"
    print(headline + (f": {result.reason}" if result.reason else ""))
    if result.rows:
        columns = list(dict.fromkeys(key for row in result.rows for key in row))
        cells = [[format_value(row.get(column, "")) for column in columns] for row in result.rows]
        widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for line in cells:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    for failure in result.failures:
        print(f"  FAILED: {failure}")
    print()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--train-iterations", type=int, default=3)
    parser.add_argument("--faiss-vectors", type=int, default=200_000)
    parser.add_argument("--tensorrt-timeout", type=int, default=300, help="seconds")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check this script without a GPU: the model parts on the CPU, on configs/tiny",
    )
    args = parser.parse_args(argv)
    args.run = SMOKE_RUN if args.smoke else GPU_RUN
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "parts": {}}
    print(json.dumps(report["machine"], indent=1), end="\n\n")
    for name in args.parts:
        result = run_part(name, args)
        print_table(result)
        report["parts"][name] = asdict(result)
        # Written after every part: a lease that ends mid-run keeps what was measured.
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [name for name, part in report["parts"].items() if part["status"] == "failed"]
    print(f"failed: {', '.join(failed)}" if failed else "no part failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
