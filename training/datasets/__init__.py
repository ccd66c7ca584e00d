"""Dataset loaders: CUHK-SYSU, PRW and CrowdHuman, read from the files exactly as distributed.

Every loader returns a :class:`PersonSearchSplit` in one label convention (person id >= 0 for a
labeled identity, contiguous per split; -1 for an unlabeled person), so that training and
evaluation never need to know which dataset they are looking at.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .base import (
    UNLABELED,
    DatasetError,
    GalleryItem,
    PersonSearchSplit,
    Query,
    SceneAnnotation,
)
from .crowdhuman import load_crowdhuman
from .cuhk_sysu import FULL_GALLERY, load_cuhk_sysu
from .prw import camera_of, load_prw

LOADERS: dict[str, Callable[..., PersonSearchSplit]] = {
    "cuhk_sysu": load_cuhk_sysu,
    "prw": load_prw,
    "crowdhuman": load_crowdhuman,
}


def load_dataset(
    name: str, root: str | os.PathLike[str], split: str, **kwargs: object
) -> PersonSearchSplit:
    """Load ``split`` of dataset ``name`` from ``root``; ``kwargs`` go to that dataset's loader
    (CUHK-SYSU: ``gallery_size``)."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](root, split, **kwargs)


__all__ = [
    "FULL_GALLERY",
    "LOADERS",
    "UNLABELED",
    "DatasetError",
    "GalleryItem",
    "PersonSearchSplit",
    "Query",
    "SceneAnnotation",
    "camera_of",
    "load_crowdhuman",
    "load_cuhk_sysu",
    "load_dataset",
    "load_prw",
]
