"""Rendering of person figures (and person-like mannequins) as small RGBA sprites.

A figure is a tiny 3D skeleton (head, torso, two-segment arms and legs, feet) posed by a yaw and a
gait phase and projected orthographically, so one identity looks different from the front, the
back and the side: the face shows only from the front, a backpack only from the back (straps from
the front), limbs swing in the image plane only from the side. Parts are painted back to front
into a label map at 2-3x resolution, coloured from the identity's attributes, shaded (far limbs
darker, a light gradient across the body) and box-filtered down, which antialiases the edges.

Coordinates: body units where the person is 1 tall, y down from the head top (0) to the soles
(1), x to the image right; the 3D body frame has z pointing out of the chest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from training.synthetic.identity import (
    COLOR_RGB,
    HAIR_COLORS,
    NO_HAT,
    SKIN_TONES,
    Identity,
)

# Part labels of the label map; 0 is empty.
SKIN, HAIR, UPPER, LOWER, SHOES, HAT, BAG, STAND = range(1, 9)

FULL, FAR, OUTLINE = 255, 200, 150  # shade values: lit, far-side limb, limb contour

# Skeleton proportions, in body units (a person is 1 tall).
HEAD_CENTER_Y, HEAD_RX, HEAD_RY = 0.072, 0.05, 0.066
NECK_Y = (0.12, 0.19)
SHOULDER_Y, SHOULDER_X = 0.19, 0.112
HIP_Y, HIP_X = 0.52, 0.056
UPPER_ARM, FOREARM, HAND_R = 0.175, 0.16, 0.021
THIGH, SHIN = 0.235, 0.225
ARM_R, FOREARM_R, THIGH_R, SHIN_R = 0.024, 0.02, 0.034, 0.026
# Torso outline: (y, half-width from the front, half-depth from the side).
TORSO_PROFILE = ((0.165, 0.095, 0.06), (0.19, 0.125, 0.07), (0.3, 0.118, 0.08),
                 (0.44, 0.1, 0.072), (0.55, 0.105, 0.075))  # fmt: skip
TOP_MARGIN = 0.05  # room above the head top for hair and hats


@dataclass(frozen=True)
class Pose:
    """How a figure stands: ``yaw`` 0 faces the camera, pi/2 faces image right.

    ``stride`` is the leg swing amplitude in radians (0 = standing); ``phase`` the gait phase;
    ``arm_swing`` the arm swing amplitude; ``elbow`` the base elbow bend; ``arm_spread`` and
    ``leg_spread`` the sideways opening of the arms and legs.
    """

    yaw: float
    phase: float = 0.0
    stride: float = 0.0
    arm_swing: float = 0.0
    elbow: float = 0.15
    arm_spread: float = 0.08
    leg_spread: float = 0.03


def sample_pose(rng: np.random.Generator, walking_probability: float = 0.7) -> Pose:
    """A random walking or standing pose, facing any direction."""
    yaw = float(rng.uniform(-math.pi, math.pi))
    if rng.random() < walking_probability:
        stride = float(rng.uniform(0.25, 0.5))
        return Pose(
            yaw=yaw,
            phase=float(rng.uniform(0, 2 * math.pi)),
            stride=stride,
            arm_swing=stride * float(rng.uniform(0.6, 1.1)),
            elbow=float(rng.uniform(0.1, 0.5)),
            arm_spread=float(rng.uniform(0.04, 0.12)),
            leg_spread=float(rng.uniform(0.0, 0.04)),
        )
    return Pose(
        yaw=yaw,
        phase=float(rng.uniform(0, 2 * math.pi)),
        stride=float(rng.uniform(0.0, 0.08)),
        arm_swing=float(rng.uniform(0.0, 0.2)),
        elbow=float(rng.uniform(0.05, 1.4)),
        arm_spread=float(rng.uniform(0.04, 0.25)),
        leg_spread=float(rng.uniform(0.02, 0.1)),
    )


@dataclass(frozen=True, eq=False)
class Sprite:
    """A rendered figure or object: premultiplied RGBA and where it stands.

    ``rgba`` is (h, w, 4) float32 with colours premultiplied by alpha (0..255 and 0..1);
    ``foot`` is the (x, y) ground contact point in sprite pixels; ``box`` the tight x1 y1 x2 y2
    extent of the visible figure in sprite pixels.
    """

    rgba: np.ndarray
    foot: tuple[float, float]
    box: tuple[float, float, float, float]


class _Canvas:
    """Label and shade maps drawn in step, at supersampled resolution."""

    def __init__(self, width: int, height: int, scale: float, origin: tuple[float, float]):
        self.label = Image.new("L", (width, height), 0)
        self.shade = Image.new("L", (width, height), FULL)
        self._label = ImageDraw.Draw(self.label)
        self._shade = ImageDraw.Draw(self.shade)
        self.scale = scale
        self.origin = origin

    def px(self, point: np.ndarray) -> tuple[float, float]:
        return (self.origin[0] + point[0] * self.scale, self.origin[1] + point[1] * self.scale)

    def polygon(self, points, label: int, shade: int = FULL, outline: bool = False) -> None:
        xy = [self.px(p) for p in points]
        self._label.polygon(xy, fill=label)
        self._shade.polygon(xy, fill=shade, outline=OUTLINE if outline else None)

    def ellipse(self, center, rx: float, ry: float, label: int, shade: int = FULL) -> None:
        cx, cy = self.px(center)
        box = (
            cx - rx * self.scale,
            cy - ry * self.scale,
            cx + rx * self.scale,
            cy + ry * self.scale,
        )
        self._label.ellipse(box, fill=label)
        self._shade.ellipse(box, fill=shade)

    def upper_half_ellipse(self, center, rx: float, ry: float, label: int) -> None:
        cx, cy = self.px(center)
        box = (
            cx - rx * self.scale,
            cy - ry * self.scale,
            cx + rx * self.scale,
            cy + ry * self.scale,
        )
        self._label.pieslice(box, 180, 360, fill=label)
        self._shade.pieslice(box, 180, 360, fill=FULL)

    def capsule(self, p0, p1, radius: float, label: int, shade: int = FULL, outline: bool = False):
        """A limb segment: a thick line with round ends."""
        p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        direction = p1 - p0
        length = float(np.hypot(*direction))
        normal = np.array([-direction[1], direction[0]]) / length * radius if length > 1e-9 else 0
        self.ellipse(p0, radius, radius, label, shade)
        self.ellipse(p1, radius, radius, label, shade)
        if length > 1e-9:
            self.polygon(
                [p0 + normal, p1 + normal, p1 - normal, p0 - normal], label, shade, outline
            )


class _Body:
    """The posed skeleton of one figure: 3D joints rotated by the yaw and projected."""

    def __init__(self, identity: Identity, pose: Pose):
        self.identity = identity
        self.pose = pose
        self.cos = math.cos(pose.yaw)
        self.sin = math.sin(pose.yaw)
        self.width = identity.width
        # Vertical shift applied by ``project`` so that the lowest sole touches y = 1.
        self.lift = self._ground_offset()

    def project(self, point3d) -> np.ndarray:
        """(x, y, z) in the body frame -> (x, y) in the image plane, soles at y = 1."""
        x, y, z = point3d
        return np.array([x * self.cos + z * self.sin, y + self.lift])

    def depth(self, point3d) -> float:
        """Distance towards the camera; larger is drawn later."""
        x, _, z = point3d
        return -x * self.sin + z * self.cos

    def half_width(self, front: float, side: float) -> float:
        return front * self.width * abs(self.cos) + side * self.width * abs(self.sin)

    def leg(self, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Hip, knee, ankle and toe of the leg on ``side`` (+1 or -1), in 3D."""
        pose = self.pose
        swing = pose.stride * math.sin(pose.phase + (0 if side > 0 else math.pi))
        # The leg swinging back bends its knee (push-off); a standing leg stays nearly straight.
        knee_bend = 0.05 + 1.4 * pose.stride * max(
            0.0, -math.sin(pose.phase + (0 if side > 0 else math.pi) + 0.6)
        )
        hip = np.array([side * HIP_X * self.width, HIP_Y, 0.0])
        knee = hip + THIGH * _direction(swing, side * pose.leg_spread)
        ankle = knee + SHIN * _direction(swing - knee_bend, side * pose.leg_spread * 0.5)
        toe = ankle + np.array([0.0, 0.012, 0.055])
        return hip, knee, ankle, toe

    def arm(self, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shoulder, elbow and hand of the arm on ``side``; arms swing against the legs."""
        pose = self.pose
        swing = -pose.arm_swing * math.sin(pose.phase + (0 if side > 0 else math.pi))
        shoulder = np.array([side * SHOULDER_X * self.width, SHOULDER_Y, 0.0])
        elbow = shoulder + UPPER_ARM * _direction(swing, side * pose.arm_spread)
        hand = elbow + FOREARM * _direction(swing + pose.elbow, side * pose.arm_spread * 0.6)
        return shoulder, elbow, hand

    def _ground_offset(self) -> float:
        """Vertical shift that puts the lowest sole on the ground line (y = 1)."""
        lowest = max(max(ankle[1], toe[1]) for _, _, ankle, toe in map(self.leg, (1, -1)))
        return 1.0 - (lowest + 0.02)


def _direction(swing: float, spread: float) -> np.ndarray:
    """Unit vector pointing down, swung forward by ``swing`` and sideways by ``spread``."""
    return np.array(
        [math.sin(spread), math.cos(swing) * math.cos(spread), math.sin(swing) * math.cos(spread)]
    )


def _draw_figure(canvas: _Canvas, body: _Body, mannequin: bool = False) -> None:
    """Paint every part back to front into the canvas's label and shade maps."""
    identity = body.identity
    facing_camera = body.cos >= 0
    arms = sorted((1, -1), key=lambda s: body.depth((s * SHOULDER_X, 0, 0)))
    far_arms = [s for s in arms if body.depth((s * SHOULDER_X, 0, 0)) < -0.3 * SHOULDER_X]
    near_arms = [s for s in arms if s not in far_arms]

    if not mannequin:
        if identity.bag == "backpack" and facing_camera:
            _draw_backpack(canvas, body)
        if identity.hair_style == "long" and facing_camera:
            _draw_long_hair(canvas, body)
    for side in far_arms:
        _draw_arm(canvas, body, side, FAR)
    for side in sorted((1, -1), key=lambda s: body.depth(body.leg(s)[2])):
        shade = FAR if body.depth((side * HIP_X, 0, 0)) < -0.3 * HIP_X else FULL
        _draw_leg(canvas, body, side, shade)
    _draw_pelvis(canvas, body)
    _draw_torso(canvas, body)
    _draw_head(canvas, body, bald=mannequin)
    if mannequin:
        for side in near_arms:
            _draw_arm(canvas, body, side, FULL)
        return
    if identity.hair_style == "long" and not facing_camera:
        _draw_long_hair(canvas, body)
    if identity.bag == "backpack":
        if facing_camera:
            _draw_backpack_straps(canvas, body)
        else:
            _draw_backpack(canvas, body)
    if identity.bag == "shoulder":
        _draw_shoulder_bag(canvas, body)
    for side in near_arms:
        _draw_arm(canvas, body, side, FULL)
    if identity.bag == "handbag":
        _draw_handbag(canvas, body, near_arms[-1] if near_arms else far_arms[-1])


def _draw_arm(canvas: _Canvas, body: _Body, side: int, shade: int) -> None:
    shoulder, elbow, hand = body.arm(side)
    sleeve = UPPER if body.identity.sleeves == "long" else SKIN
    s, e, h = body.project(shoulder), body.project(elbow), body.project(hand)
    outline = shade == FULL
    canvas.capsule(e, h, FOREARM_R * body.width, sleeve, shade, outline)
    canvas.capsule(s, e, ARM_R * body.width, UPPER, shade, outline)
    canvas.ellipse(h, HAND_R, HAND_R, SKIN, shade)


def _draw_leg(canvas: _Canvas, body: _Body, side: int, shade: int) -> None:
    hip, knee, ankle, toe = body.leg(side)
    style = body.identity.lower_style
    shin_label = LOWER if style == "trousers" else SKIN
    thigh_label = SKIN if style == "skirt" else LOWER
    h, k, a, t = (body.project(p) for p in (hip, knee, ankle, toe))
    canvas.capsule(k, a, SHIN_R * body.width, shin_label, shade)
    canvas.capsule(h, k, THIGH_R * body.width, thigh_label, shade)
    heel = a + np.array([0.0, 0.008])
    canvas.capsule(heel, t, 0.018, SHOES, shade)


def _trapezoid(
    cx: float, top: float, bottom: float, half_top: float, half_bottom: float
) -> list[tuple[float, float]]:
    """Corners of a trapezoid centred on x = ``cx`` (a rectangle when the halves are equal)."""
    return [(cx - half_top, top), (cx + half_top, top), (cx + half_bottom, bottom),
            (cx - half_bottom, bottom)]  # fmt: skip


def _draw_pelvis(canvas: _Canvas, body: _Body) -> None:
    """Hips in the lower garment's colour; a skirt flares down to above the knees."""
    half = body.half_width(0.1, 0.075)
    cx = body.project((0, 0, 0))[0]
    top = 0.47 + body.lift
    if body.identity.lower_style == "skirt":
        bottom, flare = 0.7 + body.lift, 1.45
    else:
        bottom, flare = HIP_Y + 0.06 + body.lift, 1.0
    canvas.polygon(_trapezoid(cx, top, bottom, half, half * flare), LOWER)


def _draw_torso(canvas: _Canvas, body: _Body) -> None:
    cx = body.project((0, 0, 0))[0]
    left, right = [], []
    for y, front, side in TORSO_PROFILE:
        half = body.half_width(front, side)
        right.append((cx + half, y + body.lift))
        left.append((cx - half, y + body.lift))
    canvas.polygon(right + left[::-1], UPPER)
    neck_top, neck_bottom = (np.array([cx, y + body.lift]) for y in NECK_Y)
    canvas.capsule(neck_top, neck_bottom, 0.022 * body.width, SKIN)


def _head_center(body: _Body) -> np.ndarray:
    return body.project((0, HEAD_CENTER_Y, 0.012))


def _draw_head(canvas: _Canvas, body: _Body, bald: bool) -> None:
    identity = body.identity
    center = _head_center(body)
    rx = HEAD_RX * identity.width**0.3
    canvas.ellipse(center, rx, HEAD_RY, SKIN)
    if bald:
        return
    # Hair caps the head from the back and the top: the whole head from behind, the crown from
    # the front, the back half from the side.
    back = max(0.0, -body.cos)
    hair_center = center + np.array([-body.sin * 0.4 * rx, -0.3 * HEAD_RY * (1 - back)])
    canvas.ellipse(hair_center, rx * 1.05, HEAD_RY * (0.8 + 0.22 * back), HAIR)
    if identity.hat != NO_HAT:
        crown = center + np.array([0.0, -0.32 * HEAD_RY])
        canvas.upper_half_ellipse(crown, rx * 1.1, HEAD_RY * 0.9, HAT)
        reach = rx * (1.15 * abs(body.cos) + 0.55 * abs(body.sin))
        brim_x = crown[0] + body.sin * 0.55 * rx
        canvas.polygon(_trapezoid(brim_x, crown[1] - 0.01, crown[1] + 0.008, reach, reach), HAT)


def _draw_long_hair(canvas: _Canvas, body: _Body) -> None:
    center = _head_center(body)
    rx = HEAD_RX * body.identity.width**0.3
    cx = center[0] - body.sin * 0.45 * rx
    half = rx * (1.1 * abs(body.cos) + 0.55 * abs(body.sin))
    canvas.polygon(_trapezoid(cx, center[1], center[1] + 0.17, half, half * 0.9), HAIR)


def _draw_backpack(canvas: _Canvas, body: _Body) -> None:
    depth = 0.075 * body.width + 0.035
    cx = body.project((0, 0.32, -depth))[0]
    half = body.half_width(0.085, 0.035)
    canvas.polygon(_trapezoid(cx, 0.2 + body.lift, 0.46 + body.lift, half, half), BAG)


def _draw_backpack_straps(canvas: _Canvas, body: _Body) -> None:
    if abs(body.cos) < 0.4:
        return
    for side in (1, -1):
        top = body.project((side * 0.07 * body.width, 0.185, 0.07))
        bottom = body.project((side * 0.085 * body.width, 0.36, 0.08))
        canvas.capsule(top, bottom, 0.011, BAG)


def _draw_shoulder_bag(canvas: _Canvas, body: _Body) -> None:
    side = 1 if body.identity.hair_color % 2 else -1  # worn on a fixed side per identity
    bag3d = (-side * (HIP_X + 0.09) * body.width, 0.5, 0.02)
    if abs(body.cos) > 0.35:
        strap_top = body.project((side * 0.09 * body.width, 0.19, 0.08 * np.sign(body.cos)))
        canvas.capsule(strap_top, body.project(bag3d), 0.009, BAG)
    cx, cy = body.project(bag3d)
    half = 0.045 * abs(body.cos) + 0.02 * abs(body.sin)
    if body.depth(bag3d) > -0.05:
        canvas.polygon(_trapezoid(cx, cy - 0.05, cy + 0.05, half, half), BAG, outline=True)


def _draw_handbag(canvas: _Canvas, body: _Body, side: int) -> None:
    x, y = body.project(body.arm(side)[2])
    canvas.polygon(_trapezoid(x, y + 0.015, y + 0.085, 0.035, 0.04), BAG, outline=True)


def _supersampling(height: float) -> int:
    """Small figures get more samples per pixel so their thin limbs stay smooth."""
    return 3 if height < 64 else 2


def _new_canvas(height: float, factor: int) -> tuple[_Canvas, int, int]:
    scale = height * factor
    width_px = math.ceil(0.8 * height) * factor
    height_px = math.ceil((1 + TOP_MARGIN) * height + 2) * factor
    canvas = _Canvas(width_px, height_px, scale, (width_px / 2, TOP_MARGIN * scale))
    return canvas, width_px, height_px


def _pattern_mask(identity: Identity, shape: tuple[int, int], scale: float) -> np.ndarray | None:
    """Where the upper garment shows its second colour (stripes, checks), or None if solid."""
    if identity.upper_pattern == "solid":
        return None
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    period = 0.06 * scale
    rows = (ys / period) % 1.0 < 0.5
    cols = ((xs - shape[1] / 2) / period) % 1.0 < 0.5
    if identity.upper_pattern == "hstripes":
        return np.broadcast_to(rows, shape)
    if identity.upper_pattern == "vstripes":
        return np.broadcast_to(cols, shape)
    return rows ^ cols


def _part_colors(identity: Identity) -> np.ndarray:
    """(9, 3) RGB per part label."""
    colors = np.zeros((STAND + 1, 3), dtype=np.float32)
    colors[SKIN] = SKIN_TONES[identity.skin]
    colors[HAIR] = HAIR_COLORS[identity.hair_color]
    colors[UPPER] = COLOR_RGB[identity.upper_color]
    colors[LOWER] = COLOR_RGB[identity.lower_color]
    colors[SHOES] = COLOR_RGB[identity.shoe_color]
    colors[HAT] = COLOR_RGB[identity.hat] if identity.hat != NO_HAT else 0
    colors[BAG] = COLOR_RGB[identity.bag_color]
    return colors


def _finish(
    canvas: _Canvas,
    colors: np.ndarray,
    light: float,
    factor: int,
    pattern: tuple[np.ndarray, np.ndarray] | None = None,
) -> Sprite:
    """Colour the label map, shade it, box-filter it down and crop it to the figure.

    ``colors`` is (labels, 3) RGB per part label; ``pattern`` an optional (mask, rgb) that
    repaints the upper garment where the mask is set.
    """
    full = np.asarray(canvas.label)
    (y0, y1), (x0, x1) = _extent(full > 0, factor)
    label = full[y0:y1, x0:x1]
    rgba = np.empty((*label.shape, 4), dtype=np.float32)  # (h * factor, w * factor, 4)
    rgba[..., :3] = colors[label]
    if pattern is not None:
        mask, second_color = pattern
        rgba[(label == UPPER) & mask[y0:y1, x0:x1], :3] = second_color
    center = full.shape[1] / 2
    gradient = 1.0 + light * (np.arange(x0, x1, dtype=np.float32) - center) / center
    alpha = label > 0
    shade = np.asarray(canvas.shade, dtype=np.float32)[y0:y1, x0:x1] * (alpha / 255.0)
    rgba[..., :3] *= (shade * gradient[None, :])[..., None]
    rgba[..., 3] = alpha
    rgba = box_filter(rgba, factor)
    np.minimum(rgba[..., :3], 255.0 * rgba[..., 3:], out=rgba[..., :3])
    ground = canvas.origin[1] + canvas.scale  # the soles are at y = 1 in body units
    foot = ((canvas.origin[0] - x0) / factor, (ground - y0) / factor)
    return Sprite(rgba=rgba, foot=foot, box=_tight_box(rgba[..., 3] > 0.25))


def _extent(mask: np.ndarray, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row and column ranges covering ``mask``, with one pixel of margin, in whole pixels."""

    def span(any_set: np.ndarray, size: int) -> tuple[int, int]:
        hits = np.flatnonzero(any_set)
        lo = max(hits[0] // factor - 1, 0) * factor
        hi = min(hits[-1] // factor + 2, size // factor) * factor
        return lo, hi

    return span(mask.any(axis=1), mask.shape[0]), span(mask.any(axis=0), mask.shape[1])


def box_filter(image: np.ndarray, factor: int) -> np.ndarray:
    """(H * f, W * f, C) -> (H, W, C): the mean of each f x f block."""
    h, w, c = image.shape[0] // factor, image.shape[1] // factor, image.shape[2]
    rows = image.reshape(h, factor, w * factor * c).sum(axis=1)
    blocks = rows.reshape(h, w, factor, c).sum(axis=2)
    return blocks * np.float32(1.0 / factor**2)


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def render_person(identity: Identity, pose: Pose, height: float, light: float = 0.0) -> Sprite:
    """Draw ``identity`` in ``pose``, ``height`` pixels tall (times the identity's own height).

    ``light`` in [-0.3, 0.3] tilts the brightness across the body (light from one side).
    """
    if height < 4:
        raise ValueError(f"person height must be >= 4 pixels, got {height}")
    height = height * identity.height
    factor = _supersampling(height)
    canvas, _, _ = _new_canvas(height, factor)
    _draw_figure(canvas, _Body(identity, pose))
    mask = _pattern_mask(identity, canvas.label.size[::-1], canvas.scale)
    pattern = None if mask is None else (mask, COLOR_RGB[identity.upper_color2])
    return _finish(canvas, _part_colors(identity), light, factor, pattern)


MANNEQUIN_MATERIALS = np.array(
    [(236, 232, 226), (44, 44, 46), (204, 184, 152), (150, 152, 158)], dtype=np.float32
)
_STAND_COLOR = (72, 72, 78)
_MANNEQUIN_BODY = Identity(
    upper_color=0, upper_pattern="solid", upper_color2=1, sleeves="long", lower_color=0,
    lower_style="trousers", shoe_color=0, skin=0, hair_color=0, hair_style="short", hat=NO_HAT,
    bag="none", bag_color=0, height=1.0, width=0.9,
)  # fmt: skip


def render_mannequin(rng: np.random.Generator, height: float, light: float = 0.0) -> Sprite:
    """A person-shaped distractor: one plastic colour, no hair, standing on a rod and base plate.

    It has a person's silhouette but none of a person's colour structure (skin, hair, clothes),
    so a detector can learn to reject it; it is never annotated.
    """
    factor = _supersampling(height)
    canvas, _, _ = _new_canvas(height, factor)
    pose = Pose(
        yaw=float(rng.uniform(-1.2, 1.2)),
        elbow=float(rng.uniform(0.0, 1.0)),
        arm_spread=float(rng.uniform(0.05, 0.3)),
    )
    body = _Body(_MANNEQUIN_BODY, pose)
    rod_x = body.project((0, 0, 0))[0]
    canvas.capsule(np.array([rod_x, 0.5]), np.array([rod_x, 0.99]), 0.008, STAND)
    _draw_figure(canvas, body, mannequin=True)
    canvas.ellipse(np.array([rod_x, 0.995]), 0.11, 0.014, STAND)
    colors = np.repeat(
        MANNEQUIN_MATERIALS[int(rng.integers(len(MANNEQUIN_MATERIALS)))][None], STAND + 1, axis=0
    )
    colors[STAND] = _STAND_COLOR
    return _finish(canvas, colors, light, factor)
