"""Everything in a scene that is not an annotated person.

A ``View`` is a camera looking at a ground plane: a person's height in pixels grows linearly with
how far below the horizon their feet are, so the scale of every person and object follows from
where it stands. Backdrops are streets: building facades (windows, doors, shop signs, posters
and shop windows with mannequins) above a textured pavement in perspective. Props stand on the
ground and are depth-sorted with the persons, so a bench or a car in front of someone occludes
them. A ``ColorTransform`` is a camera's colour response, applied to the whole frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from training.synthetic.identity import random_identity
from training.synthetic.render import (
    Sprite,
    box_filter,
    render_mannequin,
    render_person,
    sample_pose,
)

PROP_KINDS = ("pole", "bollard", "bin", "bench", "car", "planter", "sign", "pillar", "bicycle")


@dataclass(frozen=True)
class View:
    """A camera over a ground plane: ``person_height(y) = slope * (y - horizon)``.

    Feet of annotated persons stand between ``near_y`` (bottom) and ``far_y`` (top) rows.
    """

    width: int
    height: int
    horizon: float
    slope: float
    far_y: float
    near_y: float

    def person_height(self, foot_y: float) -> float:
        """Height in pixels of an average person whose feet are at row ``foot_y``."""
        return self.slope * (foot_y - self.horizon)

    def sample_foot(self, rng: np.random.Generator, border: float = 0.15) -> tuple[float, float]:
        """A random ground position for a person; feet may step a little out of the frame sides."""
        y = float(rng.uniform(self.far_y, self.near_y))
        reach = border * self.person_height(y)
        return float(rng.uniform(-reach, self.width + reach)), y


def check_person_heights(min_person: float, max_person: float, image_height: int) -> None:
    """Raise ValueError unless persons of ``min_person`` to ``max_person`` pixels fit a view:
    at least 4 pixels, a range wider than 1.2x, the tallest within 95% of the image."""
    if not (min_person >= 4 and 1.2 * min_person < max_person <= 0.95 * image_height):
        raise ValueError(
            f"person heights must satisfy 4 <= min_person ({min_person:g}), "
            f"1.2 * min_person < max_person ({max_person:g}) "
            f"<= 0.95 * image height ({0.95 * image_height:g})"
        )


def sample_view(
    rng: np.random.Generator, width: int, height: int, min_person: float, max_person: float
) -> View:
    """A random camera whose persons range from about ``min_person`` to ``max_person`` pixels.

    The farthest persons are 1 to 1.2 times ``min_person`` tall, the nearest 0.85 to 1 times
    ``max_person`` (and taller than the farthest); the farthest row is low enough that a far
    person's head stays inside the frame.
    """
    check_person_heights(min_person, max_person, height)
    far = float(rng.uniform(min_person, min_person * 1.2))
    near = float(rng.uniform(max(far, max_person * 0.85), max_person))
    near_y = height - 2.0
    lowest_far_y = 1.15 * far + 4
    highest_far_y = max(lowest_far_y, min(0.55 * height, near_y - 0.3 * height))
    far_y = float(rng.uniform(lowest_far_y, highest_far_y))
    slope = (near - far) / (near_y - far_y)
    return View(width, height, horizon=far_y - far / slope, slope=slope, far_y=far_y, near_y=near_y)


@dataclass(frozen=True, eq=False)
class Prop:
    """A sprite standing on the ground at ``foot`` (x, y); it occludes what stands behind it."""

    sprite: Sprite
    foot: tuple[float, float]


@dataclass(frozen=True, eq=False)
class Backdrop:
    """The static part of a view: ``image`` (H, W, 3) float32, props, and person-like regions.

    ``figure_boxes`` (k, 4) are posters and shop windows showing person-like shapes: regions a
    detector should not be punished for (CrowdHuman ignore regions).
    """

    image: np.ndarray
    props: list[Prop] = field(default_factory=list)
    figure_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))


# Muted facade and ground colours; props in saturated and metal colours.
_FACADES = np.array(
    [(196, 180, 160), (170, 150, 130), (150, 156, 160), (210, 205, 195), (140, 100, 80),
     (180, 170, 120), (120, 125, 135), (200, 190, 175), (160, 120, 100), (110, 115, 105)],
    dtype=np.float32,
)  # fmt: skip
_GROUNDS = np.array(
    [(150, 148, 142), (120, 118, 115), (170, 160, 140), (105, 110, 100), (180, 178, 170),
     (130, 120, 105)],
    dtype=np.float32,
)  # fmt: skip
_PROP_COLORS = ((60, 62, 66), (120, 124, 130), (40, 90, 50), (150, 40, 35), (200, 200, 205),
                (30, 60, 120), (210, 170, 40), (90, 60, 40), (170, 172, 176))  # fmt: skip


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """(H, W) low-frequency noise in about [-1, 1]: random cells, bilinearly interpolated."""
    coarse = rng.normal(size=(height // cell + 2, width // cell + 2)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _jitter(rng: np.random.Generator, color, amount: float = 18.0) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in color)


def _paint_ground(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, view: View, top: int
) -> None:
    """Pavement: a base colour with perspective tile lines converging on a vanishing point."""
    base = _jitter(rng, _GROUNDS[int(rng.integers(len(_GROUNDS)))])
    draw.rectangle((0, top, view.width, view.height), fill=base)
    line = tuple(max(c - 28, 0) for c in base)
    horizon = min(view.horizon, top - 1.0)
    gap = view.far_y - horizon
    ratio = float(rng.uniform(1.12, 1.3))
    while horizon + gap < view.height:
        y = horizon + gap
        if y > top:
            draw.line((0, y, view.width, y), fill=line, width=1)
        gap *= ratio
    vanish_x = float(rng.uniform(0.2, 0.8)) * view.width
    spacing = float(rng.uniform(0.3, 0.6)) * view.slope * view.height
    for k in range(-12, 13):
        bottom_x = vanish_x + k * spacing
        t = (top - horizon) / (view.height - horizon)
        start = (vanish_x + (bottom_x - vanish_x) * t, top)
        draw.line((*start, bottom_x, view.height), fill=line, width=1)


def _paint_facade(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, x0: int, x1: int, base_y: int, unit: float
) -> None:
    """One building front: wall colour, a grid of windows, a door and a shop sign."""
    wall = _jitter(rng, _FACADES[int(rng.integers(len(_FACADES)))])
    draw.rectangle((x0, 0, x1, base_y), fill=wall)
    win_w, win_h = unit * rng.uniform(0.3, 0.5), unit * rng.uniform(0.4, 0.7)
    step_x, step_y = win_w * rng.uniform(1.6, 2.4), win_h * rng.uniform(1.5, 2.0)
    glass = _jitter(rng, (70, 90, 110), 25)
    y = base_y - unit * 1.5 - win_h
    while y > -win_h:
        x = x0 + step_x * 0.3
        while x + win_w < x1:
            lit = rng.random() < 0.15
            draw.rectangle((x, y, x + win_w, y + win_h), fill=(230, 210, 150) if lit else glass)
            x += step_x
        y -= step_y
    door_x = float(rng.uniform(x0, max(x0 + 1, x1 - unit * 0.6)))
    draw.rectangle(
        (door_x, base_y - unit * 1.1, door_x + unit * 0.55, base_y), fill=_jitter(rng, (80, 60, 45))
    )
    if rng.random() < 0.7:
        sign_y = base_y - unit * rng.uniform(1.3, 1.6)
        sign_x = float(rng.uniform(x0, max(x0 + 1, x1 - unit)))
        color = _PROP_COLORS[int(rng.integers(len(_PROP_COLORS)))]
        draw.rectangle(
            (sign_x, sign_y, sign_x + unit * rng.uniform(0.8, 2.0), sign_y + unit * 0.25),
            fill=color,
        )


def composite_sprite(
    image: np.ndarray, sprite: Sprite, foot: tuple[float, float]
) -> tuple[int, int]:
    """Alpha-composite ``sprite`` onto ``image`` in place with its foot at ``foot``.

    Returns the image position of the sprite's top-left corner.
    """
    x0 = round(foot[0] - sprite.foot[0])
    y0 = round(foot[1] - sprite.foot[1])
    h, w = sprite.rgba.shape[:2]
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + w, image.shape[1]), min(y0 + h, image.shape[0])
    if ix0 < ix1 and iy0 < iy1:
        patch = sprite.rgba[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        region = image[iy0:iy1, ix0:ix1]
        region *= 1.0 - patch[..., 3:]
        region += patch[..., :3]
    return x0, y0


def _shop_window(
    rng: np.random.Generator, image: np.ndarray, view: View, base_y: float, light: float
) -> np.ndarray:
    """A lit window with one to three mannequins; returns its box (x1, y1, x2, y2)."""
    unit = view.person_height(view.far_y)
    width = unit * rng.uniform(1.2, 2.2)
    x1 = float(rng.uniform(0, max(1.0, view.width - width)))
    top = base_y - unit * 1.25
    color = np.array(_jitter(rng, (190, 200, 205), 20), dtype=np.float32)
    rows = slice(max(int(top), 0), max(int(base_y), 0))
    image[rows, max(int(x1), 0) : int(x1 + width)] = color
    count = int(rng.integers(1, 4))
    for k in range(count):
        foot = (x1 + width * (k + 0.5 + rng.uniform(-0.2, 0.2)) / count, base_y - unit * 0.05)
        composite_sprite(image, render_mannequin(rng, unit * rng.uniform(0.85, 1.0), light), foot)
    return np.array([x1, top, x1 + width, base_y], dtype=np.float32)


def _poster(
    rng: np.random.Generator, image: np.ndarray, view: View, base_y: float, light: float
) -> np.ndarray:
    """A billboard showing a painted person; returns its box."""
    unit = view.person_height(view.far_y)
    height = unit * rng.uniform(0.9, 1.4)
    width = height * rng.uniform(0.55, 0.8)
    x1 = float(rng.uniform(0, max(1.0, view.width - width)))
    y1 = base_y - unit * 0.3 - height
    color = np.array(_jitter(rng, (230, 225, 210), 25), dtype=np.float32)
    image[max(int(y1), 0) : max(int(y1 + height), 0), max(int(x1), 0) : int(x1 + width)] = color
    figure = render_person(random_identity(rng), sample_pose(rng), height * 0.85, light)
    # Printed ink: the figure's colours are washed out towards the paper, so it reads as a
    # picture of a person rather than a person.
    rgba = figure.rgba.copy()
    rgba[..., :3] = 0.6 * rgba[..., :3] + 0.4 * color * rgba[..., 3:]
    printed = Sprite(rgba, figure.foot, figure.box)
    composite_sprite(image, printed, (x1 + width / 2, y1 + height * 0.95))
    return np.array([x1, y1, x1 + width, y1 + height], dtype=np.float32)


def paint_distant_crowd(
    rng: np.random.Generator, backdrop: Backdrop, view: View, size: float
) -> np.ndarray:
    """Paint a huddle of tiny, far-away persons about ``size`` pixels tall onto the backdrop's
    image (in place).

    They are too small to annotate one by one; the returned box (x1, y1, x2, y2) around them is
    an ignore region (CrowdHuman's "mask" boxes).
    """
    count = int(rng.integers(5, 13))
    center = float(rng.uniform(0.1, 0.9)) * view.width
    spread = size * count * 0.18
    ground = view.far_y - float(rng.uniform(0.0, 0.3)) * size
    boxes = []
    for _ in range(count):
        foot = (
            center + float(rng.uniform(-spread, spread)),
            ground + float(rng.uniform(-0.1, 0.1)) * size,
        )
        sprite = render_person(
            random_identity(rng), sample_pose(rng), size * rng.uniform(0.85, 1.1)
        )
        x0, y0 = composite_sprite(backdrop.image, sprite, foot)
        boxes.append(np.add(sprite.box, (x0, y0, x0, y0)))
    stacked = np.array(boxes, dtype=np.float32)
    box = np.concatenate([stacked[:, :2].min(axis=0), stacked[:, 2:].max(axis=0)])
    return np.clip(box, 0, [view.width, view.height, view.width, view.height]).astype(np.float32)


def make_backdrop(
    rng: np.random.Generator, view: View, props: float = 5.0, figures: float = 0.5
) -> Backdrop:
    """A street backdrop for ``view`` with about ``props`` props standing on the ground.

    ``figures`` is the chance of a shop window with mannequins, and separately of a poster with a
    painted person: person-like shapes that are not persons.
    """
    image = Image.new("RGB", (view.width, view.height))
    draw = ImageDraw.Draw(image)
    base_y = int(max(view.far_y - rng.uniform(4, 20), 8))
    unit = view.person_height(view.far_y)  # the scale of things along the building fronts
    _paint_ground(rng, draw, view, base_y)
    x = 0
    while x < view.width:
        x1 = int(x + unit * rng.uniform(2.0, 5.0))
        _paint_facade(rng, draw, x, x1, base_y, unit)
        x = x1
    draw.rectangle(
        (0, base_y, view.width, base_y + max(1, unit * 0.04)), fill=_jitter(rng, (110, 110, 110))
    )
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels *= 1.0 + 0.06 * _smooth_noise(rng, view.height, view.width, 16)[..., None]
    light = float(rng.uniform(-0.25, 0.25))
    boxes = []
    if rng.random() < figures:
        boxes.append(_shop_window(rng, pixels, view, base_y, light))
    if rng.random() < figures:
        boxes.append(_poster(rng, pixels, view, base_y, light))
    placed = [make_prop(rng, view, view.sample_foot(rng)) for _ in range(int(rng.poisson(props)))]
    figure_boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return Backdrop(np.clip(pixels, 0, 255), placed, figure_boxes)


def _prop_canvas(
    width: float, height: float, factor: int
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new(
        "RGBA", (max(math.ceil(width * factor), 1), max(math.ceil(height * factor), 1))
    )
    return image, ImageDraw.Draw(image)


def _prop_sprite(image: Image.Image, factor: int) -> Sprite:
    """Premultiply and box-filter an RGBA drawing; its foot is the bottom centre."""
    rgba = np.asarray(image, dtype=np.float32)
    h, w = rgba.shape[0] // factor, rgba.shape[1] // factor
    alpha = rgba[..., 3:] / 255.0
    rgba = np.concatenate([rgba[..., :3] * alpha, alpha], axis=-1)
    rgba = box_filter(rgba[: h * factor, : w * factor], factor)
    return Sprite(rgba, foot=(w / 2, float(h)), box=(0.0, 0.0, float(w), float(h)))


def _draw_prop(kind: str, draw: ImageDraw.ImageDraw, w: float, h: float, color, rng) -> None:
    """Draw prop ``kind`` filling a w x h canvas (already supersampled), standing on its bottom."""
    dark = (*tuple(max(c - 50, 0) for c in color), 255)
    fill = (*color, 255)
    if kind == "pole":
        draw.rectangle((w * 0.4, h * 0.08, w * 0.6, h), fill=dark)
        draw.ellipse((0, 0, w, h * 0.16), fill=fill)
    elif kind == "bollard":
        draw.rectangle((w * 0.15, h * 0.25, w * 0.85, h), fill=fill)
        draw.ellipse((w * 0.15, 0, w * 0.85, h * 0.45), fill=fill)
        draw.rectangle((w * 0.15, h * 0.35, w * 0.85, h * 0.45), fill=(230, 230, 230, 255))
    elif kind == "bin":
        draw.rectangle((w * 0.1, h * 0.1, w * 0.9, h), fill=fill)
        draw.rectangle((0, 0, w, h * 0.12), fill=dark)
    elif kind == "bench":
        draw.rectangle((0, h * 0.05, w, h * 0.35), fill=fill)
        draw.rectangle((0, h * 0.45, w, h * 0.58), fill=fill)
        for x in (w * 0.08, w * 0.86):
            draw.rectangle((x, h * 0.58, x + w * 0.06, h), fill=dark)
    elif kind == "car":
        draw.rounded_rectangle((0, h * 0.4, w, h * 0.85), radius=h * 0.1, fill=fill)
        draw.polygon(
            [(w * 0.2, h * 0.42), (w * 0.3, h * 0.05), (w * 0.72, h * 0.05), (w * 0.85, h * 0.42)],
            fill=fill,
        )
        draw.polygon(
            [(w * 0.28, h * 0.4), (w * 0.35, h * 0.12), (w * 0.68, h * 0.12), (w * 0.78, h * 0.4)],
            fill=(60, 80, 100, 255),
        )
        for x in (w * 0.2, w * 0.8):
            draw.ellipse((x - h * 0.17, h * 0.66, x + h * 0.17, h), fill=(25, 25, 25, 255))
    elif kind == "planter":
        draw.rectangle((w * 0.1, h * 0.55, w * 0.9, h), fill=fill)
        leaf = _jitter(rng, (50, 110, 45), 20)
        for _ in range(6):
            cx, cy, r = (
                rng.uniform(0.2, 0.8) * w,
                rng.uniform(0.2, 0.5) * h,
                rng.uniform(0.15, 0.3) * w,
            )
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(*leaf, 255))
    elif kind == "sign":
        draw.polygon([(w * 0.1, h), (w * 0.3, 0), (w * 0.7, 0), (w * 0.9, h)], fill=fill)
        draw.rectangle((w * 0.32, h * 0.15, w * 0.68, h * 0.5), fill=(240, 240, 235, 255))
    elif kind == "pillar":
        draw.rectangle((0, 0, w, h), fill=fill)
        draw.rectangle((w * 0.75, 0, w, h), fill=dark)
    elif kind == "bicycle":
        r = h * 0.3
        for x in (r, w - r):
            draw.ellipse((x - r, h - 2 * r, x + r, h), outline=dark, width=max(1, int(h * 0.04)))
        frame = [
            (r, h - r),
            (w * 0.45, h - r),
            (w - r, h - r),
            (w * 0.65, h * 0.2),
            (w * 0.4, h * 0.25),
            (r, h - r),
        ]
        draw.line(frame, fill=fill, width=max(1, int(h * 0.05)))
    else:
        raise ValueError(f"unknown prop kind {kind!r}; expected one of {PROP_KINDS}")


# Height and width of each prop kind, in units of the local person height.
_PROP_SIZES = {
    "pole": (2.2, 0.12), "bollard": (0.45, 0.14), "bin": (0.5, 0.3), "bench": (0.45, 0.9),
    "car": (0.75, 2.0), "planter": (0.55, 0.6), "sign": (0.55, 0.35), "pillar": (2.5, 0.35),
    "bicycle": (0.55, 0.85),
}  # fmt: skip


def make_prop(
    rng: np.random.Generator, view: View, foot: tuple[float, float], kind: str | None = None
) -> Prop:
    """A prop of ``kind`` (random if None) standing at ``foot``, scaled by the view."""
    kind = kind or PROP_KINDS[int(rng.integers(len(PROP_KINDS)))]
    if kind not in _PROP_SIZES:
        raise ValueError(f"unknown prop kind {kind!r}; expected one of {PROP_KINDS}")
    unit = view.person_height(foot[1])
    rel_h, rel_w = _PROP_SIZES[kind]
    factor = 2
    h, w = unit * rel_h * rng.uniform(0.85, 1.15), unit * rel_w * rng.uniform(0.85, 1.15)
    image, draw = _prop_canvas(w, h, factor)
    color = _jitter(rng, _PROP_COLORS[int(rng.integers(len(_PROP_COLORS)))], 12)
    _draw_prop(kind, draw, image.width, image.height, color, rng)
    return Prop(_prop_sprite(image, factor), foot)


@dataclass(frozen=True)
class ColorTransform:
    """A camera's colour response: ``out = 255 * ((matrix @ rgb + bias) / 255) ** gamma``."""

    matrix: np.ndarray
    bias: np.ndarray
    gamma: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) float in 0..255 -> transformed (H, W, 3) float32 in 0..255."""
        flat = image.reshape(-1, 3).astype(np.float32)  # one (N, 3) @ (3, 3) product is fast
        mixed = (flat @ self.matrix.T.astype(np.float32) + self.bias).reshape(image.shape)
        levels = np.rint(np.clip(mixed, 0, 255)).astype(np.uint8)
        curve = 255.0 * (np.arange(256, dtype=np.float32) / 255.0) ** self.gamma
        return curve[levels]


IDENTITY_TRANSFORM = ColorTransform(np.eye(3, dtype=np.float32), np.zeros(3, np.float32), 1.0)


def sample_color_transform(rng: np.random.Generator, strength: float = 1.0) -> ColorTransform:
    """A random colour cast, channel gains, brightness offset and gamma; ``strength`` scales all."""
    gains = 1.0 + strength * rng.uniform(-0.18, 0.18, size=3)
    cross = strength * rng.normal(0, 0.05, size=(3, 3))
    np.fill_diagonal(cross, 0)
    brightness = 1.0 + strength * rng.uniform(-0.2, 0.15)
    matrix = (np.diag(gains) + cross) * brightness
    bias = strength * rng.normal(0, 6, size=3)
    gamma = float(math.exp(strength * rng.uniform(-0.2, 0.2)))
    return ColorTransform(matrix.astype(np.float32), bias.astype(np.float32), gamma)
