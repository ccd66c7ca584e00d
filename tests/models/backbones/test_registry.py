"""Backbones by name, as configs refer to them."""

import pytest
import torch

from models.backbones import BACKBONES, ResNet, build_backbone


@pytest.mark.parametrize(("name", "depth"), [("resnet18", 18), ("resnet34", 34), ("resnet50", 50)])
def test_each_name_builds_its_depth_with_the_given_options(name, depth):
    backbone = build_backbone(name, base_width=8, out_stages=("res4",), frozen_stages=0)

    assert isinstance(backbone, ResNet)
    assert backbone.depth == depth
    assert backbone.out_stages == ("res4",)
    assert backbone.frozen_stages == 0
    assert sorted(BACKBONES) == ["resnet18", "resnet34", "resnet50"]


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet152'; available: \['resnet18'"):
        build_backbone("resnet152")


def test_the_name_fixes_the_depth():
    with pytest.raises(TypeError, match="depth"):
        build_backbone("resnet18", depth=50)


def test_pretrained_weights_are_loaded_from_the_given_file(tmp_path, torchvision_state_dict):
    state = torchvision_state_dict(34, base_width=8)
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)

    backbone = build_backbone("resnet34", base_width=8, pretrained=path)

    assert torch.equal(backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
