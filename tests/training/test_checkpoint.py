"""Run folder files: weights with buffers and metadata, random streams, consistency checks."""

import json
import random

import numpy as np
import pytest
import torch
from pydantic import Field
from safetensors import safe_open
from torch import nn

from models.config import StrictModel
from training.checkpoint import (
    CheckpointError,
    load_state,
    load_weights,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from training.config import TrainConfig


class TinyConfig(StrictModel):
    width: int = Field(3, description="Output features.")


class Tiny(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.config = TinyConfig(width=width)
        self.linear = nn.Linear(2, width)
        self.register_buffer("table", torch.zeros(4, width))


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_random_streams_resume_where_they_were_saved():
    saved = rng_state()
    expected = draws()
    draws()  # move every generator on
    set_rng_state(saved)
    assert draws() == expected


def test_weights_hold_buffers_and_the_models_config(tmp_path):
    model = Tiny(width=5)
    model.table.fill_(7.0)
    save_weights(model, tmp_path / "model.safetensors", iteration=12)
    restored = Tiny(width=5)
    load_weights(restored, tmp_path / "model.safetensors")
    assert torch.equal(restored.table, torch.full((4, 5), 7.0))
    assert torch.equal(restored.linear.weight, model.linear.weight)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["model_config"]) == {"width": 5}
    assert metadata["iteration"] == "12"


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_weights(Tiny(width=5), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not fit the model: size mismatch for"):
        load_weights(Tiny(width=3), tmp_path / "model.safetensors")

    class Renamed(Tiny):
        def __init__(self):
            super().__init__(width=5)
            self.extra = nn.Linear(1, 1)

    with pytest.raises(CheckpointError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        load_weights(Renamed(), tmp_path / "model.safetensors")


def test_weights_and_state_from_different_moments_are_refused(tmp_path):
    save_checkpoint(tmp_path, Tiny(), TrainConfig(), {"iteration": 4, "epoch": 1})
    assert load_state(tmp_path)["epoch"] == 1
    # A crash between the two renames of a later checkpoint leaves newer weights behind.
    save_weights(Tiny(), tmp_path / "model.safetensors", iteration=8)
    with pytest.raises(CheckpointError, match=r"iteration 8.*iteration 4"):
        load_state(tmp_path)


def test_writes_leave_no_temporary_files_behind(tmp_path):
    save_checkpoint(tmp_path, Tiny(), TrainConfig(), {"iteration": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "state.pt",
    ]
