"""Identity tables: distinct people who nonetheless share attributes."""

import dataclasses
import itertools
from collections import Counter

import numpy as np
import pytest

from training.synthetic.identity import (
    COLOR_NAMES,
    MIN_CLOTHING_DISTANCE,
    MIN_IDENTITY_DISTANCE,
    NO_HAT,
    Identity,
    clothing_distance,
    identity_distance,
    random_identity,
    sample_identities,
)

PLAIN = Identity(
    upper_color=COLOR_NAMES.index("red"), upper_pattern="solid",
    upper_color2=COLOR_NAMES.index("white"), sleeves="long",
    lower_color=COLOR_NAMES.index("blue"), lower_style="trousers",
    shoe_color=COLOR_NAMES.index("black"), skin=0, hair_color=0, hair_style="short", hat=NO_HAT,
    bag="none", bag_color=0, height=1.0, width=1.0,
)  # fmt: skip


def _share_fraction(identities: list[Identity]) -> float:
    counts = Counter(identity.upper_color for identity in identities)
    return sum(counts[identity.upper_color] > 1 for identity in identities) / len(identities)


@pytest.mark.parametrize(("count", "seed"), [(2, 0), (5, 1), (12, 2), (60, 3), (300, 4)])
def test_at_least_a_fifth_of_identities_share_their_upper_colour(count, seed):
    """No single attribute identifies a person: >= 1/5 wear a shirt colour someone else wears,
    even in tables too small for that to happen by chance."""
    identities = sample_identities(np.random.default_rng(seed), count)
    assert len(identities) == count
    assert _share_fraction(identities) >= 0.2


def test_every_pair_of_identities_looks_different_enough():
    rng = np.random.default_rng(7)
    first = sample_identities(rng, 25)
    second = sample_identities(rng, 25, avoid=first)
    for a, b in itertools.combinations(first + second, 2):
        assert identity_distance(a, b) >= MIN_IDENTITY_DISTANCE
        assert clothing_distance(a, b) >= MIN_CLOTHING_DISTANCE  # never twins in one outfit


def test_distance_weighs_shirt_colour_two_and_a_hat_one():
    # red -> green shirt (far colours): 2; adding a hat: 1; total 3.
    other = dataclasses.replace(PLAIN, upper_color=COLOR_NAMES.index("green"), hat=0)
    assert identity_distance(PLAIN, other) == pytest.approx(3.0)


def test_near_colours_count_half():
    # red and maroon are confusable under a colour cast: half of the shirt weight 2.
    maroon = dataclasses.replace(PLAIN, upper_color=COLOR_NAMES.index("maroon"))
    assert identity_distance(PLAIN, maroon) == pytest.approx(1.0)


def test_build_differences_count_continuously_up_to_one_half_each():
    # height 0.05 apart: 0.5 * 0.05 / 0.1 = 0.25; width 0.3 apart: capped at 0.5.
    other = dataclasses.replace(PLAIN, height=1.05, width=1.3)
    assert identity_distance(PLAIN, other) == pytest.approx(0.75)


def test_body_details_are_not_clothing():
    # Hair colour 0.5 + skin 0.5 + shoes 0.25: 1.25 apart, none of it clothing.
    other = dataclasses.replace(PLAIN, hair_color=1, skin=2, shoe_color=COLOR_NAMES.index("white"))
    assert identity_distance(PLAIN, other) == pytest.approx(1.25)
    assert clothing_distance(PLAIN, other) == 0.0


def test_distance_is_symmetric_and_zero_for_the_same_identity():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = random_identity(rng), random_identity(rng)
        assert identity_distance(a, b) == pytest.approx(identity_distance(b, a))
        assert identity_distance(a, a) == 0.0


def test_pattern_second_colour_differs_from_the_main_colour():
    rng = np.random.default_rng(5)
    for identity in sample_identities(rng, 100):
        assert identity.upper_color2 != identity.upper_color


def test_negative_count_is_an_error():
    with pytest.raises(ValueError, match="count"):
        sample_identities(np.random.default_rng(0), -1)
