"""PS-ARM: the relation mixer's shapes and parts, SimAM's parameter-free attention, the two token
layouts, the ablation switches, and the model around it (SeqNet with an ARM in both heads)."""

from pathlib import Path

import pytest
import torch

from models import build_model
from models.psarm import ARM, PSARM, ARMConfig, PSARMConfig, simam, to_maps, to_tokens
from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "tiny" / "psarm_synthetic.yaml"
PAPER_CONFIGS = ["psarm_r50_cuhk.yaml", "psarm_r50_prw.yaml"]


def _arm(**changes) -> ARM:
    torch.manual_seed(0)
    return ARM(64, (6, 6), ARMConfig(**changes)).eval()


def test_the_arm_keeps_the_roi_map_shape_and_works_on_c_over_4_channels():
    arm = _arm()
    maps = torch.randn(5, 64, 6, 6)
    assert arm(maps).shape == (5, 64, 6, 6)
    assert (arm.reduce.in_channels, arm.reduce.out_channels) == (64, 16)
    assert (arm.expand.in_channels, arm.expand.out_channels) == (16, 64)
    token_mlp, channel_mlp = arm.mixer[0].mlp, arm.mixer[1].mlp
    assert (token_mlp.fc1.in_features, token_mlp.fc1.out_features) == (36, 108)  # tokens, 3x
    assert (channel_mlp.fc1.in_features, channel_mlp.fc1.out_features) == (16, 48)  # channels


def test_simam_has_no_parameters_and_weighs_each_activation_by_its_energy():
    """On a 1 x 1 x 2 x 2 map (1, 2, 3, 6): mean 3, squared deviations (4, 1, 0, 9), their sum
    over n = 4 - 1 = 3 gives 14 / 3; energy e = d / (4 (14 / 3 + lambda)) + 0.5; the output is
    x * sigmoid(e). Outliers get larger weights."""
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    deviation = torch.tensor([4.0, 1.0, 0.0, 9.0])
    energy = deviation / (4 * (14 / 3 + 1e-4)) + 0.5
    expected = torch.tensor([1.0, 2.0, 3.0, 6.0]) * torch.sigmoid(energy)
    torch.testing.assert_close(simam(maps).flatten(), expected)
    arm = _arm(token_mixing=False, spatial_gate=False, channel_mixing=False, channel_gate=False)
    assert arm.mixer is None
    parameters = {name.split(".")[0] for name, _ in arm.named_parameters()}
    assert parameters == {"reduce", "expand"}  # the attention itself adds none


def test_with_only_simam_the_arm_is_reduce_simam_plus_identity_expand():
    arm = _arm(token_mixing=False, spatial_gate=False, channel_mixing=False, channel_gate=False)
    maps = torch.randn(3, 64, 6, 6)
    with torch.no_grad():
        reduced = arm.reduce(maps)
        expected = arm.expand(reduced + simam(reduced))
        torch.testing.assert_close(arm(maps), expected)


def test_the_paper_layout_round_trips_tokens_and_the_released_one_reinterprets_them():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    tokens = to_tokens(maps)  # (2, 4, 3): token (y, x) holds the 3 channels there
    assert tokens[0, 1].tolist() == maps[0, :, 0, 1].tolist()
    assert torch.equal(to_maps(tokens, 2, 2, "paper"), maps)
    released = to_maps(tokens, 2, 2, "released")
    # The released code's reshape reads the token tensor as it lies: the first "channel" map
    # holds token 0's 3 channels, then token 1's first one.
    assert released[0, 0].flatten().tolist() == [0.0, 4.0, 8.0, 1.0]
    assert not torch.equal(released, maps)


def test_the_two_layouts_give_different_arms_with_the_same_weights():
    paper, released = _arm(token_layout="paper"), _arm(token_layout="released")
    released.load_state_dict(paper.state_dict())
    maps = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(paper(maps), released(maps))


def test_in_the_paper_layout_the_mixer_output_stays_where_its_tokens_were():
    """Without mixing (only the spatial gate's re-weighting and SimAM, both per position),
    moving the input's content by one position moves the output alike; the released layout
    breaks that."""
    maps = torch.zeros(1, 64, 6, 6)
    maps[..., 2, 3] = torch.randn(64)
    shifted = torch.roll(maps, shifts=1, dims=-1)
    for layout, keeps_positions in (("paper", True), ("released", False)):
        arm = _arm(token_layout=layout, dropout=0.0)
        with torch.no_grad():
            for module in arm.mixer:
                module.mlp.fc2.weight.zero_()  # the MLPs add nothing
                module.mlp.fc2.bias.zero_()
            out, out_shifted = arm(maps), arm(shifted)
        moved = torch.roll(out - arm.expand.bias[:, None, None], 1, dims=-1)
        follows = torch.allclose(moved, out_shifted - arm.expand.bias[:, None, None], atol=1e-5)
        assert follows == keeps_positions, layout


@pytest.mark.parametrize(
    ("switches", "parts"),
    [
        ({"spatial_gate": False, "channel_gate": False, "simam": False}, (False, False, False)),
        ({"spatial_gate": False, "simam": False}, (False, True, False)),
        ({"channel_gate": False, "simam": False}, (True, False, False)),
        ({"simam": False}, (True, True, False)),
        ({}, (True, True, True)),
    ],
    ids=["mlp-mixer", "channel-attended", "spatially-attended", "relation-mixer", "ps-arm"],
)
def test_the_ablation_rows_switch_their_parts(switches, parts):
    """Table 2's rows: which gates exist and whether SimAM runs."""
    arm = _arm(**switches)
    spatial, channel, with_simam = parts
    assert (arm.mixer[0].gate is not None) == spatial
    assert (arm.mixer[1].gate is not None) == channel
    assert arm.config.simam == with_simam


def test_inconsistent_switches_are_refused():
    with pytest.raises(ValueError, match="needs token_mixing"):
        ARMConfig(token_mixing=False)
    with pytest.raises(ValueError, match="use SeqNet"):
        ARMConfig(
            token_mixing=False,
            spatial_gate=False,
            channel_mixing=False,
            channel_gate=False,
            simam=False,
        )


def test_psarm_puts_an_arm_in_both_heads_with_separate_weights():
    torch.manual_seed(0)
    model = build_model(load_config(TINY).model)
    assert isinstance(model, PSARM)
    box_arm, reid_arm = model.box_head.before_res5, model.reid_head.before_res5
    assert isinstance(box_arm, ARM) and isinstance(reid_arm, ARM) and box_arm is not reid_arm
    assert box_arm.roi_size == model.config.roi_pool.output_size == (8, 8)
    model.train()
    targets = [{"boxes": torch.tensor([[20.0, 16.0, 70.0, 150.0]]), "pids": torch.tensor([3])}]
    losses = model(torch.randn(1, 3, 192, 256), targets)
    sum(losses.values()).backward()
    for arm in (box_arm, reid_arm):
        assert all(p.grad is not None for p in arm.parameters())


def test_psarm_detects_and_embeds_boxes():
    torch.manual_seed(0)
    model = build_model(load_config(TINY, ["model.inference.score_thresh=0.0"]).model).eval()
    images = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        detections = model(images)
        embeddings = model.embed_boxes(images, [torch.tensor([[10.0, 10.0, 60.0, 150.0]])])
    assert detections.embeddings.shape == (1, 50, 64) and (detections.scores > 0).any()
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(1))


def test_paper_config_has_the_released_settings():
    config = load_config(CONFIGS / "psarm_r50_prw.yaml")
    model = PSARMConfig.model_validate(config.model)
    assert model.arm == ARMConfig()  # every part on, the released layout
    assert (model.arm.reduction, model.arm.expansion, model.arm.dropout) == (4, 3, 0.5)
    assert model.roi_pool.output_size == (14, 14)
    assert (config.data.batch_size, config.optim.lr) == (3, 0.003)
    assert (config.schedule.epochs, config.schedule.milestones) == (12, [8])
    assert config.eval.cbgm and config.eval.query_mode == "gt_box"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_and_runs_at_reduced_size(name):
    """ResNet-50 with its 1024 -> 256 channel ARM on 14 x 14 RoIs, on small inputs and with few
    RoIs (each runs res5)."""
    overrides = [
        "model.roi_sampler.num_samples=4",
        "model.rpn.train.post_nms_top_n=8",
        "model.rpn.test.post_nms_top_n=8",
        "model.inference.max_detections=4",
        "model.inference.score_thresh=0.0",
    ]
    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / name, overrides).model)
    assert model.box_head.before_res5.reduce.out_channels == 256
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 60.0]]), "pids": torch.tensor([0])}
    with torch.no_grad():
        losses = model.train()(torch.randn(1, 3, 64, 96), [target])
        detections = model.eval()(torch.randn(1, 3, 96, 128))
    assert len(losses) == 7 and all(torch.isfinite(v) for v in losses.values())
    assert detections.embeddings.shape == (1, 4, 256)
