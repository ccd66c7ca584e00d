"""The PTX each plugin variant hands TensorRT: compiled by ``compile_ptx``, parameters reordered.

TensorRT's launcher passes ``(input pointers, scalar arguments, output pointers)`` followed by
nulls; the kernels are compiled as ``(pointers, scalars, 2 scratch pointers)``. These tests check
the reordered entry by name, assemble it with the ``ptxas`` that ships with Triton, and read the
kernel parameter table of the resulting cubin: the byte sizes by position must be TensorRT's
layout (8-byte pointers, 4-byte scalars). Running the kernels needs a GPU (test_engine_gpu.py).

One subprocess compiles every variant, without ``TRITON_INTERPRET`` (which
tests/export/kernels/conftest.py sets for its tests' process, and which rules compilation out).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from export.kernels.compile import LaunchMetadata
from export.tensorrt.plugins import (
    gemm_launch,
    im2col_launch,
    ordered_scalars,
    roi_align_launch,
    scalar_parameters,
    tensorrt_parameter_order,
)

REPOSITORY = Path(__file__).resolve().parents[3]

# (kernel, arch, dtype, constexprs): the variants the plugins' aot_impl can ask for, each kernel
# in both dtypes and with its optional input on and off; sm_90a PTX for Hopper and the sm_80 PTX
# that every other GPU gets.
VARIANTS = [
    ("dynamic_roi_align", 90, "fp32", {}),
    ("dynamic_roi_align", 80, "fp16", {}),
    ("deform_im2col", 90, "fp32", {"HAS_MASK": True}),
    ("deform_im2col", 90, "fp16", {"HAS_MASK": False}),
    ("deform_gemm", 90, "fp32", {"HAS_BIAS": True}),
    ("deform_gemm", 90, "fp16", {"HAS_BIAS": False}),
]
IDS = [
    "-".join([name, f"sm{arch}", dtype, *(f"{key}={value}" for key, value in flags.items())])
    for name, arch, dtype, flags in VARIANTS
]

# The parameter order TensorRT launches with, written out from the kernels' signatures.
SCRATCH = ["global_scratch", "profile_scratch"]
TENSORRT_ORDER = {
    "dynamic_roi_align": [
        *["input_ptr", "rois_ptr", "offsets_ptr"],
        *["channels", "height", "width", "pooled_h", "pooled_w"],
        *["spatial_scale", "sampling_ratio", "aligned"],
        "output_ptr",
        *SCRATCH,
    ],
    "deform_im2col": [
        *["input_ptr", "offset_ptr", "mask_ptr"],
        *["channels", "height", "width", "out_w", "length", "kernel_h", "kernel_w"],
        *["stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "offset_groups"],
        "columns_ptr",
        *SCRATCH,
    ],
    "deform_gemm": [
        *["weight_ptr", "columns_ptr", "bias_ptr"],
        *["out_per_group", "reduction", "length", "groups"],
        "output_ptr",
        *SCRATCH,
    ],
}
INPUTS = 3  # every plugin has three tensor inputs and one output

# The launch resources of the compiled kernels, which the plugins hand TensorRT: 4 warps, and
# shared memory for the RoI sums and the GEMM tiles.
THREADS = 128
SHARED_MEMORY = {
    ("dynamic_roi_align", "fp32"): 512,
    ("dynamic_roi_align", "fp16"): 512,
    ("deform_im2col", "fp32"): 0,
    ("deform_im2col", "fp16"): 0,
    ("deform_gemm", "fp32"): 32768,
    ("deform_gemm", "fp16"): 8192,
}

COMPILE_SCRIPT = """
import dataclasses, json, sys
from export.tensorrt.plugins import compile_for_tensorrt
results = []
for name, arch, dtype, constexprs in json.load(sys.stdin):
    kernel = compile_for_tensorrt(name, arch, dtype, **constexprs)
    results.append({"ptx": kernel.ptx, "metadata": dataclasses.asdict(kernel.metadata)})
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled() -> list[tuple[str, LaunchMetadata]]:
    """(TensorRT-ready PTX, its LaunchMetadata) of every variant, in VARIANTS order."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")])
    )
    process = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        input=json.dumps(VARIANTS),
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=environment,
        timeout=300,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    return [(result["ptx"], _metadata(result["metadata"])) for result in json.loads(process.stdout)]


def _metadata(fields: dict) -> LaunchMetadata:
    tuples = {"parameters", "parameter_types"}
    return LaunchMetadata(
        **{key: tuple(value) if key in tuples else value for key, value in fields.items()}
    )


def declared_parameters(ptx: str, metadata: LaunchMetadata) -> list[str]:
    """The entry's parameters in declaration order, as the kernel's parameter names."""
    entry = re.search(rf"\.entry\s+{metadata.entry_name}\s*\(([^)]*)\)", ptx)
    assert entry is not None
    indices = [int(index) for index in re.findall(r"_param_(\d+)\s*(?:,|$)", entry.group(1))]
    return [metadata.parameters[index] for index in indices]


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=IDS)
def test_the_entry_declares_inputs_then_scalars_then_the_output(compiled, variant):
    ptx, metadata = compiled[variant]
    name, arch, dtype, constexprs = VARIANTS[variant]
    assert declared_parameters(ptx, metadata) == TENSORRT_ORDER[name]
    assert metadata.arch == arch and metadata.dtype == dtype
    assert all(metadata.constexprs[key] == value for key, value in constexprs.items())
    assert metadata.threads_per_block == THREADS
    assert metadata.shared_memory == SHARED_MEMORY[name, dtype]
    assert metadata.global_scratch_size == metadata.profile_scratch_size == 0


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=IDS)
def test_the_reordered_ptx_assembles_to_tensorrt_s_parameter_layout(compiled, variant, tmp_path):
    from triton.backends.nvidia.compiler import get_ptxas

    ptx, metadata = compiled[variant]
    ptxas = Path(get_ptxas(metadata.arch).path)
    cuobjdump = ptxas.with_name("cuobjdump")
    if not cuobjdump.exists():
        pytest.skip(f"no cuobjdump beside {ptxas} to read the cubin's parameter table")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    (tmp_path / "kernel.ptx").write_text(ptx)
    subprocess.run(
        [str(ptxas), f"-arch={target}", "kernel.ptx", "-o", "kernel.cubin"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    listing = subprocess.run(
        [str(cuobjdump), "-elf", "kernel.cubin"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    sizes = {
        int(ordinal, 16): int(size, 16)
        for ordinal, size in re.findall(
            r"Ordinal\s*:\s*(0x[0-9a-f]+).*?Size\s*:\s*(0x[0-9a-f]+)", listing
        )
    }
    scalars = len(scalar_parameters(metadata))
    assert [sizes[ordinal] for ordinal in sorted(sizes)] == [8] * INPUTS + [4] * scalars + [8] * 3


def test_each_plugin_s_scalars_are_exactly_its_kernel_s_scalar_parameters(compiled):
    """The launch functions name every scalar the kernel takes, and ordered_scalars lines them up
    in the kernel's order (the values are checked in test_launch.py)."""
    by_kernel = {VARIANTS[index][0]: metadata for index, (_, metadata) in enumerate(compiled)}
    launches = {
        "dynamic_roi_align": roi_align_launch(
            1, 2, 3, 4, 5, 6, spatial_scale=1.0, sampling_ratio=0, aligned=1, block_c=64
        ),
        "deform_im2col": im2col_launch(
            1,
            2,
            3,
            4,
            5,
            6,
            kernel_shape=(3, 3),
            strides=(1, 1),
            pads=(1, 1),
            dilations=(1, 1),
            offset_groups=1,
            block_l=64,
            block_c=16,
        ),
        "deform_gemm": gemm_launch(1, 2, 3, 3, 3, 5, 6, groups=1, block_m=64, block_n=64),
    }
    for name, launch in launches.items():
        metadata = by_kernel[name]
        ordered = ordered_scalars(metadata, launch.scalars)
        assert ordered == tuple(launch.scalars[key] for key in scalar_parameters(metadata))
        assert list(scalar_parameters(metadata)) == TENSORRT_ORDER[name][INPUTS:-3]


def test_ordered_scalars_rejects_a_missing_or_unknown_scalar(compiled):
    _, metadata = compiled[0]
    launch = roi_align_launch(
        1, 1, 1, 1, 1, 1, spatial_scale=1.0, sampling_ratio=0, aligned=1, block_c=64
    )
    incomplete = dict(launch.scalars)
    del incomplete["aligned"]
    with pytest.raises(ValueError, match="takes the scalars"):
        ordered_scalars(metadata, incomplete)
    with pytest.raises(ValueError, match="takes the scalars"):
        ordered_scalars(metadata, {**launch.scalars, "stride": 1})


def toy_metadata(parameters: list[tuple[str, str]]) -> LaunchMetadata:
    return LaunchMetadata(
        entry_name="toy",
        arch=90,
        dtype="fp32",
        parameters=tuple(name for name, _ in parameters),
        parameter_types=tuple(kind for _, kind in parameters),
        constexprs={},
        num_warps=4,
        threads_per_block=128,
        shared_memory=0,
        global_scratch_size=0,
        profile_scratch_size=0,
    )


def test_tensorrt_order_moves_the_last_pointer_behind_the_scalars():
    metadata = toy_metadata(
        [
            *[("a", "*fp32"), ("b", "*fp32"), ("out", "*fp32"), ("n", "i32"), ("s", "fp32")],
            *[("global_scratch", "*i8"), ("profile_scratch", "*i8")],
        ]
    )
    assert tensorrt_parameter_order(metadata) == [0, 1, 3, 4, 2, 5, 6]


@pytest.mark.parametrize(
    "parameters",
    [
        [("a", "*fp32"), ("n", "i32"), ("out", "*fp32")],  # a pointer after a scalar
        [("out", "*fp32"), ("n", "i32")],  # no input pointer left
    ],
)
def test_tensorrt_order_rejects_kernels_it_cannot_map(parameters):
    with pytest.raises(ValueError):
        tensorrt_parameter_order(toy_metadata(parameters))
