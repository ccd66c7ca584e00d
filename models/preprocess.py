"""Preprocessing that travels with every model artifact: RGB, ImageNet mean/std, resize so the
short side is `min_size` and the long side at most `max_size`, pad to a multiple of
`size_divisor`. Training, evaluation and every export backend use these functions, so a model sees
the same pixels wherever it runs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from models.config import StrictModel


class PreprocessConfig(StrictModel):
    min_size: int = Field(900, gt=0, description="Target length of the short side, in pixels.")
    max_size: int = Field(1500, gt=0, description="Upper bound on the long side, in pixels.")
    size_divisor: int = Field(32, gt=0, description="Pad height and width to a multiple of this.")
    mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="Per-channel RGB mean of pixels scaled to [0, 1]."
    )
    std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225), description="Per-channel RGB std of pixels scaled to [0, 1]."
    )


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to min_size, capped so long <= max_size."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_tensor(image: np.ndarray | Tensor) -> Tensor:
    """An RGB image, (H, W, 3) uint8 array or (3, H, W) tensor, as a float (3, H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}"
            )
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(image.shape)}")
    return image.float().div(255) if image.dtype == torch.uint8 else image.float()


def normalize_and_resize(
    image: np.ndarray | Tensor, cfg: PreprocessConfig, min_size: int | None = None
) -> tuple[Tensor, tuple[float, float]]:
    """Resize (bilinear, antialiased) and normalise one image.

    Returns the (3, h, w) tensor and the (scale_x, scale_y) that maps original pixels to it;
    `min_size` overrides the config's (multi-scale training).
    """
    pixels = to_tensor(image)
    height, width = pixels.shape[-2:]
    new_h, new_w = resized_shape(height, width, min_size or cfg.min_size, cfg.max_size)
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(
            pixels[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )[0]
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (pixels - mean) / std, (new_w / width, new_h / height)


class PaddedBatch(NamedTuple):
    """Images stacked into one zero-padded batch, and where each image lies in it."""

    images: Tensor  # (B, 3, H, W)
    image_sizes: Tensor  # (B, 2) int64 (height, width) of each image, at the top left


def pad_batch(images: list[Tensor], size_divisor: int) -> PaddedBatch:
    """Stack (3, h_i, w_i) images into (B, 3, H, W), zero-padded at the bottom and right, with
    H and W multiples of size_divisor; ``image_sizes`` keeps each (h_i, w_i), which models
    need to treat the padding as outside the image."""
    if not images:
        raise ValueError("cannot batch an empty list of images")
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    height = -(-height // size_divisor) * size_divisor
    width = -(-width // size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), 3, height, width))
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]] = img
    sizes = torch.tensor([tuple(img.shape[-2:]) for img in images], dtype=torch.int64)
    return PaddedBatch(batch, sizes)


def valid_sizes(images: Tensor, image_sizes: Tensor | None) -> Tensor:
    """(B, 2) (height, width) of each image's valid region in ``images`` (B, 3, H, W), in the
    images' dtype: ``image_sizes`` checked, or (H, W) for every image when it is None.

    Tensor ops only, so that an exported graph keeps B, H and W dynamic.
    """
    batch = images.shape[0]
    if image_sizes is None:
        ones = images.new_ones(batch, 1)
        return torch.cat((ones * images.shape[-2], ones * images.shape[-1]), dim=1)
    if image_sizes.dim() != 2 or image_sizes.shape[0] != batch or image_sizes.shape[1] != 2:
        raise ValueError(
            f"image_sizes must be ({batch}, 2) (height, width) per image, "
            f"got {tuple(image_sizes.shape)}"
        )
    return image_sizes.to(images.dtype)


def scale_boxes(boxes: Tensor | np.ndarray, scale: tuple[float, float]) -> Tensor | np.ndarray:
    """Map x1 y1 x2 y2 boxes from original pixels to resized pixels (divide to go back)."""
    sx, sy = scale
    factors = [sx, sy, sx, sy]
    if isinstance(boxes, np.ndarray):
        return boxes * np.asarray(factors, dtype=boxes.dtype)
    return boxes * boxes.new_tensor(factors)


def unscale_boxes(boxes: Tensor | np.ndarray, scale: tuple[float, float]) -> Tensor | np.ndarray:
    """Map x1 y1 x2 y2 boxes from resized pixels back to original pixels."""
    sx, sy = scale
    return scale_boxes(boxes, (1.0 / sx, 1.0 / sy))
