"""The plugins' launch arithmetic, against the launches the kernels' own PyTorch launchers make.

Each kernel is replaced by a recorder while its launcher (``export.kernels``) runs on small CPU
tensors: the recorder keeps the grid and the arguments, and the plugin's arithmetic, evaluated on
plain ints, must reproduce them. On the GPU the same functions run on TensorRT's symbolic shapes.
"""

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export.kernels import deform_conv, dynamic_roi_align
from export.kernels.ptx import driver_rejection, ptx_isa_version
from export.tensorrt.plugins import (
    Launch,
    dynamic_roi_align_output_shape,
    float32_bits,
    gemm_launch,
    gemm_output_shape,
    im2col_launch,
    im2col_output_shape,
    ptx_arch,
    reorder_entry_parameters,
    roi_align_launch,
)


class RecordingKernel:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](*args, **constexprs)`` records."""

    def __init__(self, arg_names: list[str]) -> None:
        self.arg_names = arg_names
        self.launches: list[tuple[tuple[int, ...], dict]] = []

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args, **constexprs) -> None:
            self.launches.append((grid, dict(zip(self.arg_names, args, strict=False))))

        return launch


def record(
    patch: pytest.MonkeyPatch, module, kernel_name: str, run
) -> tuple[tuple[int, ...], dict]:
    """The one launch ``run()`` makes of ``module.kernel_name``: (grid, arguments by name)."""
    recorder = RecordingKernel(getattr(module, kernel_name).arg_names)
    patch.setattr(module, kernel_name, recorder)
    run()
    assert len(recorder.launches) == 1
    return recorder.launches[0]


def scalars_of(arguments: dict) -> dict:
    return {name: value for name, value in arguments.items() if not isinstance(value, torch.Tensor)}


def padded(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (*grid, *(1,) * (3 - len(grid)))


@settings(max_examples=12)
@given(
    num_rois=st.integers(1, 5),
    channels=st.integers(1, 130),
    size=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    pooled=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    sampling_ratio=st.integers(-1, 3),
    aligned=st.booleans(),
)
def test_dynamic_roi_align_launch_matches_the_kernel_launcher(
    num_rois, channels, size, pooled, sampling_ratio, aligned
):
    features = torch.zeros(2, channels, *size)
    rois = torch.tensor([[1.0, 0.0, 0.0, 3.0, 3.0]]).repeat(num_rois, 1)
    offsets = torch.zeros(num_rois, *pooled, 2)
    with pytest.MonkeyPatch.context() as patch:
        grid, arguments = record(
            patch,
            dynamic_roi_align,
            "dynamic_roi_align_kernel",
            lambda: dynamic_roi_align.dynamic_roi_align_triton(
                features, rois, offsets, 0.25, sampling_ratio, aligned
            ),
        )
    launch = roi_align_launch(
        num_rois,
        channels,
        *size,
        *pooled,
        spatial_scale=0.25,
        sampling_ratio=sampling_ratio,
        aligned=int(aligned),
        block_c=dynamic_roi_align.BLOCK_C,
    )
    expected = scalars_of(arguments)
    # TensorRT passes 32-bit integers: the float as its bits; every ratio <= 0 means adaptive.
    expected["spatial_scale"] = float32_bits(expected["spatial_scale"])
    expected["sampling_ratio"] = max(expected["sampling_ratio"], 0)
    assert launch == Launch(padded(grid), expected)
    assert dynamic_roi_align_output_shape(features.shape, rois.shape, offsets.shape) == (
        num_rois,
        channels,
        *pooled,
    )


@settings(max_examples=12)
@given(
    batch=st.integers(1, 2),
    offset_groups=st.sampled_from([1, 2]),
    channels_per_group=st.integers(1, 20),
    size=st.tuples(st.integers(3, 9), st.integers(3, 9)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
)
def test_im2col_launch_matches_the_kernel_launcher(
    batch, offset_groups, channels_per_group, size, kernel, stride, padding, dilation
):
    channels = offset_groups * channels_per_group
    out_h, out_w = (
        (size[axis] + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1) - 1) // stride[axis]
        + 1
        for axis in (0, 1)
    )
    features = torch.zeros(batch, channels, *size)
    offset = torch.zeros(batch, 2 * offset_groups * kernel[0] * kernel[1], out_h, out_w)
    with pytest.MonkeyPatch.context() as patch:
        grid, arguments = record(
            patch,
            deform_conv,
            "deform_im2col_kernel",
            lambda: deform_conv.deform_im2col(
                features, offset, None, kernel, stride, padding, dilation
            ),
        )
    launch = im2col_launch(
        batch,
        channels,
        *size,
        out_h,
        out_w,
        kernel_shape=kernel,
        strides=stride,
        pads=padding,
        dilations=dilation,
        offset_groups=offset_groups,
        block_l=deform_conv.IM2COL_BLOCK_L,
        block_c=deform_conv.IM2COL_BLOCK_C,
    )
    assert launch == Launch(padded(grid), scalars_of(arguments))
    # The plugin's columns are the launcher's (N, R, L) with L unfolded to (oH, oW).
    columns = im2col_output_shape(features.shape, offset.shape, kernel)
    assert (*columns[:2], math.prod(columns[2:])) == tuple(arguments["columns_ptr"].shape)


@settings(max_examples=12)
@given(
    batch=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3]),
    in_per_group=st.integers(1, 8),
    out_per_group=st.integers(1, 70),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    out_size=st.tuples(st.integers(1, 9), st.integers(1, 12)),
)
def test_gemm_launch_matches_the_kernel_launcher(
    batch, groups, in_per_group, out_per_group, kernel, out_size
):
    weight = torch.zeros(groups * out_per_group, in_per_group, *kernel)
    columns = torch.zeros(batch, groups * in_per_group * kernel[0] * kernel[1], math.prod(out_size))
    with pytest.MonkeyPatch.context() as patch:
        grid, arguments = record(
            patch,
            deform_conv,
            "deform_gemm_kernel",
            lambda: deform_conv.deform_gemm(weight, columns, None, groups),
        )
    launch = gemm_launch(
        batch,
        weight.shape[0],
        in_per_group,
        *kernel,
        *out_size,
        groups=groups,
        block_m=deform_conv.GEMM_BLOCK_M,
        block_n=deform_conv.GEMM_BLOCK_N,
    )
    assert launch == Launch(padded(grid), scalars_of(arguments))
    assert gemm_output_shape(weight.shape, (batch, columns.shape[1], *out_size)) == (
        batch,
        weight.shape[0],
        *out_size,
    )


def test_roi_align_launch_rejects_a_non_positive_spatial_scale():
    with pytest.raises(ValueError, match="spatial_scale must be positive"):
        roi_align_launch(
            1, 1, 1, 1, 1, 1, spatial_scale=0.0, sampling_ratio=0, aligned=1, block_c=64
        )


def test_float32_bits_are_the_ieee_pattern_as_a_signed_int():
    # 0.125 = 2^-3: exponent 127 - 3 = 124 = 0x7C, so 0 01111100 000...0 = 0x3E000000.
    assert float32_bits(0.125) == 0x3E000000
    assert float32_bits(1.0) == 0x3F800000
    # A negative float sets the sign bit: the int32 reading is negative.
    assert float32_bits(-2.0) == struct.unpack("<i", bytes.fromhex("000000c0"))[0] < 0


@pytest.mark.parametrize(
    ("capability", "arch"),
    [((9, 0), 90), ((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((10, 0), 80), ((12, 0), 80)],
)
def test_ptx_targets_sm90a_on_hopper_only_and_sm80_on_other_ampere_or_newer_gpus(capability, arch):
    assert ptx_arch(capability) == arch


def test_ptx_arch_rejects_gpus_older_than_ampere():
    with pytest.raises(ValueError, match=r"8\.0 or newer; this GPU has 7\.5"):
        ptx_arch((7, 5))


TOY_PTX = """//
.visible .entry toy(
\t.param .u64 .ptr .global .align 1 toy_param_0,
\t.param .u64 .ptr .global .align 1 toy_param_1,
\t.param .u32 toy_param_2
)
{
\tld.param.u32 %r1, [toy_param_2];
}
"""


def test_reordering_entry_parameters_moves_declarations_and_leaves_the_body():
    reordered = reorder_entry_parameters(TOY_PTX, "toy", [0, 2, 1])
    declared = [line.strip().rstrip(",") for line in reordered.splitlines() if "\t.param" in line]
    assert [line.split()[-1] for line in declared] == ["toy_param_0", "toy_param_2", "toy_param_1"]
    assert reordered.split("{", 1)[1] == TOY_PTX.split("{", 1)[1]


@pytest.mark.parametrize(
    ("entry", "order", "message"),
    [
        ("other", [0, 1, 2], "no entry 'other'"),
        ("toy", [0, 1], "not a permutation of 3"),
        ("toy", [0, 0, 1], "not a permutation of 3"),
    ],
)
def test_reordering_entry_parameters_rejects_bad_requests(entry, order, message):
    with pytest.raises(ValueError, match=message):
        reorder_entry_parameters(TOY_PTX, entry, order)


@pytest.mark.parametrize(
    ("driver", "loads"),
    # The plugins' PTX is ISA 8.7: CUDA 12.8 drivers (R570) and every later one load it.
    [((12, 8), True), ((12, 9), True), ((13, 0), True), ((13, 4), True), ((12, 7), False)],
)
def test_a_driver_too_old_for_the_ptx_isa_is_named_before_tensorrt_fails_on_it(driver, loads):
    rejection = driver_rejection(driver)
    if loads:
        assert rejection is None
    else:
        assert rejection is not None
        assert f"this NVIDIA driver supports CUDA {driver[0]}.{driver[1]}" in rejection
        assert "PTX ISA 8.7, which needs a driver for CUDA 12.8 or newer (R570" in rejection


def test_the_isa_is_read_from_the_version_line():
    assert ptx_isa_version("//\n.version 8.7\n.target sm_80\n") == 87


def test_ptx_without_a_version_is_an_error():
    with pytest.raises(ValueError, match=r"no \.version"):
        ptx_isa_version(".target sm_80\n")
