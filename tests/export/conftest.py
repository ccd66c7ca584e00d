"""Tiny exported models, built once per test session (exporting is the slow part).

Every model family gets a training run folder written by the trainer's own checkpoint code, with
random initial weights moved by a deterministic perturbation: detection scores then differ from
location to location (at initialisation every location has the prior probability), deformable
offsets and dynamic-RoIAlign offsets are non-zero (they start at zero), and every score clears
the score threshold. The folder is exported with the ``psearch-export`` command line.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from export import cli
from training.checkpoint import save_checkpoint
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIGS = {
    "alignps": ROOT / "configs/tiny/alignps_synthetic.yaml",
    "fcos": ROOT / "configs/tiny/lla_fcos_synthetic.yaml",
    "leaps": ROOT / "configs/tiny/leaps_synthetic.yaml",
    "seqnet": ROOT / "configs/tiny/seqnet_synthetic.yaml",
    "psarm": ROOT / "configs/tiny/psarm_synthetic.yaml",
}


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """The model with every parameter moved by 10% of its spread (at least 0.002) of seeded
    Gaussian noise, and class-logit biases at 0 (probability 0.5, far above any threshold)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "logit" in name and name.endswith("bias"):
                parameter.zero_()
            spread = parameter.std().item() if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * 0.1 * max(spread, 0.02))
    return model.eval()


def tiny_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return perturbed(models.build_model(load_config(TINY_CONFIGS[family]).model))


@dataclass
class Exported:
    """A run folder, the model folder psearch-export wrote from it, what it printed, its exit
    status, and the PyTorch model it holds."""

    run_dir: Path
    model_dir: Path
    exit_code: int
    printed: str
    model: nn.Module


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(family) -> Exported``, each family exported once per session."""
    cache: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            model = tiny_model(family)
            run_dir, model_dir = folder / "run", folder / "model"
            save_checkpoint(run_dir, model, load_config(TINY_CONFIGS[family]), {"iteration": 3})
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exit_code = cli.main(["--checkpoint", str(run_dir), "--out", str(model_dir)])
            cache[family] = Exported(run_dir, model_dir, exit_code, printed.getvalue(), model)
        return cache[family]

    return get
