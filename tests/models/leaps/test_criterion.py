"""The detection losses of one LEAPS stage on hand-built matches."""

import pytest
import torch

from models.leaps.config import DetectionConfig
from models.leaps.criterion import detection_losses
from models.leaps.detection_head import StageOutput
from models.leaps.matcher import Match


def test_the_l1_loss_divides_each_box_by_its_own_images_size():
    """Two images padded into one batch: a 100 x 200 one (height x width) and a 50 x 50 one.
    Each has one person, predicted 10 pixels too far left: L1 = 10 / 200 + 10 / 50 = 0.25,
    times l1_weight 5, over 2 persons."""
    targets = [
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 90.0]]), "pids": torch.tensor([0])},
        {"boxes": torch.tensor([[20.0, 5.0, 40.0, 45.0]]), "pids": torch.tensor([1])},
    ]
    shift = torch.tensor([10.0, 0.0, 0.0, 0.0])
    predicted = torch.stack([targets[0]["boxes"][0] - shift, targets[1]["boxes"][0] - shift])
    output = StageOutput(torch.zeros(2, 1), predicted[:, None, :], torch.zeros(2, 1, 8))
    first = torch.tensor([0])
    matches = [Match(first, first), Match(first, first)]

    losses = detection_losses(
        output, targets, matches, torch.tensor([[100, 200], [50, 50]]), DetectionConfig()
    )

    assert losses["loss_l1"].item() == pytest.approx(5.0 * (10 / 200 + 10 / 50) / 2)
