"""Gallery indexer: every detected person (box, score, embedding) of a gallery of scene images,
stored in SQLite (the source of truth) with a FAISS index over the embeddings."""

from indexer.index import INDEX_TYPES, IndexSpec
from indexer.store import Gallery, open_gallery_for
from indexer.types import (
    AddResult,
    GalleryBusy,
    GalleryError,
    GalleryExists,
    GalleryMismatch,
    GalleryNotFound,
    GalleryStats,
    Hit,
    ImageInfo,
    ImageNotFound,
    NewImage,
    Person,
)

__all__ = [
    "INDEX_TYPES",
    "AddResult",
    "Gallery",
    "GalleryBusy",
    "GalleryError",
    "GalleryExists",
    "GalleryMismatch",
    "GalleryNotFound",
    "GalleryStats",
    "Hit",
    "ImageInfo",
    "ImageNotFound",
    "IndexSpec",
    "NewImage",
    "Person",
    "open_gallery_for",
]
