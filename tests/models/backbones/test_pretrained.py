"""Loading torchvision-layout ResNet weights: by name, strictly, with messages that explain."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.backbones import ResNet, describe_resnet_state_dict, load_pretrained

IMAGES_SHAPE = (1, 3, 64, 64)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _clone_state(model: ResNet) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_every_tensor_of_a_torchvision_layout_file_lands_under_its_name(
    tmp_path, torchvision_state_dict, norm
):
    state = torchvision_state_dict(18, base_width=8)
    model = ResNet(18, base_width=8, norm=norm)

    load_pretrained(model, _save(state, tmp_path / "resnet18.pth"))

    loaded = model.state_dict()
    # fc is ignored; frozen batch norm has no num_batches_tracked to fill.
    assert len(loaded) == (120 if norm == "bn" else 120 - 20)  # 122 keys, 20 BatchNorms
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_round_trip_through_a_file_with_fc_gives_identical_outputs(tmp_path, suffix):
    source = ResNet(50, base_width=8, norm="bn", frozen_stages=0)
    source.train()
    for _ in range(3):  # move the running statistics away from their initial 0 and 1
        source(torch.randn(4, 3, 64, 64))
    source.eval()
    file_state = {
        **source.state_dict(),
        "fc.weight": torch.randn(1000, 256),
        "fc.bias": torch.randn(1000),
    }
    path = _save(file_state, tmp_path / f"weights{suffix}")
    same_norm = ResNet(50, base_width=8, norm="bn").eval()
    frozen_norm = ResNet(50, base_width=8).eval()

    same_norm.load_pretrained(path)
    load_pretrained(frozen_norm, path)

    images = torch.randn(IMAGES_SHAPE)
    expected = source(images)
    for name, feature in same_norm(images).items():
        assert torch.equal(feature, expected[name])
    for name, feature in frozen_norm(images).items():
        # The same affine map, folded into one multiply-add: equal up to rounding.
        torch.testing.assert_close(feature, expected[name])


def test_a_file_without_num_batches_tracked_loads_into_batch_norm(tmp_path, torchvision_state_dict):
    # Early torchvision weight files predate num_batches_tracked.
    state = torchvision_state_dict(18, base_width=8)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = ResNet(18, base_width=8, norm="bn")

    load_pretrained(model, _save(state, tmp_path / "old.pth"))

    assert torch.equal(
        model.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"]
    )


def test_deformable_convs_keep_zero_offsets_when_the_file_has_none(
    tmp_path, torchvision_state_dict
):
    state = torchvision_state_dict(50, base_width=8)
    model = ResNet(50, base_width=8, dcn_stages=("res3", "res4", "res5"))

    load_pretrained(model, _save(state, tmp_path / "resnet50.pth"))

    assert torch.equal(model.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    offset_conv = model.layer3[2].conv2.conv_offset
    assert not offset_conv.weight.any()
    assert not offset_conv.bias.any()


def test_a_missing_key_is_named_and_nothing_is_loaded(tmp_path, torchvision_state_dict):
    state = torchvision_state_dict(18, base_width=8)
    del state["layer2.1.conv1.weight"]
    model = ResNet(18, base_width=8)
    before = _clone_state(model)

    with pytest.raises(ValueError, match=re.escape("missing keys (1): layer2.1.conv1.weight")):
        load_pretrained(model, _save(state, tmp_path / "partial.pth"))

    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_an_unexpected_key_is_named(tmp_path, torchvision_state_dict):
    state = torchvision_state_dict(18, base_width=8)
    state["layer1.0.se.fc.weight"] = torch.zeros(2, 8)

    with pytest.raises(ValueError, match=re.escape("unexpected keys (1): layer1.0.se.fc.weight")):
        load_pretrained(ResNet(18, base_width=8), _save(state, tmp_path / "extra.pth"))


def test_a_resnet18_file_into_a_resnet50_says_what_each_looks_like(
    tmp_path, torchvision_state_dict
):
    path = _save(torchvision_state_dict(18, base_width=64), tmp_path / "resnet18.pth")

    with pytest.raises(ValueError) as error:
        load_pretrained(ResNet(50, base_width=64), path)

    message = str(error.value)
    assert "looks like resnet18 (BasicBlock, blocks [2, 2, 2, 2], base_width 64)" in message
    assert "the model is resnet50 (Bottleneck, blocks [3, 4, 6, 3], base_width 64)" in message
    assert "missing keys" in message
    assert "layer1.0.conv3.weight" in message
    assert "shape mismatches" in message


def test_a_base_width_mismatch_reports_the_shapes(tmp_path, torchvision_state_dict):
    path = _save(torchvision_state_dict(18, base_width=16), tmp_path / "wide.pth")

    with pytest.raises(ValueError) as error:
        load_pretrained(ResNet(18, base_width=8), path)

    message = str(error.value)
    assert "base_width 16" in message
    assert "base_width 8" in message
    assert "conv1.weight: file (16, 3, 7, 7), model (8, 3, 7, 7)" in message
    # Every tensor's shape scales with the width: 20 convs + 20 frozen norms x 4 buffers = 100
    # mismatches, of which the first 8 are listed.
    assert "shape mismatches (100)" in message
    assert "and 92 more" in message


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights not found: .*nowhere\.pth"):
        load_pretrained(ResNet(18, base_width=8), tmp_path / "nowhere.pth")


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a pickle")

    with pytest.raises(ValueError, match=r"cannot read .*garbage\.pth as a state dict"):
        load_pretrained(ResNet(18, base_width=8), path)


def test_a_training_checkpoint_is_refused_with_its_top_level_keys(tmp_path, torchvision_state_dict):
    checkpoint = {"epoch": 3, "state_dict": torchvision_state_dict(18, base_width=8)}
    path = _save(checkpoint, tmp_path / "checkpoint.pth")

    with pytest.raises(ValueError, match=r"not hold a flat state dict .*\['epoch', 'state_dict'\]"):
        load_pretrained(ResNet(18, base_width=8), path)


def test_describe_recognises_the_deeper_torchvision_resnets():
    # Only the keys that identify the architecture: ResNet-101 has 3, 4, 23, 3 bottlenecks.
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv3.weight": torch.zeros(1)}
    for stage, num_blocks in enumerate((3, 4, 23, 3), start=1):
        for index in range(num_blocks):
            state[f"layer{stage}.{index}.conv1.weight"] = torch.zeros(1)

    description = describe_resnet_state_dict(state)

    assert description == "resnet101 (Bottleneck, blocks [3, 4, 23, 3], base_width 64)"
    assert describe_resnet_state_dict({"weight": torch.zeros(1)}).startswith("not a torchvision")
