"""CrowdHuman (pedestrian detection), read from the files exactly as distributed.

Layout (``docs/datasets.md``)::

    Images/273271,c9db000d5146c15.jpg ...
    annotation_train.odgt, annotation_val.odgt    one JSON object per line:
        {"ID": ..., "gtboxes": [{"tag": "person" | "mask", "fbox": [x, y, w, h], "vbox": ...,
                                 "hbox": ..., "extra": {"ignore": 0 | 1, ...}}, ...]}

We use the full-body boxes (``fbox``), as LLA's evaluation does. Boxes tagged "mask" (crowds,
reflections, ...) and boxes with ``extra.ignore == 1`` are ignore regions: neither positives nor
negatives for detection. CrowdHuman has no identities, so every person is unlabeled (-1). Full
bodies may extend past the image border; boxes are kept as annotated (images are not decoded
here, so their size is unknown).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._files import require_file, require_images, require_root
from .base import UNLABELED, DatasetError, PersonSearchSplit, SceneAnnotation

_ROOT_HINT = "the CrowdHuman folder (it contains Images/ and annotation_train.odgt)"
_PERSON, _IGNORE_REGION = "person", "mask"


def load_crowdhuman(root: str | os.PathLike[str], split: str) -> PersonSearchSplit:
    """Load the ``train`` or ``val`` split of CrowdHuman: full-body boxes, all unlabeled."""
    if split not in ("train", "val"):
        raise ValueError(f"CrowdHuman split must be 'train' or 'val', got {split!r}")
    root = require_root(root, _ROOT_HINT)
    path = require_file(root, f"annotation_{split}.odgt", _ROOT_HINT)
    images = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            images.append(_scene(root, _json_object(line, f"{path}:{number}"), f"{path}:{number}"))
    require_images(root / "Images", [image.path.name for image in images], listed_in=path.name)
    return PersonSearchSplit("crowdhuman", split, root, images)


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not a JSON object ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("ID"), str):
        raise DatasetError(f"{where}: expected an object with a string 'ID' and 'gtboxes'")
    return record


def _scene(root: Path, record: dict[str, Any], where: str) -> SceneAnnotation:
    persons, ignored = [], []
    for box in record.get("gtboxes", []):
        tag = box.get("tag")
        if tag not in (_PERSON, _IGNORE_REGION):
            raise DatasetError(f"{where}: box tag {tag!r}, expected 'person' or 'mask'")
        is_ignored = tag == _IGNORE_REGION or box.get("extra", {}).get("ignore", 0) == 1
        (ignored if is_ignored else persons).append(_full_body(box, where))
    boxes, ignore_boxes = _valid(persons), _valid(ignored)
    return SceneAnnotation(
        name=record["ID"],
        path=root / "Images" / f"{record['ID']}.jpg",
        boxes=boxes,
        pids=np.full(len(boxes), UNLABELED, dtype=np.int64),
        ignore_boxes=ignore_boxes,
    )


def _full_body(box: dict[str, Any], where: str) -> list[float]:
    """``fbox`` x y w h -> x1 y1 x2 y2."""
    fbox = box.get("fbox")
    if not isinstance(fbox, list) or len(fbox) != 4:
        raise DatasetError(f"{where}: fbox {fbox!r}, expected [x, y, w, h]")
    x, y, w, h = (float(value) for value in fbox)
    return [x, y, x + w, y + h]


def _valid(boxes: list[list[float]]) -> np.ndarray:
    """(n, 4) float32 boxes without the degenerate ones (zero width or height)."""
    array = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return array[(array[:, 2] > array[:, 0]) & (array[:, 3] > array[:, 1])]
