"""Ahead-of-time compilation of every kernel to PTX, for sm_80 and sm_90, without a GPU.

This test process interprets the kernels (see conftest.py), which rules out compiling them here:
one subprocess without TRITON_INTERPRET compiles them all, as a build step would. Every PTX is
then checked the way a driver would take it: its ``.version`` line is an ISA that CUDA 12.8
drivers load, and ``ptxas`` (the one in the ``triton`` wheel) assembles it for its target.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from export.kernels.compile import KERNEL_NAMES, compile_ptx
from export.kernels.ptx import MIN_DRIVER_CUDA, PTX_ISA_VERSION, loadable_isa, ptx_isa_version

REPOSITORY = Path(__file__).resolve().parents[3]
ARCHS = (80, 90)
DTYPES = ("fp32", "fp16")
# (kernel, arch, dtype, constexpr overrides) of every compilation the tests look at.
REQUESTS = [(name, arch, dtype, {}) for name in KERNEL_NAMES for arch in ARCHS for dtype in DTYPES]
REQUESTS.append(("deform_im2col", 90, "fp32", {"HAS_MASK": False, "BLOCK_L": 32}))

COMPILE_SCRIPT = """
import dataclasses, json, sys
from export.kernels.compile import compile_ptx
results = []
for name, arch, dtype, constexprs in json.load(sys.stdin):
    ptx, metadata = compile_ptx(name, arch, dtype, **constexprs)
    results.append({"ptx": ptx, "metadata": dataclasses.asdict(metadata)})
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, tuple[str, dict]]:
    """(kernel, arch, dtype, overrides as a sorted tuple) -> (PTX, LaunchMetadata as a dict)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")])
    )
    process = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        input=json.dumps(REQUESTS),
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=environment,
        timeout=300,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    results = json.loads(process.stdout)
    return {
        (name, arch, dtype, tuple(sorted(overrides.items()))): (result["ptx"], result["metadata"])
        for (name, arch, dtype, overrides), result in zip(REQUESTS, results, strict=True)
    }


def entry_parameters(ptx: str, entry_name: str) -> list[str]:
    """The ``.param`` declarations of the PTX entry point ``entry_name``."""
    match = re.search(rf"\.entry {entry_name}\((.*?)\)", ptx, flags=re.DOTALL)
    assert match, f"no .entry {entry_name} in the PTX"
    return re.findall(r"\.param\b", match.group(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_every_kernel_compiles_to_ptx_for_its_target(compiled, kernel_name, arch, dtype):
    ptx, metadata = compiled[kernel_name, arch, dtype, ()]

    # sm_90 kernels target sm_90a (Hopper's architecture-specific features).
    assert re.search(rf"^\.target sm_{arch}a?$", ptx, flags=re.MULTILINE)
    assert metadata["entry_name"] == f"{kernel_name}_kernel"
    # The launcher passes exactly the parameters the metadata lists, in that order.
    assert len(entry_parameters(ptx, metadata["entry_name"])) == len(metadata["parameters"])
    assert metadata["parameters"][-2:] == ["global_scratch", "profile_scratch"]
    assert metadata["threads_per_block"] == 32 * metadata["num_warps"]
    assert (metadata["arch"], metadata["dtype"]) == (arch, dtype)
    # Pointers to the requested dtype: PTX moves 16-bit values to or from memory only for fp16.
    assert ("ld.global.b16" in ptx or "st.global.b16" in ptx) == (dtype == "fp16")


def test_fp16_kernels_take_fp16_data_but_float32_boxes(compiled):
    _, metadata = compiled["dynamic_roi_align", 90, "fp16", ()]
    types = dict(zip(metadata["parameters"], metadata["parameter_types"], strict=True))
    # Box corners in float16 would be off by up to a pixel at 1500 pixels.
    assert types["rois_ptr"] == "*fp32"
    assert types["input_ptr"] == types["offsets_ptr"] == types["output_ptr"] == "*fp16"
    assert (types["spatial_scale"], types["sampling_ratio"]) == ("fp32", "i32")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_gemm_uses_tensor_cores_for_fp16_and_full_fp32_products_for_fp32(compiled, arch):
    fp16, _ = compiled["deform_gemm", arch, "fp16", ()]
    fp32, _ = compiled["deform_gemm", arch, "fp32", ()]
    # Matrix instructions (mma on sm_80, wgmma on sm_90) on f16 operands; no TF32 for fp32.
    assert re.search(r"\bw?mma\S*\.f16\.f16", fp16)
    assert "mma" not in fp32 and "tf32" not in fp32 and "fma.rn.f32" in fp32


def test_constexpr_overrides_change_the_kernel(compiled):
    with_mask, _ = compiled["deform_im2col", 90, "fp32", ()]
    without_mask, metadata = compiled[
        "deform_im2col", 90, "fp32", (("BLOCK_L", 32), ("HAS_MASK", False))
    ]

    assert metadata["constexprs"]["HAS_MASK"] is False and metadata["constexprs"]["BLOCK_L"] == 32
    # The mask pointer stays a parameter (one parameter list for DCN v1 and v2) but is read only
    # by the v2 kernel.
    assert "mask_ptr" in metadata["parameters"]
    assert "[deform_im2col_kernel_param_2]" in with_mask
    assert "[deform_im2col_kernel_param_2]" not in without_mask


def test_bad_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown kernel"):
        compile_ptx("roi_pool")
    with pytest.raises(ValueError, match="arch must be one of"):
        compile_ptx("deform_gemm", arch=75)
    with pytest.raises(ValueError, match="dtype must be one of"):
        compile_ptx("deform_gemm", dtype="bf16")
    with pytest.raises(ValueError, match="has no constexpr"):
        compile_ptx("deform_gemm", BLOCK_Q=16)


def test_interpreted_kernels_cannot_be_compiled():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compile_ptx("deform_gemm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_the_ptx_isa_is_one_that_cuda_12_8_drivers_load(compiled, kernel_name, arch, dtype):
    ptx, _ = compiled[kernel_name, arch, dtype, ()]
    version = re.search(r"^\.version (\d+)\.(\d+)$", ptx, flags=re.MULTILINE)
    assert version, "the PTX has no .version line"
    assert (int(version.group(1)), int(version.group(2))) == (8, 7)
    assert ptx_isa_version(ptx) == PTX_ISA_VERSION <= loadable_isa((12, 8))


def test_cuda_12_8_is_the_oldest_driver_that_loads_the_pinned_isa():
    """docs/deploy.md states the driver range from MIN_DRIVER_CUDA: it must be exact."""
    assert MIN_DRIVER_CUDA == (12, 8)
    assert loadable_isa(MIN_DRIVER_CUDA) >= PTX_ISA_VERSION > loadable_isa((12, 7))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel_name", KERNEL_NAMES)
def test_ptxas_assembles_the_ptx_for_its_target(compiled, kernel_name, arch, dtype, tmp_path):
    from triton.backends.nvidia.compiler import get_ptxas

    ptx, _ = compiled[kernel_name, arch, dtype, ()]
    target = re.search(r"^\.target\s+(\S+)", ptx, flags=re.MULTILINE).group(1)
    assert target == ("sm_90a" if arch == 90 else "sm_80")
    (tmp_path / "kernel.ptx").write_text(ptx)
    process = subprocess.run(
        [get_ptxas(arch).path, f"-arch={target}", "kernel.ptx", "-o", "kernel.cubin"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    assert (tmp_path / "kernel.cubin").stat().st_size > 0
