"""The balanced draw of positives and negatives, and the RoI sampler with GT appended."""

import pytest
import torch

from models.assigners import (
    IGNORED,
    NEGATIVE,
    MaxIoUConfig,
    RoISampler,
    RoISamplerConfig,
    sample_balanced,
)

# Candidates 0, 3 and 6 are positives (of GT 0, 1, 2); 1, 4, 5 and 7 negatives; 2 ignored.
MATCHES = torch.tensor([0, NEGATIVE, IGNORED, 1, NEGATIVE, NEGATIVE, 2, NEGATIVE])


def test_at_most_the_positive_share_is_positive_and_negatives_fill_up():
    """4 samples at 0.5: int(4 * 0.5) = 2 of the 3 positives, 4 - 2 = 2 of the 4 negatives."""
    positives, negatives = sample_balanced(MATCHES, 4, 0.5, torch.Generator().manual_seed(0))
    assert len(positives) == 2 and set(positives.tolist()) <= {0, 3, 6}
    assert len(negatives) == 2 and set(negatives.tolist()) <= {1, 4, 5, 7}
    assert positives.tolist() == sorted(positives.tolist())


def test_few_positives_leave_room_for_more_negatives():
    """6 samples at 0.5 would take 3 positives, and all 3 are there; 6 samples at 0.25 take
    int(1.5) = 1 positive and 5 negatives, but only 4 negatives exist: 5 samples in all."""
    positives, negatives = sample_balanced(MATCHES, 6, 0.5)
    assert positives.tolist() == [0, 3, 6] and len(negatives) == 3
    positives, negatives = sample_balanced(MATCHES, 6, 0.25)
    assert len(positives) == 1 and negatives.tolist() == [1, 4, 5, 7]


def test_ignored_candidates_are_never_drawn():
    positives, negatives = sample_balanced(MATCHES, 100, 0.5)
    drawn = set(positives.tolist()) | set(negatives.tolist())
    assert drawn == {0, 1, 3, 4, 5, 6, 7}


def test_the_draw_is_uniform():
    """Over many draws every negative is picked about as often (2 of 4: half the time)."""
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(len(MATCHES))
    for _ in range(400):
        _, negatives = sample_balanced(MATCHES, 4, 0.5, generator)
        counts[negatives] += 1
    assert torch.allclose(counts[[1, 4, 5, 7]] / 400, torch.full((4,), 0.5), atol=0.1)


def test_the_roi_sampler_appends_the_gt_boxes_as_positives():
    """No proposal overlaps the person, yet the GT box itself is drawn as a positive (IoU 1),
    matched to GT 0; the proposals are negatives."""
    sampler = RoISampler(RoISamplerConfig(num_samples=8, positive_fraction=0.5))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 70.0]])
    gt = torch.tensor([[100.0, 100.0, 130.0, 180.0]])
    sampled = sampler(proposals, gt)
    assert sampled.boxes.tolist() == [*proposals.tolist(), *gt.tolist()]
    assert sampled.matched_gt.tolist() == [NEGATIVE, NEGATIVE, 0]


def test_the_roi_sampler_draws_num_samples_with_its_share_of_positives():
    """20 proposals on a person (IoU >= 0.5) + 20 far away + the GT box: 8 samples at 0.25
    take 2 positives and 6 negatives, in increasing candidate order."""
    sampler = RoISampler(
        RoISamplerConfig(
            matcher=MaxIoUConfig(positive_iou=0.5, negative_iou=(0.0, 0.5)),
            num_samples=8,
            positive_fraction=0.25,
        )
    )
    gt = torch.tensor([[100.0, 100.0, 140.0, 200.0]])
    near = gt + torch.linspace(0, 5, 20)[:, None]
    far = torch.tensor([[0.0, 0.0, 20.0, 40.0]]) + torch.linspace(0, 30, 20)[:, None]
    sampled = sampler(torch.cat((near, far)), gt, torch.Generator().manual_seed(0))
    assert (sampled.matched_gt >= 0).sum() == 2 and (sampled.matched_gt == NEGATIVE).sum() == 6
    assert len(sampled.boxes) == 8


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="num_samples"):
        sample_balanced(MATCHES, 0, 0.5)
