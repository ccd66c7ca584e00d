"""PRW, read from the files exactly as distributed.

Layout (``docs/datasets.md``)::

    frames/c1s1_000151.jpg ...             1920x1080 frames; the name starts with the camera
    annotations/c1s1_000151.jpg.mat        box_new (or anno_file, anno_previous): (n, 5) id x y w h
    frame_train.mat, frame_test.mat        img_index_train / img_index_test: frame names
    ID_train.mat                           ID_train: the raw training identities
    query_info.txt                         "pid x y w h frame" per line

Raw identity -2 marks an unlabeled person. Raw ids are not contiguous (training: 1-478, 480-483
and 932), so each split maps its raw ids, in increasing order, to 0..K-1: the training split
from ID_train.mat, the test split from every id its annotations and queries use. Boxes are
converted to x1 y1 x2 y2 and then clipped at 0 (some coordinates are slightly negative).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import (
    mat_numbers,
    mat_strings,
    mat_variable,
    read_mat,
    require_file,
    require_images,
    require_root,
)
from .base import UNLABELED, DatasetError, PersonSearchSplit, Query, SceneAnnotation

_ROOT_HINT = "the PRW folder (it contains frames/, annotations/ and frame_train.mat)"
_BOX_VARIABLES = ("box_new", "anno_file", "anno_previous")
_RAW_UNLABELED = -2
_CAMERA = re.compile(r"c(\d+)")


@dataclass(frozen=True)
class _Frame:
    """One frame's annotation with the raw ids of the file."""

    name: str  # "c1s1_000151"
    boxes: np.ndarray  # (n, 4) float32 x1 y1 x2 y2
    raw_ids: np.ndarray  # (n,) int64, -2 = unlabeled


@dataclass(frozen=True)
class _RawQuery:
    raw_id: int
    frame: str
    box: np.ndarray  # (4,) float32 x1 y1 x2 y2


def load_prw(root: str | os.PathLike[str], split: str) -> PersonSearchSplit:
    """Load the training split or the test split (gallery frames + queries) of PRW.

    Test queries carry their camera and no explicit gallery: the protocol's gallery is every
    test frame but the query's own.
    """
    if split not in ("train", "test"):
        raise ValueError(f"PRW split must be 'train' or 'test', got {split!r}")
    root = require_root(root, _ROOT_HINT)
    frame_list = f"frame_{split}.mat"
    names = _read_frame_names(root, frame_list, f"img_index_{split}")
    require_images(root / "frames", [f"{name}.jpg" for name in names], listed_in=frame_list)
    frames = [_read_frame(root, name, frame_list) for name in names]

    if split == "train":
        raw_queries: list[_RawQuery] = []
        new_id = _train_ids(root)
    else:
        raw_queries = _read_query_info(root, set(names))
        new_id = _contiguous(_used_ids(frames, raw_queries))

    images = [
        SceneAnnotation(
            name=frame.name,
            path=root / "frames" / f"{frame.name}.jpg",
            boxes=frame.boxes,
            pids=_remap(frame, new_id),
            camera=camera_of(frame.name),
        )
        for frame in frames
    ]
    queries = [
        Query(pid=new_id[q.raw_id], image=q.frame, box=q.box, camera=camera_of(q.frame))
        for q in raw_queries
    ]
    return PersonSearchSplit("prw", split, root, images, queries)


def camera_of(frame: str) -> int:
    """The camera of a PRW frame: the number after the leading 'c' ("c3s2_044587" -> 3)."""
    match = _CAMERA.match(frame)
    if match is None:
        raise DatasetError(f"PRW frame name {frame!r} does not start with c<camera>")
    return int(match.group(1))


def _read_frame_names(root: Path, file_name: str, variable: str) -> list[str]:
    path = require_file(root, file_name, _ROOT_HINT)
    return mat_strings(mat_variable(read_mat(path), path, [variable]))


def _read_frame(root: Path, name: str, frame_list: str) -> _Frame:
    """annotations/{name}.jpg.mat: boxes converted, clipped at 0, degenerate ones dropped."""
    relative = f"annotations/{name}.jpg.mat"
    path = root / relative
    if not path.is_file():
        raise DatasetError(f"{root}: no {relative}, the annotation of a frame of {frame_list}")
    table = np.asarray(mat_variable(read_mat(path), path, _BOX_VARIABLES), dtype=np.float64)
    if table.size == 0:
        table = table.reshape(0, 5)
    if table.ndim != 2 or table.shape[1] != 5:
        raise DatasetError(f"{path}: boxes of shape {table.shape}, expected (n, 5) id x y w h")
    raw_ids = _integers(table[:, 0], path)
    if np.any((raw_ids < 0) & (raw_ids != _RAW_UNLABELED)):
        raise DatasetError(f"{path}: negative person ids other than -2 (unlabeled): {raw_ids}")
    xy, wh = table[:, 1:3], table[:, 3:5]
    boxes = np.clip(np.concatenate([xy, xy + wh], axis=1), 0, None)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return _Frame(name, boxes[valid].astype(np.float32), raw_ids[valid])


def _integers(values: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(values == np.round(values)):
        raise DatasetError(f"{path}: person ids must be whole numbers, got {values.tolist()}")
    return values.astype(np.int64)


def _read_query_info(root: Path, test_frames: set[str]) -> list[_RawQuery]:
    """query_info.txt: "pid x y w h frame" per line; line endings vary, so lines are stripped."""
    path = require_file(root, "query_info.txt", _ROOT_HINT)
    queries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            queries.append(_parse_query(line.strip(), f"{path}:{number}", test_frames))
    return queries


def _parse_query(line: str, where: str, test_frames: set[str]) -> _RawQuery:
    fields = line.split()
    try:
        if len(fields) != 6:
            raise ValueError(f"{len(fields)} fields")
        raw_id = int(fields[0])
        x, y, w, h = (float(value) for value in fields[1:5])
    except ValueError as error:
        raise DatasetError(f"{where}: expected 'pid x y w h frame', got {line!r}") from error
    frame = fields[5]
    if frame not in test_frames:
        raise DatasetError(f"{where}: query frame {frame} is not a frame of frame_test.mat")
    box = np.clip(np.array([x, y, x + w, y + h]), 0, None).astype(np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(f"{where}: the query box {line!r} is empty once clipped at 0")
    return _RawQuery(raw_id, frame, box)


def _train_ids(root: Path) -> dict[int, int]:
    path = require_file(root, "ID_train.mat", _ROOT_HINT)
    raw = _integers(mat_numbers(mat_variable(read_mat(path), path, ["ID_train"])), path)
    return _contiguous(raw.tolist())


def _used_ids(frames: list[_Frame], queries: list[_RawQuery]) -> set[int]:
    """Every labeled raw id of the test split, in its annotations or its queries."""
    used = {int(i) for frame in frames for i in frame.raw_ids if i != _RAW_UNLABELED}
    return used | {query.raw_id for query in queries}


def _contiguous(raw_ids: Iterable[int]) -> dict[int, int]:
    """Raw ids in increasing order -> 0..K-1 (PRW training: 1..478, 480..483, 932 -> 0..482)."""
    return {raw: new for new, raw in enumerate(sorted(set(raw_ids)))}


def _remap(frame: _Frame, new_id: dict[int, int]) -> np.ndarray:
    pids = np.full(len(frame.raw_ids), UNLABELED, dtype=np.int64)
    for index, raw in enumerate(frame.raw_ids.tolist()):
        if raw == _RAW_UNLABELED:
            continue
        if raw not in new_id:
            raise DatasetError(
                f"frame {frame.name}: person id {raw} is neither -2 (unlabeled) nor an identity "
                "of the split (ID_train.mat for the training split)"
            )
        pids[index] = new_id[raw]
    return pids
