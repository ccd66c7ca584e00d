"""Records the gallery takes and returns, and its errors."""

from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np

from common.boxes import Box

# Persons detected with a lower score are not stored, when neither a setting nor the model's
# folder says otherwise (folders exported before psearch.json recorded a detection threshold).
DEFAULT_MIN_SCORE = 0.5


def min_score_for(setting: float | None, recommended: float | None) -> float:
    """The detection score from which every route stores persons: the ``setting`` when one is
    given, else the threshold the model's folder ``recommended`` (psearch.json's
    ``detection_threshold``: the one its training config evaluates with), else
    :data:`DEFAULT_MIN_SCORE`."""
    if setting is not None:
        return setting
    return recommended if recommended is not None else DEFAULT_MIN_SCORE


class GalleryError(Exception):
    """Base class of the gallery's own errors (bad input is a ValueError)."""


class GalleryMismatch(GalleryError):
    """The gallery was built with another model: its embeddings are not comparable."""


class GalleryNotFound(GalleryError, FileNotFoundError):
    """No gallery at the given path."""


class GalleryExists(GalleryError, FileExistsError):
    """A gallery already exists where one was to be created."""


class GalleryBusy(GalleryError):
    """Another process (or another open Gallery object) holds the gallery."""


class ImageNotFound(GalleryError, KeyError):
    """No image with the given id."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass(frozen=True)
class NewImage:
    """An image to add and what the model detected in it.

    ``data`` is the encoded image (bytes) or a path to it; the gallery keys images by the SHA-256
    of these bytes, so the same file is never stored twice. ``boxes`` (n, 4) x1 y1 x2 y2 in the
    original pixels, ``scores`` (n,), ``embeddings`` (n, D) L2-normalised. ``timestamp`` in POSIX
    seconds. ``uri`` defaults to the path when ``data`` is one. ``keep_file``: keep the bytes
    as the image's file, served back and removed with the image (uploads; an image indexed from
    a path is served from there).
    """

    data: bytes | str | PathLike
    boxes: Any
    scores: Any
    embeddings: Any
    width: int
    height: int
    camera: str | None = None
    timestamp: float | None = None
    uri: str | None = None
    keep_file: bool = False

    @classmethod
    def from_detections(
        cls,
        data: bytes | str | PathLike,
        detections: Any,
        *,
        width: int,
        height: int,
        min_score: float = DEFAULT_MIN_SCORE,
        camera: str | None = None,
        timestamp: float | None = None,
        uri: str | None = None,
        keep_file: bool = False,
    ) -> "NewImage":
        """An image and the persons the engine detected in it that score at least
        ``min_score``: how every route turns one image's ``detections`` (boxes (K, 4), scores
        (K,), embeddings (K, D), as ``export.runtime`` gives them) into stored persons. A score
        of 0 marks an unused slot of a model's fixed-size output: never a person."""
        scores = np.asarray(detections.scores, dtype=np.float64)
        keep = (scores > 0) & (scores >= min_score)
        return cls(
            data=data,
            boxes=np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)[keep],
            scores=scores[keep],
            embeddings=np.asarray(detections.embeddings, dtype=np.float32)[keep],
            width=width,
            height=height,
            camera=camera,
            timestamp=timestamp,
            uri=uri,
            keep_file=keep_file,
        )


@dataclass(frozen=True)
class AddResult:
    """What adding one image did. ``added`` is False when an image with the same bytes was
    already in the gallery; then ``image_id`` and ``num_persons`` describe that image."""

    image_id: int
    sha256: str
    added: bool
    num_persons: int


@dataclass(frozen=True)
class Person:
    """A detected person of a stored image."""

    id: int
    box: Box
    det_score: float


@dataclass(frozen=True)
class ImageInfo:
    """A stored image (its metadata; the gallery does not keep the pixels)."""

    id: int
    uri: str | None
    sha256: str
    camera: str | None
    timestamp: float | None
    width: int
    height: int
    added_at: float
    persons: tuple[Person, ...]


@dataclass(frozen=True)
class Hit:
    """One search result: a person in a gallery image, and how similar it is to the query."""

    person_id: int
    image_id: int
    uri: str | None
    camera: str | None
    timestamp: float | None
    box: Box
    similarity: float
    det_score: float


@dataclass(frozen=True)
class GalleryStats:
    """Counts and settings of a gallery. ``pending`` persons were added after the last snapshot
    (they are in memory and in SQLite, and replayed into the index on the next open)."""

    path: str
    fingerprint: str
    dim: int
    metric: str
    index_type: str
    index_params: dict[str, Any]
    num_images: int
    num_persons: int
    indexed: int
    watermark: int
    pending: int
