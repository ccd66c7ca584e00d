"""Triton kernels of the custom ops: the CUDA forward in PyTorch and the TensorRT plugins' code.

- :mod:`export.kernels.dynamic_roi_align`: ``psearch::dynamic_roi_align`` (plain RoIAlign with
  zero offsets).
- :mod:`export.kernels.deform_conv`: ``psearch::deform_conv2d`` (im2col and GEMM kernels).
- :mod:`export.kernels.compile`: ahead-of-time compilation to PTX (no GPU needed).
- :mod:`export.kernels.ptx`: the PTX ISA version compiled to and the drivers that load it.

Importing this package does not import Triton; :func:`register_cuda_kernels` does.
"""

_registered = False


def register_cuda_kernels() -> None:
    """Make the Triton kernels the CUDA forward of ``psearch::dynamic_roi_align`` and
    ``psearch::deform_conv2d``.

    The PyTorch implementations stay the kernels of every other device, and the ops' autograd
    formulas (PyTorch code, device independent) stay as they are. Calling it again does nothing.
    """
    global _registered
    if _registered:
        return
    import torch

    # The ops must exist before a kernel can be registered for them.
    import models.ops.deform_conv
    import models.ops.dynamic_roi_align  # noqa: F401
    from export.kernels.deform_conv import deform_conv2d_triton
    from export.kernels.dynamic_roi_align import dynamic_roi_align_triton

    torch.library.register_kernel("psearch::dynamic_roi_align", "cuda", dynamic_roi_align_triton)
    torch.library.register_kernel("psearch::deform_conv2d", "cuda", deform_conv2d_triton)
    _registered = True
