"""The FPN keeps each input's resolution, adds P6/P7 at strides 64/128, and mixes top-down."""

import pytest
import torch

from models.necks.fpn import FPN, FPNConfig, level_name

CHANNELS = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _features(height: int = 64, width: int = 96) -> dict[str, torch.Tensor]:
    return {
        s: torch.randn(2, c, -(-height // STRIDES[s]), -(-width // STRIDES[s]))
        for s, c in CHANNELS.items()
    }


def test_levels_are_named_by_stride_and_keep_resolution():
    fpn = FPN(CHANNELS, STRIDES, FPNConfig(channels=12, in_stages=("res3", "res4", "res5")))
    feats = _features()
    out = fpn(feats)
    assert list(out) == ["p3", "p4", "p5"]
    assert fpn.strides == {"p3": 8, "p4": 16, "p5": 32}
    for stage, level in zip(("res3", "res4", "res5"), out, strict=True):
        assert out[level].shape == (2, 12, *feats[stage].shape[-2:])


def test_extra_levels_halve_resolution_each_time():
    cfg = FPNConfig(channels=12, in_stages=("res3", "res4", "res5"), extra_levels=2)
    out = FPN(CHANNELS, STRIDES, cfg)(_features(height=100, width=132))  # odd sizes on the way
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert out["p6"].shape[-2:] == (2, 3) and out["p7"].shape[-2:] == (1, 2)


def test_top_down_path_carries_coarse_information_to_fine_levels():
    fpn = FPN(CHANNELS, STRIDES, FPNConfig(channels=12))
    feats = _features()
    base = fpn(feats)["p2"]
    feats["res5"] = feats["res5"] + 1.0  # only the coarsest input changes
    assert not torch.allclose(fpn(feats)["p2"], base)


def test_missing_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="res2"):
        FPN({"res5": 64}, {"res5": 32}, FPNConfig())


def test_level_name():
    assert level_name(8) == "p3" and level_name(128) == "p7"
