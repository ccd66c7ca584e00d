"""Training batches from a PersonSearchSplit: decoding, augmentation, sampling, collation.

Reproducibility: the shuffling order of an epoch depends only on (seed, epoch), and the
augmentation of a sample only on (seed, epoch, index), so an epoch replays identically whatever
the number of worker processes, and a run resumed in the middle of an epoch skips exactly the
batches it had already seen. Workers are re-created every epoch (``persistent_workers=False``),
which is how the dataset's epoch number reaches them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from models.preprocess import PreprocessConfig, pad_batch
from training.config import ConfigError, DataConfig
from training.datasets import (
    LOADERS,
    DatasetError,
    PersonSearchSplit,
    SceneAnnotation,
    load_dataset,
)
from training.transforms import TrainTransform

Target = dict[str, Tensor]


class Batch(NamedTuple):
    """A training batch: images zero-padded into one (B, 3, H, W) tensor, the (height, width)
    (B, 2) int64 of each image after its resize (the model's ``image_sizes``), and targets."""

    images: Tensor
    image_sizes: Tensor
    targets: list[Target]


def load_split(data: DataConfig, split: str, **options: object) -> PersonSearchSplit:
    """Load a split of the configured dataset. A bad dataset name or split is a ConfigError; a
    wrong data root a DatasetError whose message names what is missing where."""
    if data.dataset not in LOADERS:
        raise ConfigError(f"data.dataset: unknown dataset {data.dataset!r}; known: {list(LOADERS)}")
    try:
        return load_dataset(data.dataset, data.root, split, **options)
    except DatasetError:
        raise
    except ValueError as error:  # the loaders' complaint about a split name
        raise ConfigError(f"data: {error}") from None


def read_rgb(path: Path) -> np.ndarray:
    """Decode a dataset frame as an (H, W, 3) uint8 RGB array, as stored.

    Not with the service's decoder (``indexer/images.py``), which turns a photo upright by its
    EXIF orientation: the datasets give their boxes in the stored pixel grid, and a turned frame
    would no longer match its boxes. Their frames are 8-bit camera frames (JPEG, PNG), which
    both decoders read to the same pixels.
    """
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot decode the image ({error})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header only."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot read the image header ({error})") from None


class TrainingImages(Dataset):
    """The images of a split that hold at least one person box, augmented for training.

    Item i is ``(image (3, h, w) float, target)`` with target ``boxes`` (n, 4) float32 in the
    resized image's pixels, ``pids`` (n,) int64 (-1 = unlabeled) and ``ignore_boxes`` (m, 4)
    (regions that are neither positives nor negatives, e.g. CrowdHuman's crowd masks).
    """

    def __init__(self, split: PersonSearchSplit, transform: TrainTransform, seed: int) -> None:
        # An image without persons has nothing to learn from in these one-step models.
        self.annotations: list[SceneAnnotation] = [a for a in split.images if len(a.boxes)]
        if not self.annotations:
            raise DatasetError(
                f"{split.root}: the {split.split} split of {split.dataset} has no image with a "
                "person box to train on"
            )
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of `epoch` (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        annotation = self.annotations[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pixels, (boxes, ignore_boxes) = self.transform(
            read_rgb(annotation.path), [annotation.boxes, annotation.ignore_boxes], rng
        )
        pids = torch.as_tensor(annotation.pids, dtype=torch.int64)
        return pixels, {"boxes": boxes, "pids": pids, "ignore_boxes": ignore_boxes}


class PadCollate:
    """Stack images into a zero-padded (B, 3, H, W) batch with each image's size; targets stay
    a list of dicts."""

    def __init__(self, size_divisor: int) -> None:
        self.size_divisor = size_divisor

    def __call__(self, samples: Sequence[tuple[Tensor, Target]]) -> Batch:
        images, image_sizes = pad_batch([image for image, _ in samples], self.size_divisor)
        return Batch(images, image_sizes, [target for _, target in samples])


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of this process's share of a shuffled epoch, optionally grouped by orientation.

    The shuffled order comes from ``DistributedSampler`` (seeded by seed + epoch; with one
    process it is a plain seeded shuffle), so every process draws a disjoint, equally long share.
    With `groups` (one group id per image, e.g. 0 landscape / 1 portrait) a batch holds images of
    one group; the leftovers of each group at the end of the epoch are batched together. Either
    way a process yields ceil(share / batch_size) batches, the same count on every process, which
    DDP needs.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[int] | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.groups = groups
        self.indices = DistributedSampler(
            range(num_images), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the order of `epoch` and skip its first `start_batch` batches (resuming)."""
        self.indices.set_epoch(epoch)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(list(self.indices))
        return iter(batches[self.start_batch :])

    def _batches(self, order: list[int]) -> list[list[int]]:
        size = self.batch_size
        if self.groups is None:
            return [order[i : i + size] for i in range(0, len(order), size)]
        batches: list[list[int]] = []
        pending: dict[int, list[int]] = {}
        for index in order:
            bucket = pending.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == size:
                batches.append(bucket[:])
                bucket.clear()
        leftovers = [index for bucket in pending.values() for index in bucket]
        batches += [leftovers[i : i + size] for i in range(0, len(leftovers), size)]
        return batches


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's global generators in a DataLoader worker from torch's seed,
    which the loader derives from its generator and the worker id."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class TrainLoader:
    """Training batches (:class:`Batch`) of a split, one epoch at a time."""

    def __init__(
        self,
        split: PersonSearchSplit,
        config: DataConfig,
        preprocess: PreprocessConfig,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        transform = TrainTransform(preprocess, config.multiscale, config.flip_prob)
        self.dataset = TrainingImages(split, transform, seed)
        groups = (
            orientation_groups(self.dataset.annotations) if config.group_by_aspect_ratio else None
        )
        self.batch_sampler = EpochBatchSampler(
            len(self.dataset), config.batch_size, seed, rank, world_size, groups
        )
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=config.workers,
            collate_fn=PadCollate(preprocess.size_divisor),
            pin_memory=pin_memory,
            worker_init_fn=seed_worker,
            generator=self.generator,
        )

    def __len__(self) -> int:
        """Batches per epoch (for this process)."""
        return self.batch_sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch`, from batch `start_batch` on."""
        self.dataset.set_epoch(epoch)
        self.batch_sampler.set_epoch(epoch, start_batch)
        # The loader draws its workers' seeds from this generator, not from torch's global one,
        # so iterating does not disturb the model's random stream.
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return iter(self.loader)


def orientation_groups(annotations: Sequence[SceneAnnotation]) -> list[int]:
    """0 for landscape (width >= height) images, 1 for portrait ones."""
    groups = []
    for annotation in annotations:
        width, height = image_size(annotation.path)
        groups.append(0 if width >= height else 1)
    return groups
