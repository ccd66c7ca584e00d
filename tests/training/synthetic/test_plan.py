"""Spreading identities over images."""

import numpy as np
import pytest

from training.synthetic.plan import fill_unlabeled, person_counts, spread_identities


def test_each_identity_appears_equally_often_in_distinct_images_and_cameras():
    rng = np.random.default_rng(0)
    counts = np.full(60, 5)  # 300 persons, 60% labeled: 180 appearances of 18 identities
    cameras = np.arange(60) % 6
    shown = spread_identities(rng, counts, cameras, 18, 0.6, min_cameras=2)
    appearances = {identity: [] for identity in range(18)}
    for image, identities in enumerate(shown):
        assert len(identities) == len(set(identities))  # nobody twice in one image
        for identity in identities:
            appearances[identity].append(image)
    assert all(len(images) == 10 for images in appearances.values())  # 180 / 18
    assert all(len({cameras[i] for i in images}) >= 2 for images in appearances.values())


def test_leftover_slots_become_unlabeled_persons_from_a_reused_pool():
    rng = np.random.default_rng(1)
    counts = np.array([4, 4, 4, 4])
    labeled = [[0], [0, 1], [], [1]]
    unlabeled, pool = fill_unlabeled(rng, counts, labeled, reuse=1.5)
    assert [len(extra) for extra in unlabeled] == [3, 2, 4, 3]
    assert pool == 8  # ceil(12 free slots / 1.5)
    assert all(len(set(extra)) == len(extra) for extra in unlabeled)


def test_identities_that_cannot_appear_twice_are_an_error():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="more images or fewer identities"):
        spread_identities(rng, np.array([2, 2]), np.zeros(2), identities=3, labeled_fraction=0.5)


def test_person_counts_stay_in_range():
    counts = person_counts(np.random.default_rng(3), 200, 2, 7)
    assert counts.min() == 2 and counts.max() == 7
    with pytest.raises(ValueError, match="persons per image"):
        person_counts(np.random.default_rng(3), 5, 4, 2)
