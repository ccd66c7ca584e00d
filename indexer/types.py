"""Records the gallery takes and returns, and its errors."""

from dataclasses import dataclass
from os import PathLike
from typing import Any

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels


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
    seconds. ``uri`` defaults to the path when ``data`` is one.
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
