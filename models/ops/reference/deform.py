"""Slow, obviously-correct deformable convolution: explicit loops over output pixels and taps.

It states torchvision's ``deform_conv2d`` semantics one sample at a time and is differentiable
by autograd, so tests can compare both values and gradients of the fast op against it. Only
the channel dimension is vectorised. Use it on tiny inputs only.
"""

import itertools
import math

import torch
from torch import Tensor

__all__ = ["deform_conv2d_reference"]


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution v1/v2, same arguments and result as ``deform_conv2d``."""
    batch, in_channels, height, width = input.shape
    out_channels, in_per_group, kh, kw = weight.shape
    groups = in_channels // in_per_group
    out_per_group = out_channels // groups
    offset_groups = offset.shape[1] // (2 * kh * kw)
    channels_per_offset_group = in_channels // offset_groups
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1

    images = []
    for n in range(batch):
        pixels = []
        for oy, ox in itertools.product(range(out_h), range(out_w)):
            taps = []
            for i, j in itertools.product(range(kh), range(kw)):
                tap = i * kw + j
                # Each offset group moves its own block of input channels.
                per_group = []
                for g in range(offset_groups):
                    dy = offset[n, g * 2 * kh * kw + 2 * tap, oy, ox]
                    dx = offset[n, g * 2 * kh * kw + 2 * tap + 1, oy, ox]
                    y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                    x = ox * stride[1] - padding[1] + j * dilation[1] + dx
                    first = g * channels_per_offset_group
                    block = input[n, first : first + channels_per_offset_group]
                    value = _bilinear_sample(block, y, x)
                    if mask is not None:
                        value = value * mask[n, g * kh * kw + tap, oy, ox]
                    per_group.append(value)
                taps.append(torch.cat(per_group))
            # samples[c, i, j]: the value that tap (i, j) reads for input channel c.
            samples = torch.stack(taps, dim=1).view(in_channels, kh, kw)
            pixels.append(_grouped_dot(weight, samples, groups, in_per_group, out_per_group))
        images.append(torch.stack(pixels, dim=1).view(out_channels, out_h, out_w))
    out = torch.stack(images)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _bilinear_sample(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Sample ``image [C, H, W]`` at the real point ``(y, x)``; outside the image reads 0.

    Each of the four integer neighbours contributes its bilinear weight times its value, and a
    neighbour outside the image has value 0. This is torchvision's rule: a point with
    ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` has no neighbour inside (or only ones of
    weight 0) and reads 0. Not returning early there keeps the derivative at exactly
    ``y = -1`` (or ``x = -1``) the one-sided one from the right, as torchvision's backward does.
    """
    _, height, width = image.shape
    y0, x0 = math.floor(y.detach()), math.floor(x.detach())
    frac_y, frac_x = y - y0, x - x0
    value = image.new_zeros(image.shape[0])
    for row, weight_y in ((y0, 1 - frac_y), (y0 + 1, frac_y)):
        for col, weight_x in ((x0, 1 - frac_x), (x0 + 1, frac_x)):
            if 0 <= row < height and 0 <= col < width:
                value = value + weight_y * weight_x * image[:, row, col]
    return value


def _grouped_dot(
    weight: Tensor, samples: Tensor, groups: int, in_per_group: int, out_per_group: int
) -> Tensor:
    """One output pixel: group ``g``'s filters see only group ``g``'s input channels."""
    outputs = []
    for g in range(groups):
        filters = weight[g * out_per_group : (g + 1) * out_per_group]  # [Cout/g, Cin/g, kh, kw]
        seen = samples[g * in_per_group : (g + 1) * in_per_group]  # [Cin/g, kh, kw]
        outputs.append((filters * seen).sum(dim=(1, 2, 3)))
    return torch.cat(outputs)
