"""Types that cross package boundaries (models -> training, export, indexer)."""

from typing import NamedTuple

from torch import Tensor


class Detections(NamedTuple):
    """A model's inference output: fixed-size tensors, so the graph exports without
    data-dependent shapes. Thresholding happens outside the model.

    boxes:      (B, K, 4) x1 y1 x2 y2 in the pixels of the (resized, padded) input batch,
                inside each image's valid region (the model's ``image_sizes``)
    scores:     (B, K) sorted in descending order; unused slots have score 0
    embeddings: (B, K, D) L2-normalised re-id embeddings (zeros in unused slots)
    """

    boxes: Tensor
    scores: Tensor
    embeddings: Tensor
