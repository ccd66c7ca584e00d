"""Composing one frame: persons and props on a backdrop, seen through a camera.

Everything standing on the ground is drawn far to near (by the row of its feet), so nearer
persons and props occlude farther ones. An ownership map records which person (or prop) each
pixel shows, which gives every person's visible fraction exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synthetic.identity import Identity
from training.synthetic.render import Pose, Sprite, render_person
from training.synthetic.scenery import (
    IDENTITY_TRANSFORM,
    Backdrop,
    ColorTransform,
    Prop,
    View,
    composite_sprite,
    make_prop,
)

UNLABELED = -1
OCCLUDER_KINDS = ("bin", "bench", "car", "planter", "bollard", "bicycle", "sign")
_PROP_OWNER, _NOBODY = -2, -1


@dataclass(frozen=True)
class PersonPlacement:
    """One person in a frame: who (``identity``, ``pid`` or -1), where (``foot``) and how."""

    identity: Identity
    pid: int
    foot: tuple[float, float]
    pose: Pose
    brightness: float = 1.0


@dataclass(frozen=True, eq=False)
class RenderedScene:
    """A finished frame and its annotations.

    ``image`` (H, W, 3) uint8 RGB; ``boxes`` (n, 4) float32 x1 y1 x2 y2 clipped to the image;
    ``pids`` (n,) int64 (-1 unlabeled); ``visibility`` (n,) float32, the fraction of each person's
    pixels that is visible (not occluded, not outside the frame).
    """

    image: np.ndarray
    boxes: np.ndarray
    pids: np.ndarray
    visibility: np.ndarray


def estimated_box(view: View, foot: tuple[float, float]) -> np.ndarray:
    """The box an average person standing at ``foot`` will have, before rendering."""
    h = view.person_height(foot[1])
    return np.array([foot[0] - 0.2 * h, foot[1] - h, foot[0] + 0.2 * h, foot[1]], dtype=np.float32)


def _covered_fraction(box: np.ndarray, nearer: list[np.ndarray]) -> float:
    """Fraction of ``box`` under the nearer boxes (overlaps summed: an upper bound)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    covered = 0.0
    for other in nearer:
        w = min(box[2], other[2]) - max(box[0], other[0])
        h = min(box[3], other[3]) - max(box[1], other[1])
        covered += max(w, 0.0) * max(h, 0.0)
    return covered / max(area, 1e-6)


def _worst_cover(boxes: list[np.ndarray]) -> float:
    """The largest covered fraction of any box by boxes whose feet are lower (nearer)."""
    return max(
        (_covered_fraction(box, [o for o in boxes if o[3] > box[3]]) for box in boxes), default=0.0
    )


def choose_feet(
    rng: np.random.Generator,
    view: View,
    count: int,
    max_cover: float,
    taken: list[np.ndarray] | None = None,
    attempts: int = 25,
) -> list[tuple[float, float]]:
    """``count`` foot positions such that no person's box is more than ``max_cover`` covered.

    Box coverage overestimates pixel occlusion (a body fills about half its box), so
    ``max_cover`` 0.6 still yields persons hidden by up to about a third. When no position
    satisfies the bound, the least covering of the attempts is used.
    """
    boxes = list(taken or [])
    feet = []
    for _ in range(count):
        best, best_cover = None, np.inf
        for _ in range(attempts):
            foot = view.sample_foot(rng, border=0.0)
            cover = _worst_cover([*boxes, estimated_box(view, foot)])
            if cover < best_cover:
                best, best_cover = foot, cover
            if cover <= max_cover:
                break
        feet.append(best)
        boxes.append(estimated_box(view, best))
    return feet


def occluders_for(
    rng: np.random.Generator, view: View, feet: list[tuple[float, float]], rate: float
) -> list[Prop]:
    """Props placed just in front of about ``rate`` of the given persons, hiding their legs."""
    props = []
    for x, y in feet:
        if rng.random() >= rate:
            continue
        h = view.person_height(y)
        front = (x + float(rng.uniform(-0.3, 0.3)) * h, y + float(rng.uniform(0.03, 0.15)) * h)
        kind = OCCLUDER_KINDS[int(rng.integers(len(OCCLUDER_KINDS)))]
        props.append(make_prop(rng, view, front, kind))
    return props


def render_scene(
    rng: np.random.Generator,
    view: View,
    backdrop: Backdrop,
    persons: list[PersonPlacement],
    props: list[Prop] = (),
    transform: ColorTransform = IDENTITY_TRANSFORM,
    noise: float = 3.0,
) -> RenderedScene:
    """Draw ``persons`` and props far to near on the backdrop, then apply the camera.

    ``noise`` is the standard deviation of the sensor noise added after the colour transform.
    """
    image = backdrop.image.copy()
    owner = np.full(image.shape[:2], _NOBODY, dtype=np.int32)
    light = float(rng.uniform(-0.25, 0.25))
    sprites = [
        _person_sprite(person, view, light + float(rng.normal(0, 0.05))) for person in persons
    ]
    items = [
        (p.foot, sprite, index)
        for index, (p, sprite) in enumerate(zip(persons, sprites, strict=True))
    ]
    items += [(prop.foot, prop.sprite, _PROP_OWNER) for prop in [*backdrop.props, *props]]
    boxes = np.zeros((len(persons), 4), dtype=np.float32)
    for foot, sprite, index in sorted(items, key=lambda item: item[0][1]):
        x0, y0 = composite_sprite(image, sprite, foot)
        _claim(owner, sprite, x0, y0, index)
        if index >= 0:
            boxes[index] = np.add(sprite.box, (x0, y0, x0, y0))
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(persons))[: len(persons)]
    sizes = np.array([max(int((s.rgba[..., 3] > 0.5).sum()), 1) for s in sprites])
    boxes = np.clip(boxes, 0, [view.width, view.height, view.width, view.height])
    pixels = transform.apply(image)
    pixels += noise * rng.standard_normal(size=image.shape, dtype=np.float32)
    return RenderedScene(
        image=np.clip(np.round(pixels), 0, 255).astype(np.uint8),
        boxes=boxes,
        pids=np.array([p.pid for p in persons], dtype=np.int64),
        visibility=(visible / sizes).astype(np.float32),
    )


def _person_sprite(person: PersonPlacement, view: View, light: float) -> Sprite:
    sprite = render_person(person.identity, person.pose, view.person_height(person.foot[1]), light)
    if person.brightness != 1.0:
        rgba = sprite.rgba.copy()
        rgba[..., :3] = np.minimum(rgba[..., :3] * person.brightness, 255.0 * rgba[..., 3:])
        sprite = Sprite(rgba, sprite.foot, sprite.box)
    return sprite


def _claim(owner: np.ndarray, sprite: Sprite, x0: int, y0: int, index: int) -> None:
    """Mark the pixels where ``sprite`` (drawn last so far) is opaque as showing ``index``."""
    h, w = sprite.rgba.shape[:2]
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + w, owner.shape[1]), min(y0 + h, owner.shape[0])
    if ix0 < ix1 and iy0 < iy1:
        opaque = sprite.rgba[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0, 3] > 0.5
        owner[iy0:iy1, ix0:ix1][opaque] = index
