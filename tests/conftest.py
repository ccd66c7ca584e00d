"""Test-wide settings: reproducible and single-threaded per pytest-xdist worker."""

import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import settings

import models
from export import artifact

# Two xdist workers on a 2-core machine: one thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

torch.manual_seed(0)

# The same examples on every run: a red CI must be reproducible on a laptop. Explore new
# examples locally with `HYPOTHESIS_PROFILE=explore`.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


TINY_SEQNET = Path(__file__).parents[1] / "configs" / "tiny" / "seqnet_synthetic.yaml"


@pytest.fixture(scope="session")
def tiny_seqnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder (manifest + weights, what the torch backend loads) of the tiny SeqNet, a
    two-stage RoI model: random weights, every score above 0 kept (5 per image), at the size of
    128 x 96 test scenes."""
    config = yaml.safe_load(TINY_SEQNET.read_text())["model"]
    config["inference"].update(score_thresh=0.0, max_detections=5)
    config["preprocess"].update(min_size=96, max_size=128)
    torch.manual_seed(0)
    model = models.build_model(config).eval()
    manifest = artifact.build_manifest(model)
    folder = tmp_path_factory.mktemp("seqnet")
    artifact.write_weights(model, folder, manifest)
    artifact.write_model_manifest(manifest, folder)
    return folder


@pytest.fixture
def embedded_boxes(monkeypatch: pytest.MonkeyPatch) -> list[list[list[float]]]:
    """Every call of SeqNet.embed_boxes from here on, as the list of boxes it was given."""
    from models.seqnet import SeqNet

    calls: list[list[list[float]]] = []
    original = SeqNet.embed_boxes

    def recording(self, images, boxes, *, image_sizes=None):
        calls.append([box.tolist() for image_boxes in boxes for box in image_boxes])
        return original(self, images, boxes, image_sizes=image_sizes)

    monkeypatch.setattr(SeqNet, "embed_boxes", recording)
    return calls
