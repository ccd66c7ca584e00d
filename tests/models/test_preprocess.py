"""Batching preprocessed images: zero padding, and each image's size inside the batch."""

import pytest
import torch

from models.preprocess import pad_batch, valid_sizes


def test_pad_batch_pads_at_the_bottom_right_and_keeps_each_images_size():
    """A 20 x 30 and a 40 x 10 image (height x width) pad together to 48 x 32 (multiples of 16)."""
    images = [torch.ones(3, 20, 30), torch.full((3, 40, 10), 2.0)]
    batch, image_sizes = pad_batch(images, 16)
    assert batch.shape == (2, 3, 48, 32)
    assert image_sizes.tolist() == [[20, 30], [40, 10]] and image_sizes.dtype == torch.int64
    for image, (height, width) in zip(batch, image_sizes.tolist(), strict=True):
        assert (image[:, :height, :width] > 0).all()
        assert image.sum() == image[:, :height, :width].sum()  # the rest is zeros


def test_valid_sizes_are_the_whole_batch_unless_given():
    images = torch.zeros(2, 3, 64, 96)
    assert valid_sizes(images, None).tolist() == [[64.0, 96.0], [64.0, 96.0]]
    given = valid_sizes(images, torch.tensor([[64, 96], [30, 50]]))
    assert given.tolist() == [[64.0, 96.0], [30.0, 50.0]] and given.dtype == images.dtype


@pytest.mark.parametrize("shape", [(2,), (3, 2), (2, 3)])
def test_image_sizes_of_the_wrong_shape_are_refused(shape):
    with pytest.raises(ValueError, match=r"image_sizes must be \(2, 2\)"):
        valid_sizes(torch.zeros(2, 3, 64, 96), torch.ones(shape))
