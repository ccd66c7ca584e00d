"""CUHK-SYSU, read from the files exactly as distributed.

Layout (``docs/datasets.md``)::

    Image/SSM/s1.jpg ...
    annotation/Images.mat       Img: imname, nAppear, box = (idlocate [x y w h], ishard)
    annotation/pool.mat         pool: the test image names
    annotation/test/train_test/
        Train.mat               Train: idname, nAppear, scene = (imname, idlocate, ishard)
        TestG{N}.mat            TestG{N}: Query = (imname, idlocate, ishard, idname),
                                          Gallery = N x (imname, idlocate or [], ishard)

Images.mat lists every person box, labeled or not. A box belongs to an identity only when it is
exactly equal to a box listed for that identity: in Train.mat for the training split, in a
TestG50 query or gallery entry for the test split. Image names in our annotations are file stems
("s1"), the same in every dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import (
    mat_column,
    mat_field,
    mat_numbers,
    mat_records,
    mat_string,
    mat_strings,
    mat_variable,
    read_mat,
    require_file,
    require_images,
    require_root,
)
from .base import UNLABELED, DatasetError, GalleryItem, PersonSearchSplit, Query, SceneAnnotation

logger = logging.getLogger(__name__)

FULL_GALLERY = -1
"""``gallery_size`` of the "full gallery" protocol: the TestG50 gallery plus the whole test pool."""

_ROOT_HINT = "the CUHK-SYSU folder (it contains Image/ and annotation/)"
_IMAGES_MAT = "annotation/Images.mat"
_POOL_MAT = "annotation/pool.mat"
_TRAIN_MAT = "annotation/test/train_test/Train.mat"
_IMAGE_DIR = "Image/SSM"
# TestG50 defines which test boxes carry an identity, whatever gallery size is evaluated.
_LABELING_GALLERY_SIZE = 50
_DISTRIBUTED_GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)


@dataclass
class _Scene:
    """An image of Images.mat while identities are being assigned to its boxes."""

    file_name: str  # "s1.jpg", as the .mat files spell it
    xywh: np.ndarray  # (n, 4) float64, the valid boxes exactly as stored
    pids: np.ndarray  # (n,) int64, UNLABELED until an identity list claims the box


@dataclass(frozen=True)
class _Sighting:
    """One box of one identity, as an identity list (Train.mat, TestG) gives it."""

    file_name: str
    xywh: np.ndarray  # (4,) float64


@dataclass(frozen=True)
class _ProtocolEntry:
    """One query of a TestG file and its gallery: positives (with boxes) first, then negatives."""

    idname: str
    query: _Sighting
    positives: list[_Sighting]
    negatives: list[str]


def load_cuhk_sysu(
    root: str | os.PathLike[str], split: str, gallery_size: int = 100
) -> PersonSearchSplit:
    """Load the training split or the test split (gallery images + queries) of CUHK-SYSU.

    ``gallery_size`` picks the test protocol: N reads the queries and their galleries from
    ``TestG{N}.mat`` (100 is the size papers quote); ``-1`` is the full gallery, the TestG50
    gallery followed by every other test pool image as a negative, each image once, never the
    query's own image. Training images are all images of Images.mat minus the pool, in
    Images.mat order; test images are the pool, in pool order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CUHK-SYSU split must be 'train' or 'test', got {split!r}")
    root = require_root(root, _ROOT_HINT)
    scenes = _read_scenes(root)
    pool = _read_pool(root, scenes)

    if split == "train":
        _assign_identities(scenes, _read_train_identities(root), source=_TRAIN_MAT)
        in_pool = set(pool)
        file_names = [name for name in scenes if name not in in_pool]
        queries: list[Query] = []
    else:
        queries = _label_test_split(root, scenes, pool, gallery_size)
        file_names = pool

    require_images(root / _IMAGE_DIR, file_names, listed_in=_IMAGES_MAT)
    images = [_scene_annotation(root, scenes[name]) for name in file_names]
    return PersonSearchSplit("cuhk_sysu", split, root, images, queries)


def _label_test_split(
    root: Path, scenes: dict[str, _Scene], pool: list[str], gallery_size: int
) -> list[Query]:
    """Label the test boxes from TestG50 and read the queries of the chosen protocol."""
    protocol_file = _protocol_file(root, gallery_size)
    labeling = _read_protocol(root, _LABELING_GALLERY_SIZE)
    identities: dict[str, list[_Sighting]] = {}
    for entry in labeling:
        identities.setdefault(entry.idname, []).extend([entry.query, *entry.positives])
    source = _protocol_name(_LABELING_GALLERY_SIZE)
    pid_of = _assign_identities(scenes, identities, source=source)
    if gallery_size in (FULL_GALLERY, _LABELING_GALLERY_SIZE):
        protocol = labeling
    else:
        protocol = _read_protocol_file(protocol_file)
    return _build_queries(protocol, pid_of, pool, full_gallery=gallery_size == FULL_GALLERY)


def _protocol_name(gallery_size: int) -> str:
    return f"annotation/test/train_test/TestG{gallery_size}.mat"


def _protocol_file(root: Path, gallery_size: int) -> Path:
    """The TestG file that holds the queries for ``gallery_size`` (TestG50 for the full gallery)."""
    size = _LABELING_GALLERY_SIZE if gallery_size == FULL_GALLERY else gallery_size
    if size <= 0:
        raise ValueError(f"gallery_size must be positive or {FULL_GALLERY}, got {gallery_size}")
    path = root / _protocol_name(size)
    if not path.is_file():
        sizes = ", ".join(map(str, _DISTRIBUTED_GALLERY_SIZES))
        raise DatasetError(
            f"{root}: no {_protocol_name(size)}; CUHK-SYSU is distributed with gallery sizes "
            f"{sizes} ({FULL_GALLERY}: the full test pool)"
        )
    return path


def _stem(file_name: str) -> str:
    return os.path.splitext(file_name)[0]


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    """(..., 4) x y w h -> x1 y1 x2 y2, float32."""
    xy, wh = xywh[..., :2], xywh[..., 2:]
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def _box(value: object, where: str) -> np.ndarray:
    """An ``idlocate`` value as (4,) float64 x y w h; ``where`` names it for errors."""
    box = mat_numbers(value)
    if box.shape != (4,):
        raise DatasetError(f"{where}: a box of {box.size} numbers, expected x y w h")
    return box


def _read_scenes(root: Path) -> dict[str, _Scene]:
    """Every image of Images.mat and its valid boxes (w > 0 and h > 0), in file order."""
    path = require_file(root, _IMAGES_MAT, _ROOT_HINT)
    images = mat_variable(read_mat(path), path, ["Img"])
    scenes: dict[str, _Scene] = {}
    for name, boxes in zip(
        mat_column(images, "imname", path), mat_column(images, "box", path), strict=True
    ):
        file_name = mat_string(name)
        xywh = _image_boxes(boxes, path, file_name)
        xywh = xywh[(xywh[:, 2] > 0) & (xywh[:, 3] > 0)]
        scenes[file_name] = _Scene(file_name, xywh, np.full(len(xywh), UNLABELED, dtype=np.int64))
    return scenes


def _image_boxes(boxes: np.ndarray, path: Path, file_name: str) -> np.ndarray:
    """The ``box`` field of one Images.mat record as (n, 4) x y w h; ``[]`` means no person."""
    where = f"{path}: {file_name}"
    xywh = [_box(idlocate, where) for idlocate in mat_column(boxes, "idlocate", path)]
    return np.array(xywh, dtype=np.float64).reshape(-1, 4)


def _read_pool(root: Path, scenes: dict[str, _Scene]) -> list[str]:
    """The test pool's image names, each of which Images.mat must describe."""
    path = require_file(root, _POOL_MAT, _ROOT_HINT)
    pool = mat_strings(mat_variable(read_mat(path), path, ["pool"]))
    unknown = [name for name in pool if name not in scenes]
    if unknown:
        raise DatasetError(
            f"{path}: {len(unknown)} pool images are not in {_IMAGES_MAT}, e.g. {unknown[:3]}"
        )
    return pool


def _read_train_identities(root: Path) -> dict[str, list[_Sighting]]:
    """Train.mat: every training identity's boxes, in file order."""
    path = require_file(root, _TRAIN_MAT, _ROOT_HINT)
    identities: dict[str, list[_Sighting]] = {}
    for record in mat_records(mat_variable(read_mat(path), path, ["Train"])):
        idname = mat_string(mat_field(record, "idname", path))
        sightings = [
            _sighting(scene, path) for scene in mat_records(mat_field(record, "scene", path))
        ]
        identities.setdefault(idname, []).extend(sightings)
    return identities


def _sighting(record: np.void, path: Path) -> _Sighting:
    file_name = mat_string(mat_field(record, "imname", path))
    return _Sighting(file_name, _box(mat_field(record, "idlocate", path), f"{path}: {file_name}"))


def _read_protocol(root: Path, gallery_size: int) -> list[_ProtocolEntry]:
    return _read_protocol_file(_protocol_file(root, gallery_size))


def _read_protocol_file(path: Path) -> list[_ProtocolEntry]:
    """A TestG file: one entry per query. The first empty gallery box ends the positives."""
    variable = path.stem  # TestG100.mat holds the variable TestG100
    entries = []
    for record in mat_records(mat_variable(read_mat(path), path, [variable])):
        query_record = mat_records(mat_field(record, "Query", path))[0]
        idname = mat_string(mat_field(query_record, "idname", path))
        gallery = mat_field(record, "Gallery", path)
        names = [mat_string(name) for name in mat_column(gallery, "imname", path)]
        boxes = mat_column(gallery, "idlocate", path)
        num_positives = next((i for i, box in enumerate(boxes) if box.size == 0), len(boxes))
        positives = [
            _Sighting(name, _box(box, f"{path}: {name}"))
            for name, box in zip(names[:num_positives], boxes[:num_positives], strict=True)
        ]
        entries.append(
            _ProtocolEntry(idname, _sighting(query_record, path), positives, names[num_positives:])
        )
    return entries


def _assign_identities(
    scenes: dict[str, _Scene], identities: dict[str, list[_Sighting]], source: str
) -> dict[str, int]:
    """Give each identity a contiguous id (in list order) and write it on its boxes.

    Returns the id of every identity name. A sighting whose box equals no valid box of its image
    labels nothing (the box was degenerate or the annotation files disagree); their number is
    logged.
    """
    pid_of = {idname: pid for pid, idname in enumerate(identities)}
    box_index = {name: _first_index_of_each_box(scene.xywh) for name, scene in scenes.items()}
    unmatched = 0
    for idname, sightings in identities.items():
        pid = pid_of[idname]
        for sighting in sightings:
            if sighting.file_name not in scenes:
                raise DatasetError(
                    f"{source}: identity {idname} is in {sighting.file_name}, "
                    f"which {_IMAGES_MAT} does not list"
                )
            index = box_index[sighting.file_name].get(tuple(sighting.xywh))
            if index is None:
                unmatched += 1
                continue
            pids = scenes[sighting.file_name].pids
            if pids[index] not in (UNLABELED, pid):
                raise DatasetError(
                    f"{source}: box {sighting.xywh.tolist()} of {sighting.file_name} is given to "
                    f"two identities, {idname} and {list(identities)[pids[index]]}"
                )
            pids[index] = pid
    if unmatched:
        logger.warning(
            "%s: %d identity boxes equal no valid box of %s; they label nothing",
            source,
            unmatched,
            _IMAGES_MAT,
        )
    return pid_of


def _first_index_of_each_box(xywh: np.ndarray) -> dict[tuple[float, ...], int]:
    index: dict[tuple[float, ...], int] = {}
    for i, box in enumerate(xywh.tolist()):
        index.setdefault(tuple(box), i)
    return index


def _build_queries(
    protocol: list[_ProtocolEntry], pid_of: dict[str, int], pool: list[str], full_gallery: bool
) -> list[Query]:
    # Negative gallery items carry no per-query data: one shared object per image keeps the
    # full-gallery protocol (thousands of queries x the whole pool) small.
    negative_item = {name: GalleryItem(_stem(name), None) for name in pool}
    queries = []
    for entry in protocol:
        if entry.idname not in pid_of:
            raise DatasetError(
                f"query {entry.idname} in {entry.query.file_name} is not a query of "
                f"{_protocol_name(_LABELING_GALLERY_SIZE)}, which defines the test identities"
            )
        _require_in_pool(entry, negative_item.keys())
        gallery = [GalleryItem(_stem(s.file_name), _xyxy(s.xywh)) for s in entry.positives]
        gallery += [negative_item[name] for name in entry.negatives]
        if full_gallery:
            gallery += _rest_of_pool(entry, pool, negative_item)
        queries.append(
            Query(
                pid=pid_of[entry.idname],
                image=_stem(entry.query.file_name),
                box=_xyxy(entry.query.xywh),
                gallery=tuple(gallery),
            )
        )
    return queries


def _require_in_pool(entry: _ProtocolEntry, pool: Set[str]) -> None:
    """A query and its gallery are test images: the evaluator looks them up in the pool."""
    named = [entry.query.file_name, *(s.file_name for s in entry.positives), *entry.negatives]
    outside = [name for name in named if name not in pool]
    if outside:
        raise DatasetError(
            f"query {entry.idname} (in {entry.query.file_name}) refers to images outside the "
            f"test pool of {_POOL_MAT}: {outside[:3]}"
        )


def _rest_of_pool(
    entry: _ProtocolEntry, pool: Iterable[str], negative_item: dict[str, GalleryItem]
) -> list[GalleryItem]:
    """Pool images the protocol gallery does not list yet, the query's own image excluded."""
    listed = {entry.query.file_name, *entry.negatives, *(s.file_name for s in entry.positives)}
    return [negative_item[name] for name in pool if name not in listed]


def _scene_annotation(root: Path, scene: _Scene) -> SceneAnnotation:
    return SceneAnnotation(
        name=_stem(scene.file_name),
        path=root / _IMAGE_DIR / scene.file_name,
        boxes=_xyxy(scene.xywh),
        pids=scene.pids,
    )
