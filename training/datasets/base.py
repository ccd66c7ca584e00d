"""Annotation types shared by every dataset loader, the synthetic generator and the evaluator.

One label convention everywhere (see ``docs/datasets.md``): a person id >= 0 is a
labeled identity, contiguous within its split; -1 is an unlabeled person. Loaders translate each
dataset's own sentinel at the edge, so nothing downstream knows where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNLABELED = -1


class DatasetError(ValueError):
    """A dataset on disk is missing a file or holds something the format does not allow.

    The message names the file and says what was expected, so a user can fix their data root.
    """


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class SceneAnnotation:
    """One scene image and the persons annotated in it.

    ``boxes`` is (n, 4) float32, x1 y1 x2 y2 in original pixels; ``pids`` is (n,) int64.
    ``camera`` is the camera id where the dataset has cameras (PRW: 1..6), else -1.
    ``ignore_boxes`` (m, 4) are regions that are neither positives nor negatives for detection
    (CrowdHuman's "mask" boxes and boxes with ``extra.ignore == 1``).
    """

    name: str
    path: Path
    boxes: np.ndarray
    pids: np.ndarray
    camera: int = -1
    ignore_boxes: np.ndarray = field(default_factory=_empty_boxes)

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise DatasetError(f"{self.name}: boxes must be (n, 4), got {self.boxes.shape}")
        if self.pids.shape != (self.boxes.shape[0],):
            raise DatasetError(
                f"{self.name}: {self.boxes.shape[0]} boxes but pids {self.pids.shape}"
            )


@dataclass(frozen=True, eq=False)
class GalleryItem:
    """One image of a query's gallery: ``target`` is the query person's box in it, or None."""

    image: str
    target: np.ndarray | None


@dataclass(frozen=True, eq=False)
class Query:
    """A query person: its identity, the image it is cropped from and its box (x1 y1 x2 y2).

    ``gallery`` is the explicit gallery of the protocol (CUHK-SYSU's TestG lists, positives first)
    or None, meaning "every image of the split except the query's own, positives found by pid"
    (PRW).
    """

    pid: int
    image: str
    box: np.ndarray
    camera: int = -1
    gallery: tuple[GalleryItem, ...] | None = None


@dataclass(frozen=True, eq=False)
class PersonSearchSplit:
    """One split of a dataset: its images and, for a test split, its queries."""

    dataset: str
    split: str
    root: Path
    images: list[SceneAnnotation]
    queries: list[Query] = field(default_factory=list)

    @property
    def num_identities(self) -> int:
        """Number of labeled identities (their ids are 0..num_identities-1)."""
        labeled = [int(a.pids.max()) for a in self.images if a.pids.size and a.pids.max() >= 0]
        return max(labeled) + 1 if labeled else 0

    def by_name(self) -> dict[str, SceneAnnotation]:
        return {a.name: a for a in self.images}
