"""Small LEAPS models and batches, fast enough for CPU tests."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from models.leaps import Leaps, LeapsConfig


def tiny_config(**sections: dict[str, Any]) -> LeapsConfig:
    """A narrow LEAPS (ResNet-18 at base width 8, 3 stages, 6 proposals); `sections` override
    fields of the config's sections, e.g. ``reid={"roi_align": "plain"}``."""
    data: dict[str, Any] = {
        "backbone": {"name": "resnet18", "base_width": 8, "frozen_stages": 0},
        "fpn": {"channels": 16, "in_stages": ["res3", "res4", "res5"]},
        "detection": {
            "num_stages": 3,
            "num_proposals": 6,
            "hidden_dim": 16,
            "feedforward_dim": 32,
            "num_heads": 2,
            "dynamic_dim": 4,
            "roi_size": 3,
        },
        "reid": {"feature_dim": 8, "num_heads": 2, "dynamic_dim": 4, "roi_size": 3},
        "reid_loss": {"num_labeled": 5, "queue_size": 4},
    }
    for section, fields in sections.items():
        data[section] = {**data.get(section, {}), **fields}
    return LeapsConfig.model_validate(data)


def tiny_model(**sections: dict[str, Any]) -> Leaps:
    torch.manual_seed(0)
    return Leaps(tiny_config(**sections))


def tiny_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 64x96 images: one with a labeled and an unlabeled person, one without persons."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    targets = [
        {
            "boxes": torch.tensor([[8.0, 4.0, 30.0, 60.0], [50.0, 10.0, 80.0, 62.0]]),
            "pids": torch.tensor([2, -1]),
        },
        {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)},
    ]
    return images, targets


@pytest.fixture
def make_config() -> Callable[..., LeapsConfig]:
    return tiny_config


@pytest.fixture
def make_model() -> Callable[..., Leaps]:
    return tiny_model


@pytest.fixture
def batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return tiny_batch()
