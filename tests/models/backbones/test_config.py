"""One backbone section for every model family: the same keys, defaults and validation."""

import pytest
from pydantic import ValidationError

from models.alignps import AlignPSConfig
from models.backbones import BackboneConfig
from models.fcos_detector import FCOSDetectorConfig
from models.leaps import LeapsConfig

FAMILIES = [AlignPSConfig, LeapsConfig, FCOSDetectorConfig]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.__name__)
def test_every_family_reads_its_backbone_section_as_the_shared_config(family):
    section = {"name": "resnet18", "dcn_stages": ["res5"], "dcn_modulated": True}
    assert family.model_validate({"backbone": section}).backbone == BackboneConfig(**section)
    assert family().backbone == BackboneConfig()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.__name__)
def test_unknown_backbone_keys_are_errors(family):
    with pytest.raises(ValidationError, match="depth"):
        family.model_validate({"backbone": {"depth": 50}})


def test_build_options_pass_dcn_options_only_with_dcn_stages():
    assert "dcn_stages" not in BackboneConfig().build_options(("res5",))
    options = BackboneConfig(dcn_stages=("res5",)).build_options(("res4", "res5"))
    assert options["dcn_stages"] == ("res5",) and options["out_stages"] == ("res4", "res5")
