"""Who appears where: spreading identities over the images of a split.

Every image gets a number of persons; a share of those slots goes to the labeled identities of
the split, each identity the same number of times (within one) and, where images belong to
cameras, in at least ``min_cameras`` different cameras. The remaining slots are unlabeled
persons: identities of a separate pool that no list names, each seen a time or two, as the
passers-by the real datasets leave unannotated.
"""

from __future__ import annotations

import math

import numpy as np


def person_counts(rng: np.random.Generator, images: int, low: int, high: int) -> np.ndarray:
    """(images,) number of persons per image, uniform in [low, high]."""
    if not 1 <= low <= high:
        raise ValueError(f"persons per image must satisfy 1 <= low <= high, got ({low}, {high})")
    return rng.integers(low, high + 1, size=images)


def spread_identities(
    rng: np.random.Generator,
    counts: np.ndarray,
    cameras: np.ndarray,
    identities: int,
    labeled_fraction: float,
    min_appearances: int = 2,
    min_cameras: int = 1,
) -> list[list[int]]:
    """For each image, the labeled identities (0..identities-1) it shows.

    ``counts`` (n,) persons per image and ``cameras`` (n,) the camera of each image. About
    ``labeled_fraction`` of all persons are labeled; an identity appears at most once per image.
    Images may end up with more persons than ``counts`` when the identities need it.
    """
    if identities == 0:
        return [[] for _ in counts]
    budget = int(np.round(counts * labeled_fraction).sum())
    if min_appearances > len(counts) or identities * min_appearances > counts.sum():
        raise ValueError(
            f"{identities} identities must appear {min_appearances} times each, in distinct "
            f"images, but there are only {len(counts)} images with {int(counts.sum())} persons; "
            "ask for more images or fewer identities"
        )
    # At most once per image; slots an identity cannot fill go to unlabeled persons.
    per_identity = min(max(budget // identities, min_appearances), len(counts))
    distinct_cameras = len(np.unique(cameras))
    if min_cameras > distinct_cameras:
        raise ValueError(
            f"identities must appear in {min_cameras} cameras but there are {distinct_cameras}"
        )
    room = np.round(counts * labeled_fraction).astype(np.int64)
    shown: list[list[int]] = [[] for _ in counts]
    extra = set(rng.permutation(identities)[: max(budget - per_identity * identities, 0)].tolist())
    for identity in rng.permutation(identities).tolist():
        wanted = per_identity + (identity in extra and per_identity < len(counts))
        chosen = _pick_images(rng, room, cameras, wanted, min_cameras)
        for image in chosen:
            shown[image].append(identity)
            room[image] -= 1
    return shown


def _pick_images(
    rng: np.random.Generator, room: np.ndarray, cameras: np.ndarray, wanted: int, min_cameras: int
) -> list[int]:
    """``wanted`` distinct images, the first ``min_cameras`` in distinct cameras, preferring
    images with room left (weighted by it)."""
    chosen: list[int] = []
    for camera in rng.permutation(np.unique(cameras))[:min_cameras]:
        chosen.append(_pick(rng, room, (cameras == camera), chosen))
    while len(chosen) < wanted:
        chosen.append(_pick(rng, room, np.ones_like(room, dtype=bool), chosen))
    return chosen


def _pick(rng: np.random.Generator, room: np.ndarray, allowed: np.ndarray, taken: list[int]) -> int:
    allowed = allowed.copy()
    allowed[taken] = False
    weights = np.where(allowed, np.maximum(room, 0), 0).astype(np.float64)
    if weights.sum() == 0:  # every allowed image is full: overfill one of them
        weights = allowed.astype(np.float64)
    return int(rng.choice(len(room), p=weights / weights.sum()))


def fill_unlabeled(
    rng: np.random.Generator, counts: np.ndarray, labeled: list[list[int]], reuse: float = 1.5
) -> tuple[list[list[int]], int]:
    """Unlabeled persons for the free slots of each image, as indices into a pool.

    Returns the pool indices per image and the pool size (about one pool identity per
    ``reuse`` slots, none twice in an image).
    """
    free = [max(int(count) - len(shown), 0) for count, shown in zip(counts, labeled, strict=True)]
    pool = max(math.ceil(sum(free) / reuse), max(free, default=0))
    return [rng.choice(pool, size=k, replace=False).tolist() for k in free], pool
