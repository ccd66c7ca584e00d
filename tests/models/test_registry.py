"""`models.build_model` builds every method from its config's `name` and refuses unknown names."""

import pytest
import yaml

from models import MODELS, UnknownModelError, build_model
from models.alignps import AlignPS
from models.fcos_detector import FCOSDetector
from models.leaps import Leaps
from models.psarm import PSARM
from models.seqnet import SeqNet


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("configs/tiny/alignps_synthetic.yaml", AlignPS),
        ("configs/tiny/leaps_synthetic.yaml", Leaps),
        ("configs/tiny/lla_fcos_synthetic.yaml", FCOSDetector),
        ("configs/tiny/seqnet_synthetic.yaml", SeqNet),
        ("configs/tiny/psarm_synthetic.yaml", PSARM),
    ],
)
def test_a_config_builds_the_class_its_name_selects(config, expected):
    with open(config) as f:
        model = build_model(yaml.safe_load(f)["model"])
    assert type(model) is expected
    assert model.config.name in MODELS


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(
        UnknownModelError, match="known models: alignps, fcos, leaps, psarm, seqnet"
    ):
        build_model({"name": "fasterrcnn"})


def test_a_config_object_builds_like_its_mapping():
    config_class, model_class = MODELS["fcos"]
    model = build_model(config_class(backbone={"name": "resnet18", "base_width": 8}))
    assert isinstance(model, model_class)
