"""Every LEAPS config file loads through the training config, builds, and runs: the paper's
settings at a reduced input size (inference on 2 x 3 x 128 x 160 fed directly, a training
forward on one 64 x 96 image), so that they cannot rot."""

from pathlib import Path

import pytest
import torch

from models.leaps import Leaps, LeapsConfig
from training.config import load_config

CONFIGS = Path(__file__).parents[3] / "configs"
PAPER_CONFIGS = ["leaps_r50_cuhk.yaml", "leaps_r50_prw.yaml"]


def _model(path: Path) -> Leaps:
    config = load_config(path)
    torch.manual_seed(0)
    return Leaps(config.model)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_has_the_paper_settings(name):
    config = load_config(CONFIGS / name)
    model = LeapsConfig.model_validate(config.model)
    # Sec. 4.1, Tables 3, 5, 6, 7: R50, N = 100, six stages, re-id heads on the last two.
    assert model.backbone.name == "resnet50"
    assert (model.detection.num_proposals, model.detection.num_stages) == (100, 6)
    assert model.reid.stages == 2 and model.reid.branches == ("prm", "hirm")
    assert model.reid.roi_align == "dynamic" and model.embedding_dim == 512
    assert model.reid_loss.drsm and model.reid_loss.drsm_weighting and model.reid_loss.diversity
    assert (model.preprocess.min_size, model.preprocess.max_size) == (900, 1500)
    # Sec. 4.1: AdamW, lr 3e-5, weight decay 1e-4, 36 epochs, steps at 24 and 33, batch 2.
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == (
        "adamw",
        3e-5,
        1e-4,
    )
    assert (config.schedule.epochs, config.schedule.milestones) == (36, [24, 33])
    assert config.data.batch_size == 2 and config.data.multiscale.mode == "range"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_and_runs_at_reduced_size(name):
    model = _model(CONFIGS / name)
    # One training image with a labeled person (smaller still: six full-width stages are slow).
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 60.0]]), "pids": torch.tensor([0])}
    with torch.no_grad():
        losses = model.train()(torch.randn(1, 3, 64, 96), [target])
        detections = model.eval()(torch.randn(2, 3, 128, 160))
    assert all(torch.isfinite(value) for value in losses.values())
    assert {"loss_oim", "loss_div_s6"} <= set(losses) and "loss_div_s4" not in losses
    assert detections.boxes.shape == (2, 100, 4)
    assert detections.embeddings.shape == (2, 100, 512)


def test_tiny_config_builds_and_detects_at_its_own_size():
    config = load_config(CONFIGS / "tiny" / "leaps_synthetic.yaml")
    assert config.data.dataset == "prw" and config.device == "cpu"
    model = _model(CONFIGS / "tiny" / "leaps_synthetic.yaml").eval()
    size = model.preprocess.min_size, model.preprocess.max_size
    with torch.no_grad():
        detections = model(torch.randn(1, 3, *size))
    num = model.config.detection.num_proposals
    assert detections.scores.shape == (1, num)
