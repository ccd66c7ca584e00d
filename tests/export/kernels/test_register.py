"""register_cuda_kernels: the Triton kernels become the ops' CUDA forward, nothing else changes.

Without a GPU the CUDA kernel is reached by redispatching to the CUDA dispatch key with CPU
tensors: the registered Python function then runs (in Triton's interpreter) like on a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.kernels import register_cuda_kernels
from models.ops.deform_conv import deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align_op

REPOSITORY = Path(__file__).resolve().parents[3]
CUDA_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def roi_align_args(dtype: torch.dtype) -> tuple:
    features = torch.randn(1, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0, 0.5, 1.0, 9.0, 8.0]])
    offsets = torch.full((1, 2, 1, 2), 0.1)
    return features.to(dtype), rois.to(dtype), offsets.to(dtype), 0.8, -1, True


def deform_conv_args(dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(1, 2, 4, 4, generator=generator)
    offset = torch.randn(1, 8, 3, 3, generator=generator)
    weight = torch.randn(3, 2, 2, 2, generator=generator)
    tensors = (tensor.to(dtype) for tensor in (input, offset, weight))
    return *tensors, None, [1, 1], [0, 0], [1, 1], None


def test_the_triton_kernels_become_the_cuda_kernels_of_both_ops():
    register_cuda_kernels()
    register_cuda_kernels()  # a second call changes nothing

    roi_align = torch.ops.psearch.dynamic_roi_align.default
    deform = torch.ops.psearch.deform_conv2d.default
    for op in (roi_align, deform):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    # The CUDA kernels compute what the PyTorch implementation computes...
    args = roi_align_args(torch.float32)
    torch.testing.assert_close(roi_align.redispatch(CUDA_ONLY, *args), dynamic_roi_align_op(*args))
    args = deform_conv_args(torch.float32)
    torch.testing.assert_close(deform.redispatch(CUDA_ONLY, *args), deform_conv2d(*args))
    # ...and are Triton's: float64, which only the PyTorch implementation takes, is refused.
    for op, args in ((roi_align, roi_align_args), (deform, deform_conv_args)):
        with pytest.raises(TypeError, match="float32 or float16"):
            op.redispatch(CUDA_ONLY, *args(torch.float64))
        assert op(*args(torch.float64)).dtype == torch.float64  # on CPU: PyTorch, as before


GPU_CHECK = """
import torch
from export.kernels import register_cuda_kernels
from export.kernels.deform_conv import deform_conv2d_triton
from models.ops.deform_conv import deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align

register_cuda_kernels()
generator = torch.Generator().manual_seed(0)
features = torch.randn(2, 96, 20, 24, generator=generator)
rois = torch.tensor([[0, 4.0, 6.0, 60.0, 70.0], [1, -20.0, 10.0, 30.0, 90.0]])
offsets = torch.randn(2, 7, 7, 2, generator=generator) * 0.2
x = torch.randn(2, 40, 13, 11, generator=generator)
offset = torch.randn(2, 2 * 2 * 9, 13, 11, generator=generator) * 2
mask = torch.rand(2, 2 * 9, 13, 11, generator=generator)
weight = torch.randn(80, 20, 3, 3, generator=generator)
bias = torch.randn(80, generator=generator)


def close(out, expected, tolerance):
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float().cpu() / scale, expected / scale, rtol=0, atol=tolerance)


for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    def cuda(*tensors):
        return [t.to("cuda", dtype) for t in tensors]

    def exact(*tensors):  # float32 copies of the values the kernels get
        return [t.to(dtype).float() for t in tensors]

    expected = dynamic_roi_align(*exact(features, rois, offsets), 7, 0.25)
    close(dynamic_roi_align(*cuda(features, rois, offsets), 7, 0.25), expected, tolerance)
    expected = deform_conv2d(*exact(x, offset, weight, bias), 1, 1, 1, *exact(mask))
    close(deform_conv2d(*cuda(x, offset, weight, bias), 1, 1, 1, *cuda(mask)), expected, tolerance)
    all_triton = deform_conv2d_triton(
        *cuda(x, offset, weight, bias), (1, 1), (1, 1), (1, 1), *cuda(mask), gemm="triton"
    )
    close(all_triton, expected, tolerance)

# The backward passes are the ops' PyTorch formulas, on CUDA as on CPU.
leaves = [t.clone().requires_grad_() for t in (features, offsets)]
dynamic_roi_align(leaves[0], rois, leaves[1], 7, 0.25).square().sum().backward()
cuda_leaves = [t.cuda().requires_grad_() for t in (features, offsets)]
dynamic_roi_align(cuda_leaves[0], rois.cuda(), cuda_leaves[1], 7, 0.25).square().sum().backward()
for leaf, cuda_leaf in zip(leaves, cuda_leaves):
    close(cuda_leaf.grad, leaf.grad, 1e-5)
print("ok")
"""


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: would check the Triton CUDA kernels match the PyTorch implementation",
)
def test_the_triton_cuda_kernels_match_the_pytorch_implementation_on_a_gpu():
    # A process without TRITON_INTERPRET, so that Triton compiles the kernels for the GPU.
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")])
    )
    process = subprocess.run(
        [sys.executable, "-c", GPU_CHECK],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=environment,
        timeout=600,
        check=False,
    )
    assert process.returncode == 0 and process.stdout.strip() == "ok", process.stderr
