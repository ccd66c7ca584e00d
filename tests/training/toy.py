"""A toy person search model that satisfies the model contract, a tiny PRW dataset and a config
for both: what the trainer's tests train.

The toy model is a small conv net: per stride-8 cell a person-centre logit, a box and an
embedding, trained with BCE, L1 and an identity classifier. It has dropout (so resuming must
restore the random streams) and a buffer updated in training across ranks (so checkpoints must
carry buffers, as OIM's tables), and it can send itself SIGINT to test interruption.
"""

import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from pydantic import Field
from torch import Tensor, nn

from models.config import StrictModel
from models.preprocess import PreprocessConfig
from models.types import Detections
from training.synthetic.writers import SceneRecord, write_prw

# ---------------------------------------------------------------------------------------------
# A tiny PRW dataset: 8 training frames (4 batches of 2), 4 test frames, 2 queries.

HEIGHT, WIDTH = 48, 64
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 220, 40)]
UNLABELED_COLOUR = (160, 160, 160)


def frame(rng: np.random.Generator, name: str, pids: list[int]) -> SceneRecord:
    image = np.full((HEIGHT, WIDTH, 3), 70, dtype=np.uint8)
    boxes = []
    for slot, pid in enumerate(pids):  # one person per half of the frame, 12 x 24 pixels
        x = int(rng.integers(0, WIDTH // 2 - 12)) + slot * WIDTH // 2
        y = int(rng.integers(0, HEIGHT - 24))
        image[y : y + 24, x : x + 12] = COLOURS[pid] if pid >= 0 else UNLABELED_COLOUR
        boxes.append([x, y, x + 12, y + 24])
    return SceneRecord(name, image, np.array(boxes, np.float32), np.array(pids), int(name[1]))


def write_tiny_prw(root: Path) -> Path:
    rng = np.random.default_rng(0)
    train_pids = [[0, 1], [1, -1], [0, 1], [-1, 0], [0, 1], [1, 0], [0, -1], [1, 1]]
    train = [frame(rng, f"c{1 + i % 3}s1_{i:06d}", p) for i, p in enumerate(train_pids)]
    test_pids = [[2, 3], [3, -1], [2, -1], [3, 2]]
    test = [frame(rng, f"c{1 + i % 2}s2_{i:06d}", p) for i, p in enumerate(test_pids)]
    queries = [(2, test[0].name, test[0].boxes[0]), (3, test[1].name, test[1].boxes[0])]
    write_prw(root, train + test, [s.name for s in train], [s.name for s in test], queries)
    return root


# ---------------------------------------------------------------------------------------------
# The toy model.


class ToyConfig(StrictModel):
    num_ids: int = Field(2, description="Training identities.")
    dim: int = Field(8, description="Embedding length.")
    slots: int = Field(6, description="Detections per image (K).")


class ToyPersonSearch(nn.Module):
    stride = 8

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = ToyConfig.model_validate(config)
        self.preprocess = PreprocessConfig(min_size=HEIGHT, max_size=WIDTH, size_divisor=16)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Dropout(0.1),
        )
        self.head = nn.Conv2d(32, 5 + self.config.dim, 1)
        self.classifier = nn.Linear(self.config.dim, self.config.num_ids)
        self.register_buffer("id_counts", torch.zeros(self.config.num_ids))
        self.history: list[float] = []
        self.interrupt_after: int | None = None
        self.batches: list[tuple[tuple[int, ...], Tensor | None]] = []  # (shape, image_sizes)

    def forward(
        self,
        images: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        *,
        image_sizes: Tensor | None = None,
    ):
        # The toy reads whole cells; it only records image_sizes for the tests.
        if self.training:
            self.batches.append((tuple(images.shape), image_sizes))
        out = self.head(self.features(images))
        logits, deltas, embeddings = out[:, 0], out[:, 1:5], F.normalize(out[:, 5:], dim=1)
        if self.training:
            return self._losses(logits, deltas, embeddings, targets)
        return self._detect(logits, deltas, embeddings)

    def _losses(self, logits, deltas, embeddings, targets):
        heat = torch.zeros_like(logits)
        images, cells_y, cells_x, box_targets, pids = [], [], [], [], []
        for b, target in enumerate(targets):
            boxes = target["boxes"]
            centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
            cx = (centre[:, 0] / self.stride).long().clamp(0, logits.shape[2] - 1)
            cy = (centre[:, 1] / self.stride).long().clamp(0, logits.shape[1] - 1)
            heat[b, cy, cx] = 1.0
            cell_centre = (torch.stack([cx, cy], 1).float() + 0.5) * self.stride
            offsets = (centre - cell_centre) / self.stride
            box_targets.append(torch.cat([offsets, (size / self.stride).log()], 1))
            images.append(torch.full_like(cx, b))
            cells_y.append(cy)
            cells_x.append(cx)
            pids.append(target["pids"])
        b, cy, cx, pids = (torch.cat(v) for v in (images, cells_y, cells_x, pids))
        box_loss = F.l1_loss(deltas[b, :, cy, cx], torch.cat(box_targets))
        class_logits = self.classifier(embeddings[b, :, cy, cx]) * 4
        labeled = max(1, int((pids >= 0).sum()))
        reid = F.cross_entropy(class_logits, pids, ignore_index=-1, reduction="sum") / labeled
        losses = {
            "loss_centre": F.binary_cross_entropy_with_logits(logits, heat),
            "loss_box": box_loss,
            "loss_reid": reid,
        }
        self._count_identities(pids)
        self.history.append(float(sum(losses.values()).detach()))
        if self.interrupt_after == len(self.history):
            os.kill(os.getpid(), signal.SIGINT)
        return losses

    def _count_identities(self, pids: Tensor) -> None:
        counts = torch.bincount(pids[pids >= 0], minlength=self.config.num_ids).float()
        if dist.is_initialized():  # like OIM's tables, the same on every rank
            dist.all_reduce(counts)
        self.id_counts += counts

    def _detect(self, logits, deltas, embeddings) -> Detections:
        width = logits.shape[2]
        scores, index = logits.sigmoid().flatten(1).topk(self.config.slots, dim=1)
        cells = torch.stack([index % width, index // width], 2).float()  # (B, K, 2) x, y
        picked = deltas.flatten(2).gather(2, index[:, None].expand(-1, 4, -1)).transpose(1, 2)
        centre = (cells + 0.5 + picked[..., :2]) * self.stride
        size = picked[..., 2:].exp() * self.stride
        boxes = torch.cat([centre - size / 2, centre + size / 2], 2)
        dim = embeddings.shape[1]
        vectors = embeddings.flatten(2).gather(2, index[:, None].expand(-1, dim, -1))
        return Detections(boxes, scores, vectors.transpose(1, 2))


def config_file(tmp_path: Path, prw_root: Path, **sections) -> Path:
    config = {
        "model": {"num_ids": 2},
        "data": {
            "dataset": "prw",
            "root": str(prw_root),
            "batch_size": 2,
            "workers": 0,
            "multiscale": {"mode": "range", "short_side": [40, 56], "long_side": [56, 72]},
        },
        "optim": {"name": "sgd", "lr": 0.05, "clip_grad_norm": 10.0},
        "schedule": {"epochs": 2, "warmup_iters": 2, "milestones": [2]},
        "eval": {"at_end": False, "det_thresh": 0.3},
        "device": "cpu",
        "tensorboard": False,
        "log_every": 2,
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
