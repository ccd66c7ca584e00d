"""The data's own re-id ceiling: a plain CNN that sees the true boxes.

``benchmarks/learn.py`` prints it beside the person search models, so a reader sees how far a
model is from what re-identification alone reaches on the same synthetic data when detection is
perfect. The reference is deliberately plain: the same narrow ResNet-18 as the tiny configs,
trained from scratch on ground-truth crops of the training split (labeled persons against the
OIM lookup table, unlabeled ones into its queue), embedding a crop by global average pooling, a
linear projection and batch norm. It is scored by the standard search protocol with the test
split's ground-truth boxes as the gallery's detections (score 1) and each query's own box as
its query ("GT-box" mode).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import resnet18
from models.losses import OIMLoss
from models.preprocess import PreprocessConfig
from training.config import EvalConfig
from training.data import read_rgb
from training.datasets import PersonSearchSplit, SceneAnnotation
from training.evaluation import Predictions
from training.inference import score_predictions

CROP_HEIGHT, CROP_WIDTH = 128, 64  # the usual person re-id crop, 2:1
EMBEDDING_DIM = 128


class CropEmbedder(nn.Module):
    """(N, 3, 128, 64) normalised crops -> (N, D) L2-normalised embeddings."""

    def __init__(self, base_width: int = 16, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.backbone = resnet18(
            out_stages=("res5",), frozen_stages=0, norm="bn", base_width=base_width
        )
        self.project = nn.Linear(self.backbone.out_channels["res5"], dim)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, crops: Tensor) -> Tensor:
        pooled = self.backbone(crops)["res5"].mean(dim=(2, 3))
        return F.normalize(self.norm(self.project(pooled)), dim=1)


@dataclass(frozen=True)
class Crops:
    """Person crops as uint8 (N, 3, 128, 64) and their identities (N,), -1 = unlabeled."""

    pixels: Tensor
    pids: Tensor


def crop_boxes(image: np.ndarray, boxes: np.ndarray) -> Tensor:
    """(n, 3, 128, 64) uint8 crops of (n, 4) x1 y1 x2 y2 boxes of an (H, W, 3) image, each
    resized (bilinear) to the crop size whatever its aspect ratio, as re-id crops are."""
    if len(boxes) == 0:
        return torch.zeros(0, 3, CROP_HEIGHT, CROP_WIDTH, dtype=torch.uint8)
    height, width = image.shape[:2]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    crops = []
    for x1, y1, x2, y2 in boxes:
        left, top = int(max(0, np.floor(x1))), int(max(0, np.floor(y1)))
        right, bottom = int(min(width, np.ceil(x2))), int(min(height, np.ceil(y2)))
        patch = pixels[:, :, top : max(bottom, top + 1), left : max(right, left + 1)]
        crops.append(F.interpolate(patch, (CROP_HEIGHT, CROP_WIDTH), mode="bilinear"))
    return torch.cat(crops).round().clamp(0, 255).to(torch.uint8)


def split_crops(images: Sequence[SceneAnnotation]) -> Crops:
    """Every annotated person of the images, in order."""
    pixels = [crop_boxes(read_rgb(a.path), a.boxes) for a in images]
    pids = [torch.as_tensor(a.pids, dtype=torch.long) for a in images]
    return Crops(torch.cat(pixels), torch.cat(pids))


def normalise(crops: Tensor) -> Tensor:
    """uint8 crops -> float, with the models' own preprocessing mean and std."""
    preprocess = PreprocessConfig()
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (crops.float() / 255 - mean) / std


def train_reference(
    train: PersonSearchSplit, minutes: float, seed: int = 0, batch_size: int = 64
) -> tuple[CropEmbedder, int]:
    """Train a CropEmbedder on the split's ground-truth crops for `minutes` (AdamW 1e-3, /10
    for the last fifth of the time, random horizontal flips); returns it (in eval mode) and
    the number of iterations it trained."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    crops = split_crops(train.images)
    model = CropEmbedder()
    criterion = OIMLoss(EMBEDDING_DIM, train.num_identities, queue_size=500, focal_gamma=2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    start, iterations = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < 60 * minutes:
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 if elapsed < 48 * minutes else 1e-4
        index = torch.randint(len(crops.pids), (batch_size,), generator=generator)
        batch = normalise(crops.pixels[index])
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        loss = sum(criterion(model(batch), crops.pids[index]).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iterations += 1
    return model.eval(), iterations


@torch.no_grad()
def embed(model: CropEmbedder, crops: Tensor, batch_size: int = 256) -> np.ndarray:
    """(n, D) float32 embeddings of uint8 crops."""
    parts = [model(normalise(crops[i : i + batch_size])) for i in range(0, len(crops), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, EMBEDDING_DIM), np.float32)


def reference_predictions(model: CropEmbedder, test: PersonSearchSplit) -> Predictions:
    """Every ground-truth box of the test split as a detection of score 1, and each query's
    embedding from its own box."""
    detections, embeddings = {}, {}
    for annotation in test.images:
        image = read_rgb(annotation.path)
        detections[annotation.name] = np.concatenate(
            [annotation.boxes, np.ones((len(annotation.boxes), 1), np.float32)], axis=1
        )
        embeddings[annotation.name] = embed(model, crop_boxes(image, annotation.boxes))
    by_name = test.by_name()
    query_crops = [crop_boxes(read_rgb(by_name[q.image].path), q.box[None]) for q in test.queries]
    query_embeddings = embed(model, torch.cat(query_crops))
    return Predictions(
        detections, embeddings, query_embeddings, tuple(q.image for q in test.queries)
    )


def evaluate_reference(model: CropEmbedder, test: PersonSearchSplit) -> dict[str, float]:
    """The standard search metrics of the reference on the test split (its detection metrics
    are those of the ground truth itself)."""
    return score_predictions(test, reference_predictions(model, test), EvalConfig(det_thresh=0.5))
