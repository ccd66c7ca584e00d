"""Write scenes in the on-disk layouts of CUHK-SYSU, PRW and CrowdHuman.

These are the exact inverse of the loaders in :mod:`training.datasets`: they produce the files
the real datasets are distributed as (MATLAB structs nested the way ``scipy.io.loadmat`` returns
the real ones, text and JSON files), so that synthetic data and tests exercise the very code that
reads the real data. Identities are written the way each dataset spells them (CUHK-SYSU names
"p00001", PRW raw ids from 1 and -2 for unlabeled persons).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from training.datasets import UNLABELED, camera_of

JPEG_QUALITY = 90

QuerySpec = tuple[int, str, np.ndarray]
"""A query: (pid, name of the scene it is cropped from, its box x1 y1 x2 y2 in that scene)."""


def _no_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class SceneRecord:
    """One scene to write: an RGB image and its persons.

    ``name`` is the file stem ("s123", "c1s1_000151", a CrowdHuman ID); ``image`` (H, W, 3)
    uint8 RGB; ``boxes`` (n, 4) x1 y1 x2 y2; ``pids`` (n,) with >= 0 an identity and -1 an
    unlabeled person; ``camera`` for PRW (it must agree with the name), else -1;
    ``ignore_boxes`` (m, 4) CrowdHuman ignore regions.
    """

    name: str
    image: np.ndarray
    boxes: np.ndarray
    pids: np.ndarray
    camera: int = -1
    ignore_boxes: np.ndarray = field(default_factory=_no_boxes)

    def __post_init__(self) -> None:
        # Accept anything array-like, but hold arrays: the writers compare and slice them.
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64))
        object.__setattr__(self, "pids", np.asarray(self.pids, dtype=np.int64))
        object.__setattr__(self, "ignore_boxes", np.asarray(self.ignore_boxes, dtype=np.float64))
        image = self.image
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"{self.name}: image must be (H, W, 3) uint8, got {image.dtype} {image.shape}"
            )
        for what, boxes in (("boxes", self.boxes), ("ignore_boxes", self.ignore_boxes)):
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"{self.name}: {what} must be (n, 4), got {boxes.shape}")
        if self.pids.shape != (len(self.boxes),):
            raise ValueError(f"{self.name}: {len(self.boxes)} boxes but pids {self.pids.shape}")


# ---------------------------------------------------------------------------------------------
# CUHK-SYSU


def write_cuhk_sysu(
    root: str | os.PathLike[str],
    scenes: Sequence[SceneRecord],
    test_names: Iterable[str],
    queries: Sequence[QuerySpec],
    gallery_sizes: Sequence[int] = (50, 100),
    seed: int = 0,
) -> Path:
    """Write a CUHK-SYSU folder: Image/SSM/*.jpg and the annotation/ .mat files.

    Scenes named in ``test_names`` form the test pool (pool.mat), the others the training set;
    Train.mat lists every identity of the training scenes. For each gallery size N, TestG{N}.mat
    gives every query a gallery of the other test scenes showing its identity (positives, with
    the box), then scenes without it sampled with ``seed`` (negatives, with an empty box), N in
    all or fewer when the pool is smaller. TestG50 must be among them: the loader labels test
    boxes from it, so a test identity without a query reads back as unlabeled. Real CUHK-SYSU
    boxes are whole pixels; pass whole-pixel boxes to mimic them.
    """
    root = Path(root)
    by_name = _index_by_name(scenes)
    test = _known_names(test_names, by_name, "test_names")
    in_test = set(test)
    if 50 not in gallery_sizes:
        raise ValueError(f"gallery_sizes {tuple(gallery_sizes)} must include 50 (TestG50)")
    for pid, name, box in queries:
        if name not in in_test:
            raise ValueError(f"query of identity {pid} is in {name}, which is not a test scene")
        _index_of_box(by_name[name], pid, box)

    _write_images(root / "Image" / "SSM", scenes)
    annotation = root / "annotation"
    protocols = annotation / "test" / "train_test"
    protocols.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(annotation / "Images.mat", {"Img": _cuhk_images(scenes)})
    scipy.io.savemat(annotation / "pool.mat", {"pool": _cell([f"{name}.jpg" for name in test])})
    train = [scene for scene in scenes if scene.name not in in_test]
    scipy.io.savemat(protocols / "Train.mat", {"Train": _cuhk_train(train)})
    rng = np.random.default_rng(seed)
    pool = [by_name[name] for name in test]
    for size in gallery_sizes:
        variable = f"TestG{size}"
        protocol = _cuhk_protocol(queries, pool, size, rng)
        scipy.io.savemat(protocols / f"{variable}.mat", {variable: protocol})
    return root


def _cuhk_identity_name(pid: int) -> str:
    return f"p{pid + 1:05d}"


def _cuhk_images(scenes: Sequence[SceneRecord]) -> np.ndarray:
    """Img: 1 x N struct (imname, nAppear, box = 1 x n struct (idlocate, ishard))."""
    return _struct(
        [
            {
                "imname": f"{scene.name}.jpg",
                "nAppear": _scalar(len(scene.boxes)),
                "box": _struct(
                    [{"idlocate": _row(box), "ishard": _scalar(0)} for box in _xywh(scene.boxes)]
                ),
            }
            for scene in scenes
        ]
    )


def _cuhk_train(train: Sequence[SceneRecord]) -> np.ndarray:
    """Train: a cell column of 1 x 1 structs (idname, nAppear, scene = 1 x k struct)."""
    sightings: dict[int, list[dict[str, object]]] = {}
    for scene in train:
        for pid, box in zip(scene.pids.tolist(), _xywh(scene.boxes), strict=True):
            if pid != UNLABELED:
                entry = {"imname": f"{scene.name}.jpg", "idlocate": _row(box), "ishard": _scalar(0)}
                sightings.setdefault(pid, []).append(entry)
    identities = [
        _struct(
            [
                {
                    "idname": _cuhk_identity_name(pid),
                    "nAppear": _scalar(len(sightings[pid])),
                    "scene": _struct(sightings[pid]),
                }
            ]
        )
        for pid in sorted(sightings)
    ]
    return _cell(identities)


def _cuhk_protocol(
    queries: Sequence[QuerySpec],
    pool: Sequence[SceneRecord],
    gallery_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """TestG{N}: 1 x Q struct (Query = 1 x 1 struct, Gallery = 1 x N struct)."""
    entries = []
    for pid, name, box in queries:
        query = {
            "imname": f"{name}.jpg",
            "idlocate": _row(_xywh(box)[0]),
            "ishard": _scalar(0),
            "idname": _cuhk_identity_name(pid),
        }
        others = [scene for scene in pool if scene.name != name]
        positives = [scene for scene in others if pid in scene.pids]
        candidates = [scene for scene in others if pid not in scene.pids]
        count = min(max(gallery_size - len(positives), 0), len(candidates))
        negatives = [candidates[i] for i in rng.choice(len(candidates), count, replace=False)]
        gallery = [
            _gallery_entry(scene, _xywh(scene.boxes)[scene.pids == pid][0]) for scene in positives
        ]
        gallery += [_gallery_entry(scene, None) for scene in negatives]
        entries.append({"Query": _struct([query]), "Gallery": _struct(gallery)})
    return _struct(entries)


def _gallery_entry(scene: SceneRecord, xywh: np.ndarray | None) -> dict[str, object]:
    """One gallery item; a negative's box is an empty 1 x 0 double, as in the distributed files.

    The public evaluation scripts (OIM, SeqNet, COAT) take a gallery box as ``item[1][0]`` and
    test ``gt.size > 0``: a 1 x 0 matrix gives an empty row there, a 0 x 0 one an IndexError.
    """
    idlocate = np.zeros((1, 0)) if xywh is None else _row(xywh)
    return {"imname": f"{scene.name}.jpg", "idlocate": idlocate, "ishard": _scalar(0)}


# ---------------------------------------------------------------------------------------------
# PRW


def write_prw(
    root: str | os.PathLike[str],
    scenes: Sequence[SceneRecord],
    train_names: Iterable[str],
    test_names: Iterable[str],
    queries: Sequence[QuerySpec],
) -> Path:
    """Write a PRW folder: frames/, annotations/*.jpg.mat, frame lists, id lists, query_info.

    Every scene belongs to exactly one of ``train_names`` and ``test_names``; its name must start
    with its camera ("c3s2_044587"). Identities are written as raw PRW ids (pid + 1) and
    unlabeled persons as -2. query_info.txt has CRLF line endings and 4 decimals per number, as
    the distributed file.
    """
    root = Path(root)
    by_name = _index_by_name(scenes)
    train = _known_names(train_names, by_name, "train_names")
    test = _known_names(test_names, by_name, "test_names")
    _check_partition(by_name, train, test)
    in_test = set(test)
    for scene in scenes:
        if scene.camera not in (-1, camera_of(scene.name)):
            raise ValueError(f"{scene.name}: camera {scene.camera} disagrees with its name")
    for pid, name, box in queries:
        if name not in in_test:
            raise ValueError(f"query of identity {pid} is in {name}, which is not a test frame")
        _index_of_box(by_name[name], pid, box)

    _write_images(root / "frames", scenes)
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        raw_ids = np.where(scene.pids == UNLABELED, -2, scene.pids + 1)
        table = np.column_stack([raw_ids, _xywh(scene.boxes)]).astype(np.float64)
        scipy.io.savemat(annotations / f"{scene.name}.jpg.mat", {"box_new": table.reshape(-1, 5)})
    scipy.io.savemat(root / "frame_train.mat", {"img_index_train": _cell(train)})
    scipy.io.savemat(root / "frame_test.mat", {"img_index_test": _cell(test)})
    train_ids = sorted(
        {pid + 1 for name in train for pid in by_name[name].pids.tolist() if pid >= 0}
    )
    query_ids = sorted({pid + 1 for pid, _, _ in queries})
    scipy.io.savemat(root / "ID_train.mat", {"ID_train": _row(train_ids)})
    # The distributed ID_test.mat names its variable ID_test2 and lists the query identities.
    scipy.io.savemat(root / "ID_test.mat", {"ID_test2": _row(query_ids)})
    lines = [_query_line(pid, name, box) for pid, name, box in queries]
    (root / "query_info.txt").write_bytes("".join(lines).encode("utf-8"))
    return root


def _query_line(pid: int, frame: str, box: np.ndarray) -> str:
    x, y, w, h = _xywh(box)[0]
    return f"{pid + 1} {x:.4f} {y:.4f} {w:.4f} {h:.4f} {frame}\r\n"


def _check_partition(by_name: dict[str, SceneRecord], train: list[str], test: list[str]) -> None:
    both = set(train) & set(test)
    neither = set(by_name) - set(train) - set(test)
    if both or neither:
        raise ValueError(
            f"each scene must be in exactly one split: in both {sorted(both)}, "
            f"in neither {sorted(neither)}"
        )


# ---------------------------------------------------------------------------------------------
# CrowdHuman


def write_crowdhuman(
    root: str | os.PathLike[str], scenes: Sequence[SceneRecord], split: str
) -> Path:
    """Write Images/{ID}.jpg and annotation_{split}.odgt (one JSON object per line).

    Persons become "person" boxes with ``extra.ignore = 0``; ``ignore_boxes`` become "mask"
    boxes with ``extra.ignore = 1``. ``fbox`` is the given box; the synthetic scenes know no
    visible part, so ``vbox`` repeats it, and ``hbox`` is a plausible head (the middle third of
    the body's width, the top seventh of its height).
    """
    if split not in ("train", "val"):
        raise ValueError(f"CrowdHuman split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    _index_by_name(scenes)
    _write_images(root / "Images", scenes)
    lines = [
        json.dumps({"ID": scene.name, "gtboxes": _crowdhuman_boxes(scene)}) for scene in scenes
    ]
    (root / f"annotation_{split}.odgt").write_text("".join(f"{line}\n" for line in lines))
    return root


def _crowdhuman_boxes(scene: SceneRecord) -> list[dict[str, object]]:
    persons = [
        {
            "tag": "person",
            "fbox": _json_box(box),
            "vbox": _json_box(box),
            "hbox": _json_box(_head(box)),
            "extra": {"box_id": index, "occ": 0, "ignore": 0},
        }
        for index, box in enumerate(_xywh(scene.boxes))
    ]
    regions = [
        {
            "tag": "mask",
            "fbox": _json_box(box),
            "vbox": _json_box(box),
            "hbox": _json_box(box),
            "extra": {"ignore": 1},
        }
        for box in _xywh(scene.ignore_boxes)
    ]
    return persons + regions


def _head(xywh: np.ndarray) -> np.ndarray:
    x, y, w, h = xywh
    return np.array([x + w / 3, y, w / 3, h / 7])


def _json_box(xywh: np.ndarray) -> list[float | int]:
    """Whole numbers as JSON integers (as in the real files), others as floats."""
    return [int(v) if float(v).is_integer() else float(v) for v in xywh.tolist()]


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _index_by_name(scenes: Sequence[SceneRecord]) -> dict[str, SceneRecord]:
    by_name = {scene.name: scene for scene in scenes}
    if len(by_name) != len(scenes):
        raise ValueError("scene names must be unique")
    return by_name


def _known_names(names: Iterable[str], by_name: dict[str, SceneRecord], what: str) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"{what} names scenes that do not exist: {unknown[:3]}")
    return names


def _index_of_box(scene: SceneRecord, pid: int, box: np.ndarray) -> int:
    """The query box must be a box of its identity in its scene (the protocols refer to it)."""
    matches = np.flatnonzero((scene.pids == pid) & np.all(scene.boxes == np.asarray(box), axis=1))
    if matches.size == 0:
        raise ValueError(f"{scene.name} has no box {np.asarray(box).tolist()} of identity {pid}")
    return int(matches[0])


def _write_images(folder: Path, scenes: Sequence[SceneRecord]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        Image.fromarray(scene.image).save(folder / f"{scene.name}.jpg", quality=JPEG_QUALITY)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) or (4,) x1 y1 x2 y2 -> (n, 4) x y w h, float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


# MATLAB values as loadmat returns them from the real files: numbers are 1 x 1 (or 1 x n)
# doubles, lists of strings are cell columns, struct arrays are 1 x n, an empty struct list is [].


def _scalar(value: float) -> np.ndarray:
    return np.array([[float(value)]])


def _row(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(1, -1)


def _cell(values: Sequence[object]) -> np.ndarray:
    cell = np.empty((len(values), 1), dtype=object)
    for i, value in enumerate(values):
        cell[i, 0] = value
    return cell


def _struct(rows: Sequence[dict[str, object]]) -> np.ndarray:
    """A 1 x n MATLAB struct array from n dicts with the same keys."""
    if not rows:
        return np.zeros((0, 0))
    fields = list(rows[0])
    array = np.empty((1, len(rows)), dtype=[(name, object) for name in fields])
    for i, row in enumerate(rows):
        array[0, i] = tuple(row[name] for name in fields)
    return array
