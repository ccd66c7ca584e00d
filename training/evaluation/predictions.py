"""The predictions file: what a model predicted on a test split, in one ``.npz`` file.

The trainer runs a model over every image of a test split and writes this file;
``python -m training.evaluate`` reads it and scores it with the standard protocol. Detections of
all images are stored in concatenated arrays, with offsets saying which rows belong to which
image::

    key               shape, dtype     content
    format_version    () int64         1
    image_names       (N,) str         image names as the annotations spell them (file stems);
                                       every image of the split, query images included
    offsets           (N + 1,) int64   the detections of image i are rows offsets[i]:offsets[i+1]
    detections        (M, 5) float     x1 y1 x2 y2 score, in original image pixels
    embeddings        (M, D) float     re-id embedding of each detection; absent for a detector
    query_embeddings  (Q, D) float     optional, "GT-box" mode: row q embeds the box of query q
    query_images      (Q,) str         with query_embeddings: the image of each query (a check)
    image_sizes       (N, 2) int64     optional: width, height of each image

Query embeddings come in one of two modes (``docs/evaluation.md``):

- "GT-box" mode: ``query_embeddings`` holds one embedding per query, in the split's query order.
- "max-IoU detection" mode: ``query_embeddings`` is absent; the embedding of each query is taken
  from the stored detections of the query's own image (the one with the largest IoU to the query
  box), so query images need nothing beyond their ordinary detections.

Detections may be stored unthresholded (or above a low score): the evaluator applies its
``det_thresh``. Similarities are dot products of the stored embeddings, so store them
L2-normalised (or scaled on purpose, as confidence-weighted similarity does). ``image_sizes`` is
used by the CrowdHuman evaluation, which clips boxes to the image like the official toolkit.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from training.datasets.base import PersonSearchSplit

FORMAT_VERSION = 1

QueryMode = Literal["gt_box", "max_iou"]

_REQUIRED_KEYS = ("format_version", "image_names", "offsets", "detections")
_OPTIONAL_KEYS = ("embeddings", "query_embeddings", "query_images", "image_sizes")


class PredictionsError(ValueError):
    """Predictions are malformed or do not belong to the split they are evaluated on."""


@dataclass(frozen=True, eq=False)
class Predictions:
    """Per-image detections and embeddings of one split, plus the query embeddings if given.

    ``detections[name]`` is ``(n, 5)`` x1 y1 x2 y2 score and ``embeddings[name]`` ``(n, D)``;
    ``query_embeddings`` is ``(Q, D)`` ("GT-box" mode) or None ("max-IoU detection" mode);
    ``query_images`` optionally names the image of each query so that the row order can be
    checked against the split; ``image_sizes[name]`` is (width, height). Everything is checked on
    construction.
    """

    detections: Mapping[str, np.ndarray]
    embeddings: Mapping[str, np.ndarray] | None = None
    query_embeddings: np.ndarray | None = None
    query_images: tuple[str, ...] | None = None
    image_sizes: Mapping[str, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        _check_detections(self.detections)
        dim = _check_embeddings(self.detections, self.embeddings)
        _check_query_embeddings(self.query_embeddings, self.query_images, dim)
        _check_image_sizes(self.detections, self.image_sizes)

    @property
    def embedding_dim(self) -> int | None:
        """D, or None for a detector's predictions (no embeddings)."""
        return _embedding_dim(self.embeddings)

    @property
    def query_mode(self) -> QueryMode:
        return "max_iou" if self.query_embeddings is None else "gt_box"

    def check_split(self, split: PersonSearchSplit, search: bool) -> None:
        """Raise PredictionsError unless these predictions cover exactly ``split``.

        Every image of the split needs an entry (an empty one if nothing was detected); no entry
        may name an image outside the split and its queries. With ``search``, embeddings are
        required and the queries must match: one query embedding per query in the split's order,
        or detections for every query image in max-IoU mode.
        """
        where = f"{split.dataset} {split.split}"
        names = [annotation.name for annotation in split.images]
        missing = [name for name in names if name not in self.detections]
        if missing:
            raise PredictionsError(
                f"no predictions for {len(missing)} of the {len(names)} images of {where}, "
                f"e.g. {_examples(missing)}"
            )
        known = set(names) | {query.image for query in split.queries}
        unknown = [name for name in self.detections if name not in known]
        if unknown:
            raise PredictionsError(
                f"predictions for {len(unknown)} images that are not in {where}, e.g. "
                f"{_examples(unknown)}: are they predictions of another dataset or split?"
            )
        if search:
            self._check_queries(split, where)

    def _check_queries(self, split: PersonSearchSplit, where: str) -> None:
        if self.embeddings is None:
            raise PredictionsError(f"search on {where} needs embeddings; these have none")
        if self.query_embeddings is None:
            missing = [q.image for q in split.queries if q.image not in self.detections]
            if missing:
                raise PredictionsError(
                    f"max-IoU query mode needs the detections of every query image; "
                    f"{len(missing)} are missing, e.g. {_examples(missing)}"
                )
            return
        if len(self.query_embeddings) != len(split.queries):
            raise PredictionsError(
                f"{len(self.query_embeddings)} query embeddings for the {len(split.queries)} "
                f"queries of {where}: written for another protocol or gallery size?"
            )
        if self.query_images is None:
            return
        for index, (name, query) in enumerate(zip(self.query_images, split.queries, strict=True)):
            if name != query.image:
                raise PredictionsError(
                    f"query {index} is from image {name!r} in the predictions but from "
                    f"{query.image!r} in {where}: the queries were written in another order"
                )


def save_predictions(path: str | os.PathLike[str], predictions: Predictions) -> None:
    """Write ``predictions`` to ``path`` in the format of this module's docstring."""
    names = list(predictions.detections)
    counts = [len(predictions.detections[name]) for name in names]
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "image_names": np.array(names, dtype=np.str_),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "detections": _concatenate([predictions.detections[name] for name in names], width=5),
    }
    if predictions.embeddings is not None:
        dim = predictions.embedding_dim or 0
        arrays["embeddings"] = _concatenate([predictions.embeddings[n] for n in names], width=dim)
    if predictions.query_embeddings is not None:
        arrays["query_embeddings"] = np.asarray(predictions.query_embeddings)
    if predictions.query_images is not None:
        arrays["query_images"] = np.array(predictions.query_images, dtype=np.str_)
    if predictions.image_sizes is not None:
        sizes = [predictions.image_sizes[name] for name in names]
        arrays["image_sizes"] = np.array(sizes, dtype=np.int64).reshape(-1, 2)
    # An open file keeps numpy from appending ".npz" to a path that lacks it.
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def load_predictions(path: str | os.PathLike[str]) -> Predictions:
    """Read and check a predictions file; errors name the file and what is wrong in it."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: no such predictions file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array")
        with loaded as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise PredictionsError(f"{path}: not a predictions .npz file ({error})") from error
    try:
        return _from_arrays(arrays)
    except PredictionsError as error:
        raise PredictionsError(f"{path}: {error}") from None


def _from_arrays(arrays: dict[str, np.ndarray]) -> Predictions:
    missing = [key for key in _REQUIRED_KEYS if key not in arrays]
    unknown = [key for key in arrays if key not in _REQUIRED_KEYS + _OPTIONAL_KEYS]
    if missing or unknown:
        raise PredictionsError(
            f"missing arrays {missing}, unknown arrays {unknown}; a predictions file holds "
            f"{list(_REQUIRED_KEYS)} and optionally {list(_OPTIONAL_KEYS)}"
        )
    version = arrays["format_version"]
    if version.shape != () or int(version) != FORMAT_VERSION:
        raise PredictionsError(
            f"format_version {version.tolist()}, this evaluator reads version {FORMAT_VERSION}"
        )
    names = _names(arrays["image_names"], "image_names")
    offsets = _offsets(arrays["offsets"], len(names))
    per_image = _split_rows(names, offsets, arrays["detections"], "detections")
    embeddings = None
    if "embeddings" in arrays:
        embeddings = _split_rows(names, offsets, arrays["embeddings"], "embeddings")
    query_images = None
    if "query_images" in arrays:
        query_images = tuple(_names(arrays["query_images"], "query_images", unique=False))
    image_sizes = None
    if "image_sizes" in arrays:
        image_sizes = _image_sizes(names, arrays["image_sizes"])
    return Predictions(
        detections=per_image,
        embeddings=embeddings,
        query_embeddings=arrays.get("query_embeddings"),
        query_images=query_images,
        image_sizes=image_sizes,
    )


def _names(array: np.ndarray, key: str, unique: bool = True) -> list[str]:
    if array.ndim != 1 or array.dtype.kind != "U":
        raise PredictionsError(f"{key} must be a 1-D array of strings, got {array.dtype}")
    names = array.tolist()
    if unique and len(set(names)) != len(names):
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        raise PredictionsError(f"{key} repeats image names: {_examples(duplicates)}")
    return names


def _offsets(offsets: np.ndarray, num_images: int) -> np.ndarray:
    if offsets.shape != (num_images + 1,) or offsets.dtype.kind not in "iu":
        raise PredictionsError(
            f"offsets must be ({num_images + 1},) integers for {num_images} images, got "
            f"{offsets.shape} {offsets.dtype}"
        )
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise PredictionsError("offsets must start at 0 and never decrease")
    return offsets


def _split_rows(
    names: list[str], offsets: np.ndarray, rows: np.ndarray, key: str
) -> dict[str, np.ndarray]:
    if rows.ndim != 2 or rows.shape[0] != offsets[-1]:
        raise PredictionsError(
            f"{key} must have one row per detection ({offsets[-1]} rows, as offsets say), "
            f"got shape {rows.shape}"
        )
    return {
        name: rows[start:stop]
        for name, start, stop in zip(names, offsets[:-1], offsets[1:], strict=True)
    }


def _image_sizes(names: list[str], sizes: np.ndarray) -> dict[str, tuple[int, int]]:
    if sizes.shape != (len(names), 2) or sizes.dtype.kind not in "iu":
        raise PredictionsError(
            f"image_sizes must be ({len(names)}, 2) integers (width, height), got "
            f"{sizes.shape} {sizes.dtype}"
        )
    return {name: (int(w), int(h)) for name, (w, h) in zip(names, sizes.tolist(), strict=True)}


def _concatenate(arrays: Sequence[np.ndarray], width: int) -> np.ndarray:
    if not arrays:
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate([np.asarray(a) for a in arrays])


def _is_real(array: np.ndarray) -> bool:
    return array.dtype.kind in "fiu"


def _check_detections(detections: Mapping[str, np.ndarray]) -> None:
    for name, boxes in detections.items():
        if not isinstance(boxes, np.ndarray) or boxes.ndim != 2 or boxes.shape[1] != 5:
            shape = getattr(boxes, "shape", type(boxes).__name__)
            raise PredictionsError(
                f"detections of image {name!r} must be an (n, 5) array x1 y1 x2 y2 score, "
                f"got {shape}"
            )
        if not _is_real(boxes):
            raise PredictionsError(f"detections of image {name!r} are {boxes.dtype}, not numbers")
    _check_finite(detections, "detections")
    for name, boxes in detections.items():
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            raise PredictionsError(
                f"detections of image {name!r} have x2 < x1 or y2 < y1: boxes must be "
                f"x1 y1 x2 y2 (not x y w h)"
            )


def _embedding_dim(embeddings: Mapping[str, np.ndarray] | None) -> int | None:
    if embeddings is None:
        return None
    shapes = {array.shape[1] for array in embeddings.values() if array.ndim == 2}
    return shapes.pop() if len(shapes) == 1 else None


def _check_embeddings(
    detections: Mapping[str, np.ndarray], embeddings: Mapping[str, np.ndarray] | None
) -> int | None:
    """Check one embedding per detection, all of one dimension D; return D (None: none)."""
    if embeddings is None:
        return None
    if set(embeddings) != set(detections):
        odd = sorted(set(embeddings) ^ set(detections))
        raise PredictionsError(
            f"embeddings and detections must name the same images; they differ on {_examples(odd)}"
        )
    dims: dict[int, str] = {}
    for name, array in embeddings.items():
        rows = len(detections[name])
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[0] != rows:
            shape = getattr(array, "shape", type(array).__name__)
            raise PredictionsError(
                f"embeddings of image {name!r} must be ({rows}, D), one per detection, got {shape}"
            )
        if not _is_real(array):
            raise PredictionsError(f"embeddings of image {name!r} are {array.dtype}, not numbers")
        dims.setdefault(array.shape[1], name)
    if len(dims) > 1:
        described = ", ".join(f"{dim} (e.g. {name!r})" for dim, name in dims.items())
        raise PredictionsError(f"embeddings have different dimensions: {described}")
    if 0 in dims:
        raise PredictionsError("embeddings have dimension 0")
    _check_finite(embeddings, "embeddings")
    return next(iter(dims), None)


def _check_query_embeddings(
    query_embeddings: np.ndarray | None, query_images: tuple[str, ...] | None, dim: int | None
) -> None:
    if query_embeddings is None:
        if query_images is not None:
            raise PredictionsError("query_images are given without query_embeddings")
        return
    if dim is None:
        raise PredictionsError("query_embeddings are given but the detections have no embeddings")
    array = query_embeddings
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != dim:
        shape = getattr(array, "shape", type(array).__name__)
        raise PredictionsError(
            f"query_embeddings must be (Q, {dim}) like the detection embeddings, got {shape}"
        )
    if not _is_real(array):
        raise PredictionsError(f"query_embeddings are {array.dtype}, not numbers")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise PredictionsError(
            f"query_embeddings of {bad.size} queries contain NaN or infinity, e.g. query {bad[0]}"
        )
    if query_images is not None and len(query_images) != len(array):
        raise PredictionsError(
            f"{len(query_images)} query_images for {len(array)} query_embeddings"
        )


def _check_finite(per_image: Mapping[str, np.ndarray], what: str) -> None:
    # One vectorised test over everything; the loop only runs to name the culprit.
    if not per_image:
        return
    if np.isfinite(np.concatenate([a.ravel() for a in per_image.values()])).all():
        return
    bad = [name for name, array in per_image.items() if not np.isfinite(array).all()]
    raise PredictionsError(
        f"{what} of {len(bad)} images contain NaN or infinity, e.g. {_examples(bad)}"
    )


def _check_image_sizes(
    detections: Mapping[str, np.ndarray], image_sizes: Mapping[str, tuple[int, int]] | None
) -> None:
    if image_sizes is None:
        return
    missing = [name for name in detections if name not in image_sizes]
    if missing:
        raise PredictionsError(
            f"image_sizes lacks {len(missing)} images, e.g. {_examples(missing)}"
        )
    bad = [name for name, (w, h) in image_sizes.items() if w <= 0 or h <= 0]
    if bad:
        raise PredictionsError(f"image_sizes must be positive, not for {_examples(bad)}")


def _examples(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(name) for name in list(names)[:limit])
    return shown + (", ..." if len(names) > limit else "")
