"""Checks on what goes into a gallery: a bad array is refused with a message, never stored.

Embeddings must be L2-normalised (the model contract). A norm within ``NORM_TOLERANCE`` of 1 is
renormalised exactly (half-precision engines give norms like 0.9996), so that inner products are
cosine similarities in [-1, 1]; anything further off is refused, because it is not an embedding
of the contract (raw features, the zero vectors of unused detection slots, a wrong output), and
normalising it would hide the bug while storing meaningless similarities.

A camera or job name is short printable text (:func:`check_name`): a camera is stored with
every image, returned with every hit and compared in filters, where a NUL would cut it short.
"""

import unicodedata
from typing import Any

import numpy as np

NORM_TOLERANCE = 1e-2
MAX_NAME_LENGTH = 256  # characters of a camera or job name


def check_detections(
    boxes: Any, scores: Any, embeddings: Any, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (n, 4) float64 boxes, (n,) float64 scores and (n, dim) float32 unit vectors."""
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if boxes.size == 0 and boxes.ndim < 2:  # no detection: accept [] as well as (0, 4)
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {boxes.shape}")
    count = len(boxes)
    if scores.shape != (count,):
        raise ValueError(
            f"scores must have shape ({count},) to match the boxes, got {scores.shape}"
        )
    _check_finite(boxes, "boxes")
    _check_finite(scores, "scores")
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if len(inverted):
        raise ValueError(
            f"box {inverted[0]} is {boxes[inverted[0]].tolist()}: boxes are x1 y1 x2 y2 with "
            "x2 >= x1 and y2 >= y1"
        )
    return boxes, scores, check_unit_vectors(embeddings, dim, count, "embeddings")


def check_query(query: Any, dim: int) -> np.ndarray:
    """A (dim,) query embedding as a validated (1, dim) float32 unit vector."""
    query = np.asarray(query, dtype=np.float32)
    if query.shape != (dim,):
        raise ValueError(f"the query must be one embedding of shape ({dim},), got {query.shape}")
    return check_unit_vectors(query[None], dim, 1, "the query")


def check_unit_vectors(vectors: Any, dim: int, count: int, what: str) -> np.ndarray:
    """(count, dim) float32, finite, of unit L2 norm within tolerance, renormalised exactly."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.size == 0 and count == 0:
        return vectors.reshape(0, dim)
    if vectors.shape != (count, dim):
        raise ValueError(f"{what} must have shape ({count}, {dim}), got {vectors.shape}")
    _check_finite(vectors, what)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
    if len(off):
        raise ValueError(
            f"{what}: row {off[0]} has L2 norm {norms[off[0]]:.4g}; embeddings must be "
            f"L2-normalised (norm 1 within {NORM_TOLERANCE})"
        )
    return (vectors / norms[:, None]).astype(np.float32)


def _check_finite(array: np.ndarray, what: str) -> None:
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{what} contain NaN or infinity (at index {tuple(bad[0].tolist())})")


def check_camera(camera: Any) -> str | None:
    """A camera name as stored and filtered on: None, or a :func:`check_name`."""
    return None if camera is None else check_name(camera, "a camera name")


def check_name(name: Any, what: str) -> str:
    """A name people give (a camera, a job), as stored and looked up: text of 1 to
    :data:`MAX_NAME_LENGTH` characters without control characters (NUL, line breaks) or
    unpaired surrogates (text no file or database can hold). Raises ValueError saying which,
    ``what`` naming it."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be text, got {name!r}")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        shown = name if len(name) <= 40 else f"{name[:40]}..."
        raise ValueError(
            f"{what} has 1 to {MAX_NAME_LENGTH} characters, got {len(name)} ({shown!r})"
        )
    for character in name:
        if unicodedata.category(character) in ("Cc", "Cs"):
            raise ValueError(
                f"{what} cannot contain the character U+{ord(character):04X} "
                f"(a control character or an unpaired surrogate), got {name[:40]!r}"
            )
    return name
