"""The AFA neck of AlignPS: one stride-8 map, deformable laterals and output, concatenation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.necks.afa import AFA, AFAConfig
from models.ops.deform_conv import DeformConvPack

IN_CHANNELS = {"res3": 8, "res4": 12, "res5": 16}
IN_STRIDES = {"res3": 8, "res4": 16, "res5": 32}


def _afa(**options: object) -> AFA:
    torch.manual_seed(0)
    return AFA(IN_CHANNELS, IN_STRIDES, AFAConfig(channels=4, **options))


def _features(height: int = 8, width: int = 10) -> dict[str, torch.Tensor]:
    # Each coarser stage is half the size of the finer one, rounded up (as a ResNet's).
    sizes = {"res3": (height, width)}
    sizes["res4"] = (-(-height // 2), -(-width // 2))
    sizes["res5"] = (-(-sizes["res4"][0] // 2), -(-sizes["res4"][1] // 2))
    return {s: torch.randn(2, c, *sizes[s]) for s, c in IN_CHANNELS.items()}


def _pick_channel(conv: nn.Conv2d, channel: int) -> None:
    """Make a 3x3 conv copy input channel ``channel + i`` to output channel i (centre tap)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(conv.out_channels):
            conv.weight[i, channel + i, 1, 1] = 1.0


@pytest.mark.parametrize("size", [(8, 10), (7, 9)])
def test_output_is_one_map_at_the_finest_stride(size):
    afa = _afa()
    out = afa(_features(*size))
    assert out.shape == (2, 4, *size)
    assert afa.stride == 8 and afa.out_channels == 4


def test_default_is_the_paper_design_deformable_laterals_and_output_over_a_concatenation():
    afa = _afa()
    assert all(isinstance(conv, DeformConvPack) for conv in afa.lateral)
    assert [conv.kernel_size for conv in afa.lateral] == [(3, 3)] * 3
    assert isinstance(afa.output, DeformConvPack) and afa.output.kernel_size == (3, 3)
    # The stride-8 map concatenates three laterals of 4 channels; the output conv reduces them.
    assert (afa.output.in_channels, afa.output.out_channels) == (12, 4)


def test_lateral_switch_gives_fpn_1x1_convs():
    afa = _afa(lateral_dconv=False)
    for conv in afa.lateral:
        assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
    assert isinstance(afa.output, DeformConvPack)


def test_output_switch_gives_a_plain_3x3_conv():
    afa = _afa(output_dconv=False)
    assert type(afa.output) is nn.Conv2d and afa.output.kernel_size == (3, 3)
    assert afa.output.in_channels == 12
    assert all(isinstance(conv, DeformConvPack) for conv in afa.lateral)


def test_sum_fusion_keeps_the_width_of_one_lateral():
    afa = _afa(fusion="sum")
    assert afa.output.in_channels == 4


def test_concat_fusion_keeps_each_level_in_its_own_channels():
    # With an output conv that copies channels 8-11, the output is P5's lateral alone,
    # upsampled by nearest neighbour from stride 32 to stride 8 (each value repeated 4 x 4).
    afa = _afa(output_dconv=False)
    _pick_channel(afa.output, channel=8)
    features = _features(8, 12)
    with torch.no_grad():
        p5_lateral = afa.lateral[2](features["res5"])  # (2, 4, 2, 3)
        expected = p5_lateral.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
        assert torch.equal(afa(features), expected)


def test_sum_fusion_adds_the_upsampled_coarser_laterals():
    # With an identity output conv, the output is P3 + up(P4) + up(up(P5)) of the laterals.
    afa = _afa(output_dconv=False, fusion="sum")
    _pick_channel(afa.output, channel=0)
    features = _features(8, 12)
    with torch.no_grad():
        p3, p4, p5 = (conv(features[s]) for conv, s in zip(afa.lateral, IN_CHANNELS, strict=True))
        expected = p3 + F.interpolate(p4, scale_factor=2) + F.interpolate(p5, scale_factor=4)
        torch.testing.assert_close(afa(features), expected)


def test_gradients_reach_every_lateral_and_the_offset_predictors():
    afa = _afa()
    afa(_features()).square().sum().backward()
    for conv in [*afa.lateral, afa.output]:
        assert conv.weight.grad.abs().sum() > 0
        # The offsets start at zero but learn: their predictor receives a gradient.
        assert conv.conv_offset.weight.grad.abs().sum() > 0


def test_missing_backbone_stage_is_an_error():
    with pytest.raises(ValueError, match=r"res5"):
        AFA({"res3": 8, "res4": 12}, IN_STRIDES, AFAConfig())
