"""TrainConfig: YAML loading, strict keys with suggestions, --set overrides, the LR schedule."""

from pathlib import Path

import pytest

from models import build_model
from training.config import (
    ConfigError,
    TrainConfig,
    dump_config,
    load_config,
)
from training.trainer import IterationPlan, lr_factor, parameter_groups


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_need_no_file_and_every_field_is_described():
    config = load_config(None)
    assert config == TrainConfig()

    def undescribed(model_class, prefix=""):
        for name, field in model_class.model_fields.items():
            if not field.description:
                yield prefix + name
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from undescribed(annotation, f"{prefix}{name}.")

    assert list(undescribed(TrainConfig)) == []


def test_yaml_file_sets_nested_fields(tmp_path):
    path = write(
        tmp_path, "optim:\n  name: adamw\n  lr: 3.0e-5\nschedule:\n  milestones: [24, 33]\n"
    )
    config = load_config(path)
    assert config.optim.name == "adamw"
    assert config.optim.lr == 3.0e-5
    assert config.schedule.milestones == [24, 33]
    assert config.data.batch_size == 2  # untouched sections keep their defaults


def test_typo_in_file_names_the_key_and_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"
    ):
        load_config(path)


def test_typo_in_section_name_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'schedul' \(did you mean 'schedule'\?\)"):
        load_config(write(tmp_path, "schedul:\n  epochs: 3\n"))


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.zzzzzz=1"])
    assert "unknown key 'data.zzzzzz'" in str(error.value)
    assert "did you mean" not in str(error.value)


def test_wrong_value_type_names_the_field():
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be a valid number"):
        load_config(None, ["optim.lr=fast"])


def test_missing_file_and_invalid_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML") as error:
        load_config(write(tmp_path, "optim: [unclosed\n"))
    assert "\n" not in str(error.value)


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n")
    config = load_config(
        path,
        [
            "optim.lr=0.002",
            "schedule.milestones=[8, 11]",
            "amp=false",
            "optim.clip_grad_norm=null",
            "model.num_proposals=50",
        ],
    )
    assert config.optim.lr == 0.002
    assert config.schedule.milestones == [8, 11]
    assert config.amp is False
    assert config.optim.clip_grad_norm is None
    # The model section is free-form here; the model's own config class validates it.
    assert config.model == {"num_proposals": 50}


def test_override_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean 'eval\.det_thresh'"):
        load_config(None, ["eval.det_thres=0.2"])


def test_malformed_overrides_are_rejected():
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr is a value, not a section"):
        load_config(None, ["optim.lr=0.1", "optim.lr.x=1"])


def test_multiscale_settings_are_checked():
    alignps = load_config(
        None,
        [
            "data.multiscale.mode=range",
            "data.multiscale.short_side=[400, 1200]",
            "data.multiscale.long_side=[667, 2000]",
        ],
    )
    assert alignps.data.multiscale.long_side == [667, 2000]
    with pytest.raises(ConfigError, match="needs short_side = \\[lo, hi\\]"):
        load_config(None, ["data.multiscale.mode=range", "data.multiscale.short_side=[800]"])
    with pytest.raises(ConfigError, match="short_side must be empty"):
        load_config(None, ["data.multiscale.short_side=[800]"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["optim.name=adamw", "data.root=/data/prw", "model.depth=18"])
    dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_learning_rate_warms_up_linearly_then_steps_down_at_milestones():
    config = load_config(
        None,
        [
            "schedule.warmup_iters=10",
            "schedule.warmup_factor=0.1",
            "schedule.milestones=[2, 3]",
            "schedule.gamma=0.1",
        ],
    )
    plan = IterationPlan.from_schedule(config.schedule, iters_per_epoch=20)
    assert plan == IterationPlan(total=24 * 20, warmup=10, milestones=(40, 60))
    # Warmup: 0.1 at iteration 0, halfway (0.1 + 0.9 * 0.5 = 0.55) at 5, then 1.
    assert lr_factor(0, plan, config.schedule) == pytest.approx(0.1)
    assert lr_factor(5, plan, config.schedule) == pytest.approx(0.55)
    assert lr_factor(10, plan, config.schedule) == 1.0
    # Epoch 2 starts at iteration 40: one milestone passed; epoch 3 (iteration 60): two.
    assert lr_factor(39, plan, config.schedule) == 1.0
    assert lr_factor(40, plan, config.schedule) == pytest.approx(0.1)
    assert lr_factor(60, plan, config.schedule) == pytest.approx(0.01)


SHIPPED_CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_builds_its_optimizer_with_rules_that_match_its_model(path):
    config = load_config(path)
    model = build_model(config.model)
    groups = parameter_groups(model, config.optim)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for group in groups for p in group["params"]) == trainable
