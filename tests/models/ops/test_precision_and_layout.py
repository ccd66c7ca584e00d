"""Every custom op under every dtype x memory layout x autocast, forward and backward.

- Without autocast an op computes in its inputs' dtype and returns it (float64, float32,
  float16, bfloat16), accurate to that dtype, whatever the inputs' strides.
- Under autocast (CPU, bfloat16 and float16) an op computes in float32, with autocast off
  inside it, and returns the feature map's dtype, as torchvision does: its result is exactly
  the float32 computation cast to that dtype, and so are the gradients. Features, offsets and
  masks come in the autocast dtype (what an autocast convolution gives), weights and boxes in
  float32 (parameters and box decoders stay float32).
- Layouts: contiguous, channels-last (4-D tensors) and strided views (every second element of a
  larger tensor), for every tensor argument at once.

Values are checked against the same op in float64 on the same (rounded) inputs; the op itself
is checked against loop references in the other test files.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from models.ops import batched_nms, deform_conv2d, dynamic_roi_align, nms, roi_align

F64 = torch.float64


@dataclass(frozen=True)
class OpCase:
    """One op call: ``call(**tensors)`` on the tensors ``make`` returns (in float64)."""

    name: str
    make: Callable[[torch.Generator], dict[str, Tensor]]
    call: Callable[..., Tensor]
    parameters: tuple[str, ...]  # float32 under autocast: weights, biases, boxes
    differentiable: tuple[str, ...]


def roi_tensors(generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "features": torch.randn(2, 3, 10, 12, generator=generator, dtype=F64),
        # (batch index, x1, y1, x2, y2) in pixels of a 20 x 24 image: inside, across the border,
        # smaller than a bin.
        "rois": torch.tensor(
            [
                [0, 1.5, 2.0, 17.0, 13.5],
                [1, -3.0, 4.0, 9.0, 22.0],
                [1, 12.0, 6.0, 23.5, 19.0],
                [0, 5.0, 5.0, 5.5, 6.0],
            ],
            dtype=F64,
        ),
    }


def dynamic_roi_tensors(generator: torch.Generator) -> dict[str, Tensor]:
    offsets = 0.2 * torch.randn(4, 3, 2, 2, generator=generator, dtype=F64)
    return {**roi_tensors(generator), "offsets": offsets}


def deform_tensors(generator: torch.Generator, modulated: bool) -> dict[str, Tensor]:
    """Groups 2, offset groups 2, a 3x3 kernel, stride 1, padding 1: output 7 x 8."""
    tensors = {
        "input": torch.randn(2, 4, 7, 8, generator=generator, dtype=F64),
        "offset": 2 * torch.randn(2, 36, 7, 8, generator=generator, dtype=F64),
        "weight": 0.3 * torch.randn(6, 2, 3, 3, generator=generator, dtype=F64),
        "bias": torch.randn(6, generator=generator, dtype=F64),
    }
    if modulated:
        tensors["mask"] = torch.rand(2, 18, 7, 8, generator=generator, dtype=F64)
    return tensors


def nms_tensors(generator: torch.Generator) -> dict[str, Tensor]:
    """Boxes of up to 512 x 512 pixels (areas far above float16's 65504) on a 16-pixel grid and
    scores k / 16: exact in bfloat16 and float16, so every dtype sees the same boxes."""
    corners = 16 * torch.randint(0, 48, (16, 2), generator=generator)
    sizes = 16 * torch.randint(4, 33, (16, 2), generator=generator)
    boxes = torch.cat([corners, corners + sizes], dim=1).to(F64)
    scores = (torch.randperm(16, generator=generator) + 1).to(F64) / 16
    return {
        "boxes": boxes,
        "scores": scores,
        "idxs": torch.randint(0, 3, (16,), generator=generator),
    }


CASES = [
    OpCase(
        "roi_align",
        roi_tensors,
        lambda features, rois: roi_align(features, rois, (3, 2), 0.5, -1, True),
        parameters=("rois",),
        differentiable=("features",),
    ),
    OpCase(
        "dynamic_roi_align",
        dynamic_roi_tensors,
        lambda features, rois, offsets: dynamic_roi_align(features, rois, offsets, (3, 2), 0.5),
        parameters=("rois",),
        differentiable=("features", "offsets"),
    ),
    OpCase(
        "deform_conv2d_v1",
        lambda generator: deform_tensors(generator, modulated=False),
        lambda input, offset, weight, bias: deform_conv2d(input, offset, weight, bias, 1, 1),
        parameters=("weight", "bias"),
        differentiable=("input", "offset", "weight", "bias"),
    ),
    OpCase(
        "deform_conv2d_v2",
        lambda generator: deform_tensors(generator, modulated=True),
        lambda input, offset, weight, bias, mask: deform_conv2d(
            input, offset, weight, bias, 1, 1, mask=mask
        ),
        parameters=("weight", "bias"),
        differentiable=("input", "offset", "weight", "bias", "mask"),
    ),
    OpCase(
        "nms",
        nms_tensors,
        lambda boxes, scores, idxs: nms(boxes, scores, 0.45),
        parameters=(),
        differentiable=(),
    ),
    OpCase(
        "batched_nms",
        nms_tensors,
        lambda boxes, scores, idxs: batched_nms(boxes, scores, idxs, 0.45),
        parameters=(),
        differentiable=(),
    ),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
AUTOCAST = [None, torch.bfloat16, torch.float16]
# Largest error allowed, relative to the largest reference value, when computing in a dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def strided(tensor: Tensor) -> Tensor:
    """The same values as every second element of a twice-as-wide tensor (not contiguous)."""
    wide = tensor.new_zeros(*tensor.shape[:-1], 2 * tensor.shape[-1])
    wide[..., ::2] = tensor
    return wide[..., ::2]


def in_layout(tensor: Tensor, layout: str) -> Tensor:
    if layout == "channels_last" and tensor.dim() == 4:
        return tensor.to(memory_format=torch.channels_last)
    if layout == "strided":
        return strided(tensor)
    return tensor.clone()


def inputs_for(case: OpCase, dtype: torch.dtype, autocast: torch.dtype | None, layout: str):
    """The case's tensors: data in ``dtype``, parameters too (float32 under autocast unless
    ``dtype`` is float64), integer tensors as they are; in ``layout``, grads required."""
    tensors = case.make(torch.Generator().manual_seed(0))
    parameter_dtype = torch.float32 if autocast is not None and dtype != F64 else dtype
    prepared = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            tensor = tensor.to(parameter_dtype if name in case.parameters else dtype)
        tensor = in_layout(tensor, layout)
        prepared[name] = tensor.requires_grad_(name in case.differentiable)
    return prepared


def float64_copies(case: OpCase, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same values in float64 (integer tensors as they are), as new leaves."""
    return {
        name: (tensor.detach().double() if tensor.is_floating_point() else tensor)
        .contiguous()
        .requires_grad_(name in case.differentiable)
        for name, tensor in tensors.items()
    }


def projected(output: Tensor) -> Tensor:
    """A scalar weighing every output element differently (fixed weights)."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(output.shape, generator=generator, dtype=F64).to(output.dtype)
    return (output * weights).sum()


def run(
    case: OpCase,
    tensors: dict[str, Tensor],
    autocast: torch.dtype | None = None,
    compute: torch.dtype | None = None,
    result: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The output and the gradients of ``projected(output)`` w.r.t. the differentiable inputs.

    ``compute``: first cast the float inputs to this dtype (and the output to ``result``), as
    the autocast rule should; gradients come back in the inputs' dtypes either way.
    """
    arguments = {}
    for name, tensor in tensors.items():
        if compute is not None and tensor.is_floating_point():
            tensor = tensor.to(compute)
        arguments[name] = tensor
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        output = case.call(**arguments)
    if result is not None:
        output = output.to(result)
    leaves = [tensors[name] for name in case.differentiable]
    if not leaves:
        return output, {}
    gradients = torch.autograd.grad(projected(output), leaves, allow_unused=True)
    return output.detach(), dict(zip(case.differentiable, gradients, strict=True))


def assert_accurate(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{what}: error {error:.3g} (scale {scale:.3g})"


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):
        return torch.get_autocast_dtype("cpu") == dtype and torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("autocast", AUTOCAST, ids=lambda dtype: f"autocast={dtype}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_forward_and_backward_in_every_dtype_layout_and_autocast(case, dtype, layout, autocast):
    if autocast is not None and not cpu_autocast_supports(autocast):
        pytest.skip(f"this PyTorch's CPU autocast does not support {autocast}")
    tensors = inputs_for(case, dtype, autocast, layout)
    data_dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    output, gradients = run(case, tensors, autocast)

    # The output has the feature map's dtype, every gradient its input's dtype and shape.
    if output.is_floating_point():
        assert output.dtype == data_dtype
    for name, gradient in gradients.items():
        assert gradient.dtype == tensors[name].dtype and gradient.shape == tensors[name].shape

    # As accurate as the least precise of: float32 (what the op computes in, but float64 as it
    # is), the output's dtype (it rounds the result and the gradient that flows back) and the
    # input's.
    expected, expected_gradients = run(case, float64_copies(case, tensors))
    output_dtype = output.dtype if output.is_floating_point() else F64
    precision = max(torch.float32 if dtype != F64 else F64, output_dtype, key=TOLERANCE.get)
    assert_accurate(output, expected, precision, "output")
    for name, gradient in gradients.items():
        accuracy = max(precision, gradient.dtype, key=TOLERANCE.get)
        assert_accurate(gradient, expected_gradients[name], accuracy, f"grad of {name}")

    if autocast is not None and dtype != F64:
        # Exactly the float32 computation, cast back: nothing inside dropped to half precision.
        in_float32, float32_gradients = run(
            case, tensors, compute=torch.float32, result=output.dtype
        )
        assert torch.equal(output, in_float32)
        for name, gradient in gradients.items():
            assert torch.equal(gradient, float32_gradients[name]), f"grad of {name}"


def test_every_custom_op_is_covered():
    """A new op in the psearch namespace must join CASES (backward ops ride on their forward)."""
    ops = {
        name.removeprefix("psearch::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("psearch::") and not name.endswith("_backward")
    }
    covered = {case.name.removesuffix("_v1").removesuffix("_v2") for case in CASES}
    assert ops == covered
