"""Training data: decoding, skipping empty images, padding, sampling under DDP, resuming."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocess import PreprocessConfig
from training.config import ConfigError, DataConfig
from training.data import EpochBatchSampler, TrainLoader, load_split, read_rgb
from training.datasets import DatasetError, PersonSearchSplit, SceneAnnotation

PREPROCESS = PreprocessConfig(min_size=40, max_size=80, size_divisor=16)


def scene(root: Path, name: str, height: int, width: int, boxes, pids) -> SceneAnnotation:
    """A scene image (a gradient, so that resizing and flipping are visible) and its boxes."""
    path = root / f"{name}.png"
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)).save(path)
    return SceneAnnotation(
        name=name,
        path=path,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        pids=np.asarray(pids, dtype=np.int64),
    )


def split_of(images: list[SceneAnnotation]) -> PersonSearchSplit:
    return PersonSearchSplit("prw", "train", images[0].path.parent, images)


def no_augmentation(**changes) -> DataConfig:
    return DataConfig(workers=0, flip_prob=0.0, **changes)


def test_images_without_persons_are_not_trained_on(tmp_path):
    split = split_of(
        [
            scene(tmp_path, "a", 40, 60, [[1, 2, 11, 22]], [0]),
            scene(tmp_path, "empty", 40, 60, [], []),
            scene(tmp_path, "b", 40, 60, [[3, 4, 13, 24]], [-1]),
        ]
    )
    loader = TrainLoader(split, no_augmentation(batch_size=1), PREPROCESS, seed=0)
    names = sorted(a.name for a in loader.dataset.annotations)
    assert names == ["a", "b"]
    assert len(loader) == 2


def test_a_split_without_any_person_is_a_dataset_error(tmp_path):
    split = split_of([scene(tmp_path, "empty", 40, 60, [], [])])
    with pytest.raises(DatasetError, match="no image with a person box"):
        TrainLoader(split, no_augmentation(), PREPROCESS, seed=0)


def test_batches_are_padded_to_the_size_divisor_and_keep_their_sizes_and_targets(tmp_path):
    # Landscape 40 x 60 (H x W): scale min(40/40, 80/60) = 1, stays 40 x 60.
    # Portrait 30 x 20: scale min(40/20, 80/30) = 2, becomes 60 x 40; its box doubles.
    split = split_of(
        [
            scene(tmp_path, "landscape", 40, 60, [[1, 2, 11, 22]], [0]),
            scene(tmp_path, "portrait", 30, 20, [[2, 3, 10, 20], [0, 0, 5, 5]], [1, -1]),
        ]
    )
    loader = TrainLoader(split, no_augmentation(batch_size=2), PREPROCESS, seed=0)
    (images, image_sizes, targets), *rest = list(loader.epoch(0))
    assert rest == []
    # Padded to max(40, 60) = 60 -> 64 rows and max(60, 40) = 60 -> 64 columns.
    assert images.shape == (2, 3, 64, 64)
    sizes = {int(t["pids"][0]): size for t, size in zip(targets, image_sizes.tolist(), strict=True)}
    assert sizes == {0: [40, 60], 1: [60, 40]}  # (height, width) of each image in the batch
    by_first_pid = {int(t["pids"][0]): t for t in targets}
    assert by_first_pid[0]["boxes"].tolist() == [[1, 2, 11, 22]]
    assert by_first_pid[1]["boxes"].tolist() == [[4, 6, 20, 40], [0, 0, 10, 10]]
    assert by_first_pid[1]["pids"].tolist() == [1, -1]
    assert by_first_pid[1]["pids"].dtype == torch.int64
    assert by_first_pid[1]["ignore_boxes"].shape == (0, 4)
    # The padding is zeros: the portrait image (60 x 40) leaves columns 40.. empty.
    portrait = 0 if int(targets[0]["pids"][0]) == 1 else 1
    assert images[portrait, :, :, 40:].abs().sum() == 0


def test_processes_draw_disjoint_equally_long_shares_of_an_epoch():
    # 5 images on 2 processes: DistributedSampler pads to 6, so each process gets 3 indices,
    # ceil(3 / 2) = 2 batches.
    shares = []
    for rank in range(2):
        sampler = EpochBatchSampler(5, batch_size=2, seed=0, rank=rank, world_size=2)
        sampler.set_epoch(3)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2
        shares.append([i for batch in batches for i in batch])
    assert len(shares[0]) == len(shares[1]) == 3
    assert set(shares[0]) | set(shares[1]) == set(range(5))


def test_epoch_order_is_reproducible_and_changes_between_epochs():
    def order(epoch):
        sampler = EpochBatchSampler(50, batch_size=4, seed=7)
        sampler.set_epoch(epoch)
        return [i for batch in sampler for i in batch]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))


def test_resuming_mid_epoch_skips_exactly_the_batches_already_seen():
    sampler = EpochBatchSampler(11, batch_size=3, seed=1)
    sampler.set_epoch(2)
    everything = list(sampler)
    sampler.set_epoch(2, start_batch=2)
    assert list(sampler) == everything[2:]
    assert len(sampler) == len(everything) - 2


def test_orientation_groups_fill_batches_of_one_orientation():
    # Images 0-4 landscape (group 0), 5-9 portrait (group 1).
    groups = [0] * 5 + [1] * 5
    sampler = EpochBatchSampler(10, batch_size=2, seed=0, groups=groups)
    sampler.set_epoch(0)
    batches = list(sampler)
    # Each group fills 2 batches of 2 and leaves 1 image; the 2 leftovers share the last batch,
    # so the count is ceil(10 / 2) = 5 like without grouping.
    assert len(batches) == 5
    for batch in batches[:4]:
        assert len({groups[i] for i in batch}) == 1
    assert sorted(i for batch in batches for i in batch) == list(range(10))


def test_grouping_by_aspect_ratio_reads_image_orientations(tmp_path):
    split = split_of(
        [
            scene(tmp_path, "wide1", 20, 40, [[0, 0, 5, 5]], [0]),
            scene(tmp_path, "tall1", 40, 20, [[0, 0, 5, 5]], [1]),
            scene(tmp_path, "wide2", 20, 40, [[0, 0, 5, 5]], [2]),
            scene(tmp_path, "tall2", 40, 20, [[0, 0, 5, 5]], [3]),
        ]
    )
    config = no_augmentation(batch_size=2, group_by_aspect_ratio=True)
    loader = TrainLoader(split, config, PREPROCESS, seed=0)
    for images, _, _ in loader.epoch(0):
        # Two landscape images resize to 40 x 80, two portrait ones to 80 x 40: never mixed,
        # so a batch is never padded to 80 x 80.
        assert images.shape[-2:] in {(48, 80), (80, 48)}


def test_worker_processes_produce_the_same_batches_as_the_main_process(tmp_path):
    images = [scene(tmp_path, f"s{i}", 30 + i, 50, [[1, 2, 11, 22]], [i]) for i in range(4)]
    multiscale = {"mode": "range", "short_side": [20, 40], "long_side": [40, 80]}
    config = DataConfig(batch_size=2, flip_prob=0.5, multiscale=multiscale, workers=0)
    serial = list(TrainLoader(split_of(images), config, PREPROCESS, seed=3).epoch(1))
    config = config.model_copy(update={"workers": 2})
    parallel = list(TrainLoader(split_of(images), config, PREPROCESS, seed=3).epoch(1))
    assert len(serial) == len(parallel) == 2
    for (images_a, sizes_a, targets_a), (images_b, sizes_b, targets_b) in zip(
        serial, parallel, strict=True
    ):
        assert torch.equal(images_a, images_b) and torch.equal(sizes_a, sizes_b)
        for a, b in zip(targets_a, targets_b, strict=True):
            assert torch.equal(a["boxes"], b["boxes"])


def test_unreadable_images_are_dataset_errors_naming_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.jpg: image file not found"):
        read_rgb(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot decode"):
        read_rgb(broken)


def test_grayscale_images_are_decoded_as_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((4, 6), 77, dtype=np.uint8)).save(path)
    pixels = read_rgb(path)
    assert pixels.shape == (4, 6, 3)
    assert pixels.dtype == np.uint8
    assert (pixels == 77).all()


def test_loading_a_split_reports_config_and_data_root_mistakes(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.dataset: unknown dataset 'prww'"):
        load_split(DataConfig(dataset="prww", root=tmp_path), "train")
    with pytest.raises(ConfigError, match="split must be 'train' or 'test'"):
        load_split(DataConfig(dataset="prw", root=tmp_path), "validation")
    with pytest.raises(DatasetError, match="no such folder"):
        load_split(DataConfig(dataset="prw", root=tmp_path / "nowhere"), "train")
