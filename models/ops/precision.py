"""The precision rules of every ``psearch`` op: compute in float32, give back the input's dtype.

- Half-precision inputs (float16, bfloat16) are computed in float32 and the result is rounded
  to the input's dtype, like the Triton kernels (``export/kernels``) do: a sample position in
  float16 is off by up to half a pixel at 1000 pixels, and a bilinear weight's derivative with
  it. float32 and float64 are computed as they are.
- Under ``torch.autocast`` torchvision runs its geometric ops (RoIAlign, deformable convolution,
  NMS) in float32 and casts the result back to the dtype of the feature map. PyTorch's own
  ``torch.library.register_autocast`` casts the inputs but returns float32, and without any
  rule autocast reaches *inside* the op, where a matrix product drops to half precision.
  :func:`compute_in_float32_under_autocast` registers torchvision's rule instead.
"""

import torch
from torch import Tensor

HALF_PRECISION = (torch.float16, torch.bfloat16)

# The autocast kernels are registered through this library fragment; it lives as long as the
# process.
_LIBRARY = torch.library.Library("psearch", "FRAGMENT")
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def in_compute_dtype(tensor: Tensor) -> Tensor:
    """``tensor`` in the dtype the ops compute in: float32 for half precision, else itself."""
    return tensor.float() if tensor.dtype in HALF_PRECISION else tensor


def _in_float32(value: object, device_type: str) -> object:
    """``value`` in float32 if it is a floating-point tensor on ``device_type``; float64 stays."""
    if (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.device.type == device_type
        and value.dtype != torch.float64
    ):
        return value.float()
    return value


def compute_in_float32_under_autocast(op_name: str, *, result_dtype_of: int | None) -> None:
    """Register the autocast kernels of ``psearch::<op_name>`` on CPU and CUDA.

    Under autocast every floating-point tensor argument (float64 aside) is cast to float32 and
    the op runs with autocast off, so nothing inside it drops to half precision. The result is
    cast to the dtype of argument ``result_dtype_of`` (the feature map), or left as it is when
    None (index results, as NMS returns). The casts are differentiable: gradients flow back in
    the inputs' dtypes.
    """
    overload = getattr(torch.ops.psearch, op_name).default
    for device_type in _AUTOCAST_DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        autocast_off = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, *args, _device_type=device_type, _autocast_off=autocast_off):
            with torch._C._ExcludeDispatchKeyGuard(_autocast_off):
                result = overload(*(_in_float32(arg, _device_type) for arg in args))
            if result_dtype_of is None:
                return result
            return result.to(args[result_dtype_of].dtype)

        _LIBRARY.impl(op_name, kernel, key_name, with_keyset=True)
