"""Training-time image transforms: random horizontal flip, multi-scale resize, normalisation.

Resizing and normalisation go through ``models.preprocess``, so training images are made exactly
like test images, only at a randomly drawn size. Randomness comes from an explicit
``numpy.random.Generator``, so a sample's augmentation depends only on how that generator was
seeded, not on which worker process produced it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from models.preprocess import PreprocessConfig, normalize_and_resize, scale_boxes
from training.config import MultiScaleConfig


def sample_target_size(
    multiscale: MultiScaleConfig, preprocess: PreprocessConfig, rng: np.random.Generator
) -> tuple[int, int]:
    """Draw the (short side, long side cap) an image is resized to."""
    if multiscale.mode == "fixed":
        return preprocess.min_size, preprocess.max_size
    if multiscale.mode == "range":
        (short_lo, short_hi), (long_lo, long_hi) = multiscale.short_side, multiscale.long_side
        return int(rng.integers(short_lo, short_hi + 1)), int(rng.integers(long_lo, long_hi + 1))
    return int(rng.choice(multiscale.short_side)), int(rng.choice(multiscale.long_side))


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror (n, 4) x1 y1 x2 y2 boxes of an image `width` pixels wide left to right.

    Pixel coordinates are continuous (a box spans [x1, x2] of an image spanning [0, W]), so x
    maps to W - x and the two x coordinates swap roles.
    """
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


class TrainTransform:
    """Flip with probability `flip_prob`, then resize to a random size and normalise.

    Called with an (H, W, 3) uint8 RGB image and any number of (n_k, 4) box arrays in original
    pixels; returns the (3, h, w) float tensor and the boxes in its pixels, as float32 tensors.
    """

    def __init__(
        self, preprocess: PreprocessConfig, multiscale: MultiScaleConfig, flip_prob: float
    ) -> None:
        self.preprocess = preprocess
        self.multiscale = multiscale
        self.flip_prob = flip_prob

    def __call__(
        self, image: np.ndarray, box_sets: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[Tensor, list[Tensor]]:
        if rng.random() < self.flip_prob:
            box_sets = [hflip_boxes(boxes, image.shape[1]) for boxes in box_sets]
            image = image[:, ::-1]
        short_side, long_side = sample_target_size(self.multiscale, self.preprocess, rng)
        sized = self.preprocess.model_copy(update={"min_size": short_side, "max_size": long_side})
        pixels, scale = normalize_and_resize(image, sized)
        return pixels, [
            torch.from_numpy(scale_boxes(b.astype(np.float32), scale)) for b in box_sets
        ]
