"""Deformable convolution: the fast custom op against a loop reference, by hand, and ONNX."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.ops.deform_conv import DeformConv2d, DeformConvPack, deform_conv2d
from models.ops.reference.deform import deform_conv2d_reference

F64 = torch.float64


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def random_case(
    generator: torch.Generator,
    *,
    batch=1,
    in_channels=2,
    out_channels=2,
    size=(5, 5),
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups=1,
    offset_groups=1,
    offset_scale=2.0,
    modulated=True,
    with_bias=True,
    dtype=F64,
) -> dict:
    """Keyword arguments of ``deform_conv2d`` with random tensors of the given geometry.

    Offsets are spread over a few pixels so that samples fall inside, across the border and
    outside of the image.
    """
    kh, kw = kernel
    out_h = output_size(size[0], kh, stride[0], padding[0], dilation[0])
    out_w = output_size(size[1], kw, stride[1], padding[1], dilation[1])
    taps = kh * kw

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return {
        "input": randn(batch, in_channels, *size),
        "offset": offset_scale * randn(batch, 2 * offset_groups * taps, out_h, out_w),
        "weight": randn(out_channels, in_channels // groups, kh, kw),
        "bias": randn(out_channels) if with_bias else None,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "mask": (
            torch.rand(batch, offset_groups * taps, out_h, out_w, generator=generator, dtype=dtype)
            if modulated
            else None
        ),
    }


def differentiable_names(case: dict) -> list[str]:
    return [
        name for name in ("input", "offset", "weight", "bias", "mask") if case[name] is not None
    ]


def projected(out: torch.Tensor) -> torch.Tensor:
    """A scalar that weighs every output element differently (a fixed random projection)."""
    generator = torch.Generator().manual_seed(7)
    return (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()


def values_and_gradients(function, case: dict) -> list[torch.Tensor]:
    """``function(**case)`` and the gradients of ``projected`` of it, for every tensor."""
    case = dict(case)
    names = differentiable_names(case)
    for name in names:
        case[name] = case[name].detach().clone().requires_grad_()
    out = function(**case)
    # Samples that all fall off the image leave a tensor unused: its gradient is zero.
    gradients = torch.autograd.grad(
        projected(out), [case[name] for name in names], allow_unused=True, materialize_grads=True
    )
    return [out.detach(), *gradients]


# --------------------------------------------------------------------------------------------
# Against the loop reference


@st.composite
def geometries(draw) -> dict:
    groups = draw(st.integers(1, 2))
    offset_groups = draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = (draw(st.integers(3, 5)), draw(st.integers(3, 5)))
    # Keep at least one output pixel.
    for axis in (0, 1):
        smallest = dilation[axis] * (kernel[axis] - 1) + 1 - 2 * padding[axis]
        size = tuple(max(s, smallest) if a == axis else s for a, s in enumerate(size))
    return {
        "batch": draw(st.integers(1, 2)),
        "in_channels": groups * offset_groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 2)),
        "size": size,
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "offset_groups": offset_groups,
        "modulated": draw(st.booleans()),
        "with_bias": draw(st.booleans()),
        "half_pixel_offsets": draw(st.booleans()),
    }


@settings(max_examples=25, deadline=None)
@given(geometry=geometries(), seed=st.integers(0, 2**16))
def test_values_and_gradients_match_the_loop_reference(geometry, seed):
    """Also on offsets in steps of 0.5, where samples hit pixel rows, columns and the border
    exactly: there both sides take the derivative from the right (floor picks the neighbours)."""
    geometry = dict(geometry)
    half_pixel_offsets = geometry.pop("half_pixel_offsets")
    case = random_case(torch.Generator().manual_seed(seed), **geometry)
    if half_pixel_offsets:
        case["offset"] = (2 * case["offset"]).round() / 2
    fast = values_and_gradients(deform_conv2d, case)
    slow = values_and_gradients(deform_conv2d_reference, case)
    for name, a, b in zip(["output", *differentiable_names(case)], fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} differs")


def test_float32_matches_the_float64_reference():
    case = random_case(torch.Generator().manual_seed(3), in_channels=4, groups=2, offset_groups=2)
    expected = deform_conv2d_reference(**case)
    single = {k: v.float() if torch.is_tensor(v) else v for k, v in case.items()}
    torch.testing.assert_close(deform_conv2d(**single), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modulated", [False, True], ids=["v1", "v2"])
def test_gradcheck_in_float64(modulated):
    case = random_case(
        torch.Generator().manual_seed(11),
        in_channels=4,
        out_channels=2,
        size=(4, 5),
        stride=(2, 1),
        dilation=(1, 2),
        padding=(1, 2),
        groups=2,
        offset_groups=2,
        modulated=modulated,
    )
    names = differentiable_names(case)

    def function(*tensors):
        return deform_conv2d(**{**case, **dict(zip(names, tensors, strict=True))})

    inputs = [case[name].clone().requires_grad_() for name in names]
    assert torch.autograd.gradcheck(function, inputs)


def test_only_the_requested_gradients_are_computed():
    """A frozen offset predictor (offset without grad) still gives the right input gradient."""
    case = random_case(torch.Generator().manual_seed(5))
    input = case["input"].clone().requires_grad_()
    projected(deform_conv2d(**{**case, "input": input})).backward()
    everything = values_and_gradients(deform_conv2d, case)
    torch.testing.assert_close(input.grad, everything[1])


@pytest.mark.parametrize("modulated", [False, True], ids=["v1", "v2"])
def test_custom_op_registration_passes_opcheck(modulated):
    """Schema, fake (meta) implementation and autograd registration agree with the kernel.

    (opcheck's ``test_aot_dispatch_dynamic`` is left out: it takes seconds; the torch.export
    test covers tracing.)"""
    case = random_case(torch.Generator().manual_seed(6), modulated=modulated)
    names = differentiable_names(case)
    for name in names:
        case[name] = case[name].requires_grad_()
    arguments = [case[name] for name in ("input", "offset", "weight", "bias")]
    arguments += [list(case[name]) for name in ("stride", "padding", "dilation")]
    torch.library.opcheck(
        torch.ops.psearch.deform_conv2d.default,
        (*arguments, case["mask"]),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_an_empty_batch_gives_an_empty_output_and_zero_weight_gradient():
    case = random_case(torch.Generator().manual_seed(0), batch=0)
    weight = case["weight"].requires_grad_()
    out = deform_conv2d(**case)
    assert out.shape == (0, 2, 5, 5)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# --------------------------------------------------------------------------------------------
# Cases checked by hand


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (1, 2), 2), ((1, 2), (2, 1), (2, 1), 4)],
)
def test_zero_offsets_and_unit_mask_equal_conv2d_exactly(stride, padding, dilation, groups):
    """Every sample then sits on a pixel: bilinear weight 1 on it, 0 on its neighbours.

    Small integers in float64 make every sum exact, so any summation order gives equal bits.
    """
    generator = torch.Generator().manual_seed(0)
    case = random_case(
        generator, in_channels=4, out_channels=4, size=(6, 7), stride=stride,
        padding=padding, dilation=dilation, groups=groups,
    )  # fmt: skip
    for name in ("input", "weight", "bias"):
        case[name] = torch.randint(-4, 5, case[name].shape, generator=generator).to(F64)
    case["offset"] = torch.zeros_like(case["offset"])
    case["mask"] = torch.ones_like(case["mask"])
    expected = F.conv2d(
        case["input"], case["weight"], case["bias"], stride, padding, dilation, groups
    )
    assert torch.equal(deform_conv2d(**case), expected)
    assert torch.equal(deform_conv2d(**{**case, "mask": None}), expected)


def identity_1x1(channels: int) -> torch.Tensor:
    """A 1x1 depthwise weight of ones: output channel c is input channel c, unchanged."""
    return torch.ones(channels, 1, 1, 1, dtype=F64)


def test_integer_offsets_shift_by_whole_pixels_in_dy_dx_order():
    """Offset channels are (dy, dx): dy = -1, dx = +1 reads the pixel up and to the right.

    input = [[0, 1, 2],        output[y][x] = input[y - 1][x + 1], 0 where that is outside:
             [3, 4, 5],        [[0, 0, 0],
             [6, 7, 8]]         [1, 2, 0],
                                [4, 5, 0]]
    """
    input = torch.arange(9, dtype=F64).view(1, 1, 3, 3)
    offset = torch.stack([torch.full((3, 3), -1.0), torch.full((3, 3), 1.0)]).to(F64)[None]
    expected = torch.tensor([[0, 0, 0], [1, 2, 0], [4, 5, 0]], dtype=F64).view(1, 1, 3, 3)
    assert torch.equal(deform_conv2d(input, offset, identity_1x1(1)), expected)


def test_each_offset_group_moves_its_own_channels():
    """Two offset groups: channel 0 moves right (dx = 1), channel 1 moves down (dy = 1)."""
    input = torch.arange(18, dtype=F64).view(1, 2, 3, 3)
    offset = torch.zeros(1, 4, 3, 3, dtype=F64)
    offset[0, 1] = 1.0  # group 0: dx
    offset[0, 2] = 1.0  # group 1: dy
    out = deform_conv2d(input, offset, identity_1x1(2))
    expected_right = torch.tensor([[1, 2, 0], [4, 5, 0], [7, 8, 0]], dtype=F64)
    expected_down = torch.tensor([[12, 13, 14], [15, 16, 17], [0, 0, 0]], dtype=F64)
    assert torch.equal(out[0, 0], expected_right)
    assert torch.equal(out[0, 1], expected_down)


def test_kernel_taps_are_ordered_row_major():
    """With a 1x2 kernel, tap 1 (the right one) owns offset channels 2 and 3.

    Weight [0, 1] keeps only tap 1, which reads x + 1; moving it by dx = -1 reads x itself.
    """
    input = torch.arange(6, dtype=F64).view(1, 1, 2, 3)
    weight = torch.tensor([0.0, 1.0], dtype=F64).view(1, 1, 1, 2)
    offset = torch.zeros(1, 4, 2, 2, dtype=F64)
    offset[0, 3] = -1.0
    assert torch.equal(deform_conv2d(input, offset, weight), input[..., :2])


def test_half_pixel_offsets_average_neighbours_and_read_zero_outside():
    """dx = 0.5 averages a pixel with its right neighbour; past the right border that
    neighbour reads 0, so the last column is halved.

    input row [2, 4, 8] -> [(2 + 4) / 2, (4 + 8) / 2, (8 + 0) / 2] = [3, 6, 4]
    """
    input = torch.tensor([2.0, 4.0, 8.0], dtype=F64).view(1, 1, 1, 3)
    offset = torch.tensor([0.0, 0.5], dtype=F64).view(1, 2, 1, 1).expand(1, 2, 1, 3)
    out = deform_conv2d(input, offset.contiguous(), identity_1x1(1))
    assert torch.equal(out.flatten(), torch.tensor([3.0, 6.0, 4.0], dtype=F64))


@pytest.mark.parametrize(
    ("dy", "dx", "expected"),
    [
        (0.0, -0.25, 6.0),  # (1 - 0.25) * 8
        (0.0, 0.75, 2.0),  # (1 - 0.75) * 8
        (0.5, -0.5, 2.0),  # (1 - 0.5) * (1 - 0.5) * 8
        (0.0, -1.0, 0.0),  # x <= -1
        (-1.5, 0.0, 0.0),  # y <= -1
        (0.0, 1.0, 0.0),  # x >= W
        (3.0, 0.0, 0.0),  # y >= H
    ],
)
def test_samples_around_a_single_pixel_image_follow_the_border_rule(dy, dx, expected):
    """A 1x1 image of value 8 sampled at (dy, dx) reads (1 - |dy|) * (1 - |dx|) * 8 while both
    are below 1 in size, and 0 from there on (its neighbours outside the image read 0)."""
    input = torch.full((1, 1, 1, 1), 8.0, dtype=F64)
    offset = torch.tensor([dy, dx], dtype=F64).view(1, 2, 1, 1)
    assert deform_conv2d(input, offset, identity_1x1(1)).item() == expected


def test_offsets_that_push_every_sample_outside_leave_only_the_bias():
    case = random_case(torch.Generator().manual_seed(2), modulated=False)
    case["offset"] = torch.full_like(case["offset"], 100.0)
    input = case["input"].requires_grad_()
    out = deform_conv2d(**case)
    assert torch.equal(out, case["bias"].view(1, -1, 1, 1).expand_as(out))
    out.sum().backward()
    assert torch.equal(input.grad, torch.zeros_like(input))


def test_mask_scales_each_tap():
    """v2: a mask of 0.25 everywhere scales the convolution part (not the bias) by 0.25;
    a mask that keeps only the centre tap equals a 1x1 convolution with the centre weights."""
    case = random_case(torch.Generator().manual_seed(4), offset_scale=0.0)
    bias = case["bias"].view(1, -1, 1, 1)
    unmasked = deform_conv2d(**{**case, "mask": None})
    quarter = deform_conv2d(**{**case, "mask": torch.full_like(case["mask"], 0.25)})
    torch.testing.assert_close(quarter - bias, 0.25 * (unmasked - bias))

    centre_only = torch.zeros_like(case["mask"])
    centre_only[:, 4] = 1.0  # tap (1, 1) of the 3x3 kernel
    centre_weight = case["weight"][:, :, 1:2, 1:2]
    torch.testing.assert_close(
        deform_conv2d(**{**case, "mask": centre_only}),
        F.conv2d(case["input"], centre_weight, case["bias"]),
    )


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"offset": torch.zeros(1, 17, 5, 5)}, "multiple of 18"),
        ({"offset": torch.zeros(1, 18, 4, 5)}, r"offset must have shape \(1, 18, 5, 5\)"),
        ({"mask": torch.zeros(1, 18, 5, 5)}, r"mask must have shape \(1, 9, 5, 5\)"),
        ({"weight": torch.zeros(2, 3, 3, 3)}, "must divide the input channels"),
        ({"bias": torch.zeros(3)}, r"bias must have shape \(2,\)"),
        ({"input": torch.zeros(2, 5, 5)}, "input must be 4-D"),
        ({"stride": (0, 1)}, "stride and dilation must be >= 1"),
    ],
)
def test_inconsistent_arguments_raise_clear_errors(change, message):
    case = random_case(torch.Generator().manual_seed(0), dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        deform_conv2d(**{**case, **change})


def test_mixed_dtypes_are_rejected():
    case = random_case(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="share one dtype and device"):
        deform_conv2d(**{**case, "offset": case["offset"].float()})


# --------------------------------------------------------------------------------------------
# Modules


def test_deform_conv2d_has_the_parameters_of_a_conv():
    layer = DeformConv2d(4, 6, 3, padding=1, groups=2)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in conv.state_dict().items()
    }


def test_pack_loads_a_conv_state_dict_and_equals_it_at_initialisation():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2)
    pack = DeformConvPack(4, 6, 3, stride=2, padding=2, dilation=2, offset_groups=2)
    result = pack.load_state_dict(conv.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["conv_offset.bias", "conv_offset.weight"]
    assert result.unexpected_keys == []
    x = torch.randn(2, 4, 11, 9)
    torch.testing.assert_close(pack(x), conv(x))


def test_modulated_pack_starts_as_a_conv_with_half_the_weights():
    """DCNv2's mask is sigmoid(0) = 0.5 at initialisation (zeroed offset predictor)."""
    torch.manual_seed(0)
    pack = DeformConvPack(4, 6, 3, padding=1, modulated=True)
    x = torch.randn(1, 4, 7, 8)
    torch.testing.assert_close(pack(x), F.conv2d(x, pack.weight / 2, pack.bias, padding=1))


def test_pack_learns_offsets_through_its_offset_conv():
    pack = DeformConvPack(2, 3, 3, padding=1, modulated=True)
    pack(torch.randn(1, 2, 6, 6)).square().sum().backward()
    assert pack.conv_offset.weight.grad.abs().sum() > 0


def test_torch_export_keeps_the_op_and_supports_dynamic_sizes():
    torch.manual_seed(0)
    pack = DeformConvPack(4, 6, 3, padding=1, offset_groups=2, modulated=True)
    with torch.no_grad():
        pack.conv_offset.weight.normal_(std=0.1)
    height, width = torch.export.Dim("height", min=4, max=64), torch.export.Dim("width", max=64)
    exported = torch.export.export(
        pack, (torch.randn(2, 4, 9, 11),), dynamic_shapes=({2: height, 3: width},)
    )
    targets = {node.target for node in exported.graph.nodes}
    assert torch.ops.psearch.deform_conv2d.default in targets
    other_size = torch.randn(2, 4, 13, 7)
    torch.testing.assert_close(exported.module()(other_size), pack(other_size))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    case = random_case(torch.Generator().manual_seed(9), in_channels=4, groups=2, offset_groups=2)
    on_cpu = values_and_gradients(deform_conv2d, case)
    on_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.items()}
    for a, b in zip(on_cpu, values_and_gradients(deform_conv2d, on_gpu), strict=True):
        torch.testing.assert_close(a, b.cpu())


# --------------------------------------------------------------------------------------------
# ONNX Runtime's DeformConv


def onnx_deform_conv_session(case: dict, groups: int, offset_groups: int):
    """One ``DeformConv`` node (opset 19) with the geometry of ``case``, on ONNX Runtime CPU."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    kh, kw = case["weight"].shape[2:]
    (ph, pw), names = case["padding"], ["X", "W", "offset", "B", "mask"]
    node = helper.make_node(
        "DeformConv", names, ["Y"], kernel_shape=[kh, kw], strides=list(case["stride"]),
        pads=[ph, pw, ph, pw], dilations=list(case["dilation"]), group=groups,
        offset_group=offset_groups,
    )  # fmt: skip
    ranks = {"X": 4, "W": 4, "offset": 4, "B": 1, "mask": 4}
    graph = helper.make_graph(
        [node],
        "deform_conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * ranks[n]) for n in names],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)],
    )
    # IR version 9 is the one that goes with opset 19 (and loads in older runtimes).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # the runtime's own exception types are not importable by name
        if "NOT_IMPLEMENTED" in str(error) or "implementation" in str(error):
            pytest.skip(f"onnxruntime {ort.__version__} has no DeformConv kernel (>= 1.25 has)")
        raise


def test_matches_onnx_runtime_deform_conv():
    case = random_case(
        torch.Generator().manual_seed(8), batch=2, in_channels=8, out_channels=6, size=(9, 10),
        kernel=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2,
        offset_groups=2, offset_scale=4.0, dtype=torch.float32,
    )  # fmt: skip
    session = onnx_deform_conv_session(case, groups=2, offset_groups=2)
    feeds = {"X": "input", "W": "weight", "offset": "offset", "B": "bias", "mask": "mask"}
    (onnx_out,) = session.run(None, {k: case[v].numpy() for k, v in feeds.items()})
    torch.testing.assert_close(
        deform_conv2d(**case), torch.from_numpy(onnx_out), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("dx", "expected_slope"),
    [
        (-1.0, 8.0),  # value rises from 0 at x = -1 to 8 at x = 0
        (0.0, -8.0),  # and falls back to 0 at x = 1
        (-0.5, 8.0),
        (1.0, 0.0),  # outside on the right: flat
        (-1.5, 0.0),  # outside on the left: flat
    ],
)
def test_offset_gradient_at_pixel_positions_is_taken_from_the_right(dx, expected_slope):
    """Where bilinear interpolation has a kink (integer positions) the derivative is the one
    to the right, as in torchvision's backward; a 1x1 image of value 8 makes it read off."""
    input = torch.full((1, 1, 1, 1), 8.0, dtype=F64)
    offset = torch.tensor([0.0, dx], dtype=F64).view(1, 2, 1, 1).requires_grad_()
    deform_conv2d(input, offset, identity_1x1(1)).backward()
    assert offset.grad[0, 1].item() == expected_slope
