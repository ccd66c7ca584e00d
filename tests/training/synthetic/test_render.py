"""Person figures: size, anchoring and the way pose changes what is visible."""

import dataclasses
import math

import numpy as np
import pytest

from training.synthetic.identity import COLOR_NAMES, COLOR_RGB, NO_HAT, SKIN_TONES, Identity
from training.synthetic.render import Pose, render_mannequin, render_person

HIKER = Identity(
    upper_color=COLOR_NAMES.index("blue"), upper_pattern="solid",
    upper_color2=COLOR_NAMES.index("white"), sleeves="long",
    lower_color=COLOR_NAMES.index("black"), lower_style="trousers",
    shoe_color=COLOR_NAMES.index("brown"), skin=0, hair_color=0, hair_style="short", hat=NO_HAT,
    bag="backpack", bag_color=COLOR_NAMES.index("yellow"), height=1.0, width=1.0,
)  # fmt: skip
FRONT, BACK, SIDE = Pose(yaw=0.0), Pose(yaw=math.pi), Pose(yaw=math.pi / 2)


def _colour_pixels(rgba: np.ndarray, rgb, rows: slice = slice(None), tolerance: float = 30.0):
    """How many fully opaque pixels (within ``rows``) have about colour ``rgb``."""
    opaque = rgba[rows, :, 3] > 0.99
    colour = rgba[rows, :, :3] / np.maximum(rgba[rows, :, 3:], 1e-6)
    close = np.abs(colour - np.asarray(rgb, dtype=np.float32)).max(axis=-1) < tolerance
    return int((opaque & close).sum())


def _box_size(sprite) -> tuple[float, float]:
    x1, y1, x2, y2 = sprite.box
    return x2 - x1, y2 - y1


def test_a_standing_person_is_as_tall_as_asked_and_stands_on_its_foot_point():
    sprite = render_person(HIKER, FRONT, height=100)
    width, height = _box_size(sprite)
    # Partly covered edge pixels count as the figure's: up to a pixel or so at each end.
    assert 98 <= height <= 103
    assert 0.2 * height < width < 0.5 * height  # a human aspect ratio
    assert abs(sprite.foot[1] - sprite.box[3]) <= 1.5  # soles on the ground point
    assert sprite.box[0] < sprite.foot[0] < sprite.box[2]


def test_build_scales_the_figure():
    tall = dataclasses.replace(HIKER, height=1.1)
    assert _box_size(render_person(tall, FRONT, 100))[1] == pytest.approx(110, abs=3)


def test_a_backpack_shows_from_behind_and_only_its_straps_from_the_front():
    yellow = COLOR_RGB[HIKER.bag_color]
    behind = _colour_pixels(render_person(HIKER, BACK, 120).rgba, yellow)
    front = _colour_pixels(render_person(HIKER, FRONT, 120).rgba, yellow)
    assert behind > 3 * front > 0


def test_the_face_shows_from_the_front_and_not_from_behind():
    skin = SKIN_TONES[HIKER.skin]
    head = slice(0, 15)  # the top eighth of a 120-pixel figure
    front = _colour_pixels(render_person(HIKER, FRONT, 120).rgba, skin, head)
    behind = _colour_pixels(render_person(HIKER, BACK, 120).rgba, skin, head)
    assert front > 3 * max(behind, 1)


def test_a_figure_is_narrower_from_the_side_and_strides_open_it_up():
    front = _box_size(render_person(HIKER, FRONT, 120))[0]
    side = _box_size(render_person(HIKER, SIDE, 120))[0]
    stride = Pose(yaw=math.pi / 2, phase=math.pi / 2, stride=0.45)  # legs fully apart
    walking = _box_size(render_person(HIKER, stride, 120))[0]
    assert side < front
    assert walking > side * 1.3


def test_rendering_is_deterministic():
    a = render_person(HIKER, Pose(yaw=0.7, phase=1.0, stride=0.3), 64, light=0.2)
    b = render_person(HIKER, Pose(yaw=0.7, phase=1.0, stride=0.3), 64, light=0.2)
    assert np.array_equal(a.rgba, b.rgba) and a.box == b.box and a.foot == b.foot


def test_premultiplied_colours_never_exceed_their_alpha():
    sprite = render_person(HIKER, Pose(yaw=2.0, stride=0.4), 50, light=0.3)
    assert sprite.rgba[..., 3].max() <= 1.0
    assert np.all(sprite.rgba[..., :3] <= 255.0 * sprite.rgba[..., 3:] + 1e-3)


def _chromaticity_spread(rgba: np.ndarray) -> float:
    """Std of r/(r+g+b) etc. over opaque pixels: 0 for one colour under any shading."""
    opaque = rgba[..., 3] > 0.99
    rgb = rgba[opaque][:, :3]
    chroma = rgb / np.maximum(rgb.sum(axis=1, keepdims=True), 1e-6)
    return float(chroma.std(axis=0).max())


def test_a_mannequin_has_a_person_shape_but_a_single_colour():
    mannequin = render_mannequin(np.random.default_rng(0), 100)
    width, height = _box_size(mannequin)
    assert 90 <= height <= 104 and width < 0.6 * height
    assert _chromaticity_spread(mannequin.rgba) < 0.03
    assert _chromaticity_spread(render_person(HIKER, FRONT, 100).rgba) > 0.05


def test_too_small_a_person_is_an_error():
    with pytest.raises(ValueError, match="height"):
        render_person(HIKER, FRONT, 2)
