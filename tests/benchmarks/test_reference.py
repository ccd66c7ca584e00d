"""benchmarks/reference.py: the ground-truth-crop reference crops, trains and is scored with the
true boxes as its detections."""

import numpy as np
import pytest
import torch

from benchmarks import reference
from training.datasets import load_dataset
from training.synthetic import generate

TINY_PRW = {
    "train_identities": 3,
    "test_identities": 2,
    "train_images": 4,
    "test_images": 4,
    "cameras": 2,
    "progress": False,
}


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = tmp_path_factory.mktemp("prw")
    generate("prw", root, seed=0, **TINY_PRW)
    return load_dataset("prw", root, "train"), load_dataset("prw", root, "test")


def test_a_box_is_cropped_to_the_re_id_crop_size_and_clipped_to_the_image():
    image = np.zeros((40, 30, 3), np.uint8)
    image[10:30, 5:15] = 200  # a bright person-sized block
    boxes = np.array([[5, 10, 15, 30], [-10, -10, 100, 100]], np.float32)
    crops = reference.crop_boxes(image, boxes)
    assert crops.shape == (2, 3, 128, 64) and crops.dtype == torch.uint8
    assert (crops[0] == 200).all()  # exactly the block, stretched to 128 x 64
    assert crops[1].float().mean() < 200  # the whole image: the block among black
    assert reference.crop_boxes(image, np.zeros((0, 4), np.float32)).shape == (0, 3, 128, 64)


def test_the_reference_detects_exactly_the_true_boxes_and_embeds_each_query_box(prw):
    train, test = prw
    model, iterations = reference.train_reference(train, minutes=1e-6, batch_size=4)
    assert iterations == 1 and not model.training
    predictions = reference.reference_predictions(model, test)
    for annotation in test.images:
        detections = predictions.detections[annotation.name]
        np.testing.assert_array_equal(detections[:, :4], annotation.boxes)
        assert (detections[:, 4] == 1).all()
        assert predictions.embeddings[annotation.name].shape == (len(annotation.boxes), 128)
    assert predictions.query_embeddings.shape == (len(test.queries), 128)
    metrics = reference.evaluate_reference(model, test)
    assert metrics["num_queries"] == len(test.queries) and 0 <= metrics["mAP"] <= 1
    assert metrics["det_ap"] == pytest.approx(1.0)  # the ground truth detects itself
