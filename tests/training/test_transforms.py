"""Training transforms: flipping boxes with the image, multi-scale sizes, resize + normalise."""

import numpy as np
import pytest
import torch

from models.preprocess import PreprocessConfig
from training.config import MultiScaleConfig
from training.transforms import TrainTransform, hflip_boxes, sample_target_size

PREPROCESS = PreprocessConfig(min_size=40, max_size=80, size_divisor=8)


def test_hflip_mirrors_boxes_in_continuous_pixel_coordinates():
    # In a 100-pixel-wide image, [10, 30] maps to [100 - 30, 100 - 10] = [70, 90].
    boxes = np.array([[10.0, 5.0, 30.0, 50.0], [0.0, 0.0, 100.0, 10.0]], dtype=np.float32)
    assert hflip_boxes(boxes, width=100).tolist() == [[70, 5, 90, 50], [0, 0, 100, 10]]


def test_fixed_mode_uses_the_models_preprocessing_sizes():
    rng = np.random.default_rng(0)
    assert sample_target_size(MultiScaleConfig(), PREPROCESS, rng) == (40, 80)


def test_range_mode_draws_both_sides_within_their_bounds_inclusive():
    multiscale = MultiScaleConfig(mode="range", short_side=[400, 402], long_side=[667, 668])
    rng = np.random.default_rng(0)
    draws = {sample_target_size(multiscale, PREPROCESS, rng) for _ in range(200)}
    assert {short for short, _ in draws} == {400, 401, 402}
    assert {long for _, long in draws} == {667, 668}


def test_choice_mode_draws_from_the_lists():
    multiscale = MultiScaleConfig(mode="choice", short_side=[480, 512, 544], long_side=[1333])
    rng = np.random.default_rng(0)
    draws = {sample_target_size(multiscale, PREPROCESS, rng) for _ in range(100)}
    assert draws == {(480, 1333), (512, 1333), (544, 1333)}


def marked_image() -> np.ndarray:
    """A 20 x 40 (H x W) black image with a white 4 x 4 block at x in [4, 8), y in [8, 12)."""
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[8:12, 4:8] = 255
    return image


def test_transform_resizes_to_the_drawn_size_and_scales_boxes():
    # Short side 20 -> 40 (the long side 80 respects the cap): scale 2 in both directions.
    transform = TrainTransform(PREPROCESS, MultiScaleConfig(), flip_prob=0.0)
    boxes = np.array([[4.0, 8.0, 8.0, 12.0]], dtype=np.float32)
    pixels, (scaled,) = transform(marked_image(), [boxes], np.random.default_rng(0))
    assert pixels.shape == (3, 40, 80)
    assert scaled.dtype == torch.float32
    assert scaled.tolist() == [[8.0, 16.0, 16.0, 24.0]]


def test_transform_normalises_with_the_models_mean_and_std():
    transform = TrainTransform(PREPROCESS, MultiScaleConfig(), flip_prob=0.0)
    pixels, _ = transform(marked_image(), [], np.random.default_rng(0))
    # A black pixel becomes -mean / std; the block's interior (white) (1 - mean) / std.
    mean, std = torch.tensor(PREPROCESS.mean), torch.tensor(PREPROCESS.std)
    assert torch.allclose(pixels[:, 0, 0], -mean / std)
    assert torch.allclose(pixels[:, 20, 12], (1 - mean) / std, atol=1e-5)


def test_flipped_boxes_still_frame_the_flipped_content():
    transform = TrainTransform(PREPROCESS, MultiScaleConfig(), flip_prob=1.0)
    boxes = np.array([[4.0, 8.0, 8.0, 12.0]], dtype=np.float32)
    pixels, (flipped,) = transform(marked_image(), [boxes], np.random.default_rng(0))
    # The block moves to x in [40 - 8, 40 - 4) = [32, 36), which is [64, 72) after scaling by 2.
    assert flipped.tolist() == [[64.0, 16.0, 72.0, 24.0]]
    x1, y1, x2, y2 = (int(v) for v in flipped[0])
    white = (1 - PREPROCESS.mean[0]) / PREPROCESS.std[0]
    inside = pixels[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
    assert torch.allclose(inside, torch.full_like(inside, white), atol=1e-5)


@pytest.mark.parametrize("flip_prob, expected_flips", [(0.0, 0), (1.0, 50)])
def test_flip_probability_extremes(flip_prob, expected_flips):
    transform = TrainTransform(PREPROCESS, MultiScaleConfig(), flip_prob=flip_prob)
    boxes = np.array([[4.0, 8.0, 8.0, 12.0]], dtype=np.float32)
    rng = np.random.default_rng(1)
    flips = sum(
        transform(marked_image(), [boxes], rng)[1][0][0, 0].item() == 64.0 for _ in range(50)
    )
    assert flips == expected_flips


def test_same_generator_seed_gives_the_same_augmentation():
    multiscale = MultiScaleConfig(mode="range", short_side=[30, 60], long_side=[60, 120])
    transform = TrainTransform(PREPROCESS, multiscale, flip_prob=0.5)
    boxes = np.array([[4.0, 8.0, 8.0, 12.0]], dtype=np.float32)
    first = transform(marked_image(), [boxes], np.random.default_rng([3, 1, 7]))
    second = transform(marked_image(), [boxes], np.random.default_rng([3, 1, 7]))
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][0], second[1][0])
