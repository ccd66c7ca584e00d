"""Frames: perspective, occlusion bookkeeping, camera colour transforms."""

import numpy as np
import pytest

from training.synthetic.identity import sample_identities
from training.synthetic.render import Pose
from training.synthetic.scene import (
    PersonPlacement,
    choose_feet,
    estimated_box,
    render_scene,
)
from training.synthetic.scenery import (
    IDENTITY_TRANSFORM,
    Backdrop,
    ColorTransform,
    View,
    make_backdrop,
    make_prop,
    sample_color_transform,
    sample_view,
)

# Person height = 0.5 * (y - 40): 30 px at row 100, 90 px at row 220.
VIEW = View(width=320, height=240, horizon=40.0, slope=0.5, far_y=100.0, near_y=220.0)
PLAIN = Backdrop(np.full((240, 320, 3), 128.0, dtype=np.float32))
ALICE, BOB = sample_identities(np.random.default_rng(0), 2)


def _person(identity, pid, foot):
    return PersonPlacement(identity, pid, foot, Pose(yaw=0.0))


def _render(persons, props=()):
    return render_scene(np.random.default_rng(0), VIEW, PLAIN, persons, list(props), noise=0.0)


def test_person_height_follows_the_ground_plane():
    assert VIEW.person_height(100.0) == pytest.approx(30.0)
    assert VIEW.person_height(220.0) == pytest.approx(90.0)
    scene = _render([_person(ALICE, 0, (160.0, 220.0))])
    height = scene.boxes[0, 3] - scene.boxes[0, 1]
    assert height == pytest.approx(90 * ALICE.height, abs=3)
    assert scene.boxes[0, 3] == pytest.approx(220, abs=1.5)  # box bottom on the feet


def test_a_person_alone_is_fully_visible():
    scene = _render([_person(ALICE, 3, (160.0, 200.0))])
    assert scene.visibility[0] == pytest.approx(1.0)
    assert scene.pids.tolist() == [3]


def test_the_nearer_person_hides_the_farther_one():
    # Bob stands 10 rows nearer, right in front of Alice: she is partly hidden, he is not.
    scene = _render([_person(ALICE, 0, (160.0, 190.0)), _person(BOB, -1, (162.0, 200.0))])
    assert scene.visibility[0] < 0.7
    assert scene.visibility[1] == pytest.approx(1.0)
    assert scene.pids.tolist() == [0, -1]


def test_a_prop_in_front_hides_the_legs():
    car = make_prop(np.random.default_rng(1), VIEW, (160.0, 205.0), kind="car")
    scene = _render([_person(ALICE, 0, (160.0, 195.0))], [car])
    assert scene.visibility[0] < 0.8


def test_a_person_half_outside_the_frame_has_a_clipped_box_and_lower_visibility():
    scene = _render([_person(ALICE, 0, (0.0, 200.0))])
    assert scene.boxes[0, 0] == 0.0
    assert 0.2 < scene.visibility[0] < 0.8


def test_choose_feet_keeps_box_cover_under_the_bound_when_room_allows():
    rng = np.random.default_rng(2)
    feet = choose_feet(rng, VIEW, 5, max_cover=0.3)
    boxes = [estimated_box(VIEW, foot) for foot in feet]
    for box in boxes:
        nearer = [o for o in boxes if o[3] > box[3]]
        area = (box[2] - box[0]) * (box[3] - box[1])
        covered = sum(
            max(min(box[2], o[2]) - max(box[0], o[0]), 0)
            * max(min(box[3], o[3]) - max(box[1], o[1]), 0)
            for o in nearer
        )
        assert covered / area <= 0.3 + 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_sampled_views_span_the_requested_person_heights(seed):
    view = sample_view(np.random.default_rng(seed), 384, 256, 40, 120)
    far, near = view.person_height(view.far_y), view.person_height(view.near_y)
    assert 40 <= far <= 48  # up to 1.2 x the smallest
    assert 102 <= near <= 120  # at least 0.85 x the largest
    assert view.far_y - 1.1 * far > 0  # a far person's head is inside the frame


def test_impossible_person_heights_are_an_error():
    with pytest.raises(ValueError, match="person heights"):
        sample_view(np.random.default_rng(0), 384, 256, 120, 40)


def test_identity_transform_changes_nothing_and_gains_scale_channels():
    image = np.random.default_rng(0).uniform(0, 200, size=(4, 5, 3)).astype(np.float32)
    assert np.allclose(IDENTITY_TRANSFORM.apply(image), np.round(image), atol=1e-3)
    redder = ColorTransform(
        np.diag([1.2, 1.0, 0.5]).astype(np.float32), np.zeros(3, np.float32), 1.0
    )
    out = redder.apply(np.full((1, 1, 3), 100.0, dtype=np.float32))
    assert out[0, 0].tolist() == [120.0, 100.0, 50.0]


def test_camera_transforms_differ_between_seeds():
    a = sample_color_transform(np.random.default_rng(0))
    b = sample_color_transform(np.random.default_rng(1))
    assert not np.allclose(a.matrix, b.matrix)


def test_backdrops_are_textured_and_deterministic():
    view = sample_view(np.random.default_rng(3), 192, 128, 20, 60)
    a = make_backdrop(np.random.default_rng(4), view)
    b = make_backdrop(np.random.default_rng(4), view)
    assert np.array_equal(a.image, b.image)
    assert a.image.shape == (128, 192, 3)
    assert a.image.std() > 10  # not a flat colour
