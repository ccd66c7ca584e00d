"""ResNet backbones: torchvision's layout, feature shapes, frozen stages, deformable stages."""

import pytest
import torch
from torch import nn

from models.backbones import FrozenBatchNorm2d, ResNet
from models.ops.deform_conv import DeformConvPack

# Input 64 x 96: the strides 4, 8, 16, 32 give 16 x 24, 8 x 12, 4 x 6 and 2 x 3 feature maps.
IMAGES_SHAPE = (2, 3, 64, 96)
SPATIAL = {"res2": (16, 24), "res3": (8, 12), "res4": (4, 6), "res5": (2, 3)}
# Output channels of res2..res5: BasicBlock stages have w, 2w, 4w, 8w channels (w = base_width),
# Bottleneck stages four times that.
CHANNELS = {
    (18, 8): (8, 16, 32, 64),
    (34, 16): (16, 32, 64, 128),
    (50, 8): (32, 64, 128, 256),
    (50, 16): (64, 128, 256, 512),
}


@pytest.mark.parametrize(
    ("depth", "expected_num_keys"),
    # resnet18: stem 1 conv + 1 BN (5 entries) = 6; 8 blocks x (2 convs + 2 BNs) = 96;
    #   downsample in layer2-4: 3 x (1 + 5) = 18; fc 2. Total 122.
    # resnet34: 6 + 16 blocks x 12 = 192 + 18 + 2 = 218.
    # resnet50: 6 + 16 blocks x (3 convs + 3 BNs = 18) = 288; downsample in all four stages
    #   (layer1 widens 64 -> 256): 4 x 6 = 24; fc 2. Total 320.
    [(18, 122), (34, 218), (50, 320)],
)
def test_state_dict_has_torchvision_keys_and_shapes_at_full_width(
    torchvision_layout, depth, expected_num_keys
):
    expected = torchvision_layout(depth)
    assert len(expected) == expected_num_keys
    expected_without_fc = {k: v for k, v in expected.items() if not k.startswith("fc.")}

    state = ResNet(depth, norm="bn").state_dict()

    assert list(state) == list(expected_without_fc)
    assert {key: tuple(value.shape) for key, value in state.items()} == expected_without_fc


def test_frozen_batch_norm_has_the_same_keys_except_num_batches_tracked(torchvision_layout):
    expected = [
        key
        for key in torchvision_layout(50, base_width=8)
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    ]
    model = ResNet(50, base_width=8)  # frozen_bn is the default

    assert list(model.state_dict()) == expected
    # Stem 1 + 16 blocks x 3 + 4 downsample projections = 53 norm layers, all frozen.
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 53
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_bottleneck_strides_in_its_3x3_conv_like_torchvision_v1_5():
    block = ResNet(50, base_width=8).layer2[0]

    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize(("depth", "base_width"), list(CHANNELS))
def test_features_have_the_stage_strides_and_channels(depth, base_width):
    model = ResNet(depth, base_width=base_width).eval()

    features = model(torch.randn(IMAGES_SHAPE))

    expected_channels = dict(zip(SPATIAL, CHANNELS[depth, base_width], strict=True))
    assert list(features) == ["res2", "res3", "res4", "res5"]
    for name, feature in features.items():
        assert feature.shape == (2, expected_channels[name], *SPATIAL[name])
    assert model.out_channels == expected_channels
    assert model.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_out_stages_are_returned_in_network_order_whatever_order_they_are_given():
    model = ResNet(18, base_width=8, out_stages=("res5", "res3")).eval()

    features = model(torch.randn(IMAGES_SHAPE))

    assert list(features) == ["res3", "res5"]
    assert model.out_channels == {"res3": 16, "res5": 64}
    assert model.strides == {"res3": 8, "res5": 32}


def test_forward_stops_after_the_deepest_requested_stage():
    model = ResNet(18, base_width=8, out_stages=("res3",)).eval()
    ran = []
    model.layer3.register_forward_hook(lambda *_: ran.append("res4"))
    model.layer4.register_forward_hook(lambda *_: ran.append("res5"))

    features = model(torch.randn(IMAGES_SHAPE))

    assert list(features) == ["res3"]
    assert ran == []


def test_stage_names_map_to_torchvision_layers():
    model = ResNet(18, base_width=8)

    assert model.stage("res2") is model.layer1
    assert model.stage("res5") is model.layer4
    with pytest.raises(ValueError, match="unknown stage 'res6'"):
        model.stage("res6")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depth": 101}, "unsupported ResNet depth 101"),
        ({"out_stages": ()}, "out_stages is empty"),
        ({"out_stages": ("res1",)}, r"unknown out_stages \['res1'\]"),
        ({"out_stages": "res4"}, "must be a sequence of stage names"),
        ({"out_stages": ("res3", "res3")}, "lists a stage twice"),
        ({"dcn_stages": ("res6",)}, r"unknown dcn_stages \['res6'\]"),
        ({"frozen_stages": 5}, "frozen_stages must be an int from 0"),
        ({"frozen_stages": -1}, "frozen_stages must be an int from 0"),
        ({"norm": "gn"}, "unknown norm 'gn'"),
        ({"dcn_modulated": True}, "dcn_modulated=True has no effect without dcn_stages"),
        ({"base_width": 0}, "base_width must be a positive int"),
    ],
)
def test_invalid_options_are_rejected_with_a_message(options, message):
    options = {"depth": 18, **options}
    with pytest.raises(ValueError, match=message):
        ResNet(**options)


def test_images_that_are_not_a_batch_of_rgb_images_are_rejected():
    model = ResNet(18, base_width=8)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


# Modules frozen by each value of frozen_stages: the stem, then res2, res3, ...
FROZEN_PREFIXES = {
    0: (),
    1: ("conv1.", "bn1.", "layer1."),
    2: ("conv1.", "bn1.", "layer1.", "layer2."),
    4: ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."),
}


@pytest.mark.parametrize("frozen_stages", list(FROZEN_PREFIXES))
def test_frozen_stages_have_no_gradient_and_the_others_do(frozen_stages):
    model = ResNet(18, base_width=8, norm="bn", frozen_stages=frozen_stages)
    frozen = FROZEN_PREFIXES[frozen_stages]

    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (not name.startswith(frozen)), name


def test_frozen_stages_stay_in_eval_mode_and_keep_their_statistics_after_train():
    model = ResNet(18, base_width=8, norm="bn", frozen_stages=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}

    model(torch.randn(IMAGES_SHAPE))

    frozen = FROZEN_PREFIXES[2]
    for name, module in model.named_modules():
        if name:
            assert module.training == (not f"{name}.".startswith(frozen)), name
    for key, value in model.state_dict().items():
        if "running_mean" in key:
            # A BatchNorm in train mode moves its running mean towards the batch mean.
            assert torch.equal(value, before[key]) == key.startswith(frozen), key


def test_gradients_reach_every_unfrozen_stage_and_no_frozen_one():
    model = ResNet(50, base_width=8, frozen_stages=1, dcn_stages=("res4",)).train()

    features = model(torch.randn(IMAGES_SHAPE))
    sum(feature.square().mean() for feature in features.values()).backward()

    for name, parameter in model.named_parameters():
        if name.startswith(FROZEN_PREFIXES[1]):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
    assert model.layer3[0].conv2.conv_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("depth", "deformable_convs_per_block"),
    # A Bottleneck has one 3x3 conv (conv2); a BasicBlock has two (conv1, conv2).
    [(50, ("conv2",)), (18, ("conv1", "conv2"))],
)
def test_dcn_stages_have_deformable_3x3_convs_and_the_other_stages_plain_ones(
    depth, deformable_convs_per_block
):
    model = ResNet(depth, base_width=8, dcn_stages=("res3", "res4", "res5"))

    for stage_name, layer in model.named_children():
        if not stage_name.startswith("layer"):
            continue
        for block in layer:
            for conv_name, conv in block.named_children():
                if not conv_name.startswith("conv"):
                    continue
                deformable = stage_name != "layer1" and conv_name in deformable_convs_per_block
                assert isinstance(conv, DeformConvPack) == deformable, (stage_name, conv_name)
                assert conv.bias is None


def test_dcn_state_dict_is_the_plain_one_plus_offset_convs():
    plain = ResNet(50, base_width=8).state_dict()
    deformable = ResNet(50, base_width=8, dcn_stages=("res5",)).state_dict()

    # res5 has 3 blocks, each with one deformable conv: 3 x (weight, bias) offset parameters.
    offset_keys = [
        f"layer4.{i}.conv2.conv_offset.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    assert sorted(deformable) == sorted([*plain, *offset_keys])
    # 2 offsets (dy, dx) per tap of the 3x3 kernel: 18 channels, predicted from the block's width.
    assert deformable["layer4.0.conv2.conv_offset.weight"].shape == (18, 64, 3, 3)


# The DCN comparisons run in float64, so that summation order cannot hide a real difference.


def test_a_dcn_backbone_at_init_equals_the_plain_backbone_with_the_same_weights():
    # Zero offsets sample the regular 3x3 grid: a deformable conv then is a plain conv.
    plain = ResNet(50, base_width=8).double().eval()
    deformable = ResNet(50, base_width=8, dcn_stages=("res3", "res4", "res5")).double().eval()
    deformable.load_state_dict(plain.state_dict(), strict=False)  # offsets keep their zero init
    images = torch.randn(IMAGES_SHAPE, dtype=torch.float64)

    expected, actual = plain(images), deformable(images)

    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])


def test_a_modulated_dcn_backbone_at_init_equals_the_plain_one_with_halved_3x3_weights():
    # DCNv2 starts with mask sigmoid(0) = 0.5 on every tap: a plain conv with half the weight.
    deformable = ResNet(18, base_width=8, dcn_stages=("res4",), dcn_modulated=True)
    deformable = deformable.double().eval()
    plain = ResNet(18, base_width=8).double().eval()
    state = {k: v for k, v in deformable.state_dict().items() if "conv_offset" not in k}
    for block in ("0", "1"):
        for conv in ("conv1", "conv2"):
            state[f"layer3.{block}.{conv}.weight"] = state[f"layer3.{block}.{conv}.weight"] / 2
    plain.load_state_dict(state)
    images = torch.randn(IMAGES_SHAPE, dtype=torch.float64)

    expected, actual = plain(images), deformable(images)

    assert deformable.layer3[0].conv1.modulated
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])


def test_a_frozen_stem_alone_freezes_conv1_and_bn1_only():
    """SeqNet's backbone: frozen_stages 0 with the stem frozen."""
    model = ResNet(18, base_width=8, norm="bn", frozen_stages=0, frozen_stem=True).train()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (not name.startswith(("conv1.", "bn1."))), name
    assert not model.bn1.training and model.layer1.training


def test_a_deeper_stage_can_be_taken_out_with_its_weights():
    """A C4 detector's RoI head takes res5: the backbone keeps an empty stage, so the weights
    live in one place, and the stage channels of every stage stay known."""
    model = ResNet(18, base_width=8, out_stages=("res4",))
    weight = model.layer4[0].conv1.weight
    res5 = model.take_stage("res5")
    assert res5[0].conv1.weight is weight
    assert len(model.stage("res5")) == 0 and not any("layer4" in k for k in model.state_dict())
    assert model.stage_channels["res5"] == 64 and list(model(torch.randn(IMAGES_SHAPE))) == ["res4"]
    with pytest.raises(ValueError, match="only a deeper stage"):
        model.take_stage("res4")
