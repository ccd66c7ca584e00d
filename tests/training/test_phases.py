"""Training in phases from one config (training/phases.py), with the toy model of toy.py: each
phase a run in its own folder, later phases starting from earlier ones' weights, frozen modules
left untouched, one budget shared, resume across phases."""

import signal

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from tests.training.toy import ToyPersonSearch, config_file
from training.checkpoint import CheckpointError, load_module_weights, save_weights
from training.cli import main
from training.config import ConfigError, TrainConfig, load_config
from training.phases import DONE_FILE, PHASES_FILE, budget_shares, phase_config
from training.trainer import freeze_modules

# Phase "whole" trains everything; phase "head" starts from it with the conv features frozen
# and a lower learning rate.
TWO_PHASES = [
    {"name": "whole"},
    {
        "name": "head",
        "init_from": "whole",
        "freeze": ["features"],
        "overrides": {"optim": {"lr": 0.01}, "schedule": {"epochs": 1}},
    },
]


def phased_config(tmp_path, prw_root, phases=TWO_PHASES, **sections):
    return config_file(tmp_path, prw_root, phases=phases, **sections)


def weights(path):
    return load_file(path / "model.safetensors")


def test_each_phase_is_a_run_in_its_own_folder_and_the_last_is_the_runs_model(tmp_path, prw_root):
    run = tmp_path / "run"
    assert (
        main(
            ["--config", str(phased_config(tmp_path, prw_root)), "--output", str(run)],
            ToyPersonSearch,
        )
        == 0
    )
    assert (run / PHASES_FILE).is_file()
    for phase in ("whole", "head"):
        assert (run / phase / "model.safetensors").is_file() and (run / phase / DONE_FILE).is_file()
    head = yaml.safe_load((run / "head" / "config.yaml").read_text())
    assert head["optim"]["lr"] == 0.01 and head["schedule"]["epochs"] == 1
    assert head["optim"]["name"] == "sgd"  # merged key by key: the rest is the base config's
    assert head["freeze"] == ["features"] and head["phases"] == []
    final = weights(run)
    assert all(torch.equal(final[k], v) for k, v in weights(run / "head").items())
    assert load_config(run / "config.yaml").output_dir == run / "head"  # exports like any run


def test_a_frozen_module_is_exactly_its_starting_weights_and_the_rest_trains_on(tmp_path, prw_root):
    run = tmp_path / "run"
    main(
        ["--config", str(phased_config(tmp_path, prw_root)), "--output", str(run)], ToyPersonSearch
    )
    whole, head = weights(run / "whole"), weights(run / "head")
    frozen = [k for k in whole if k.startswith("features.")]
    assert frozen and all(torch.equal(whole[k], head[k]) for k in frozen)
    assert not torch.equal(whole["head.weight"], head["head.weight"])


def test_a_frozen_module_stays_in_eval_mode_and_out_of_the_gradients():
    model = ToyPersonSearch({"num_ids": 2})
    freeze_modules(model, ["features"])
    model.train()
    assert not model.features.training and not model.features[-1].training  # dropout off
    assert model.head.training
    assert not any(p.requires_grad for p in model.features.parameters())
    with pytest.raises(ConfigError, match=r"no modules \['feature'\]"):
        freeze_modules(model, ["feature"])


def test_some_modules_load_from_an_earlier_run_and_the_others_keep_their_weights(tmp_path):
    torch.manual_seed(1)
    earlier = ToyPersonSearch({"num_ids": 2})
    save_weights(earlier, tmp_path / "model.safetensors")
    torch.manual_seed(2)
    model = ToyPersonSearch({"num_ids": 2})
    head_before = model.head.weight.clone()
    load_module_weights(model, tmp_path, ["features"])
    assert torch.equal(model.features[0].weight, earlier.features[0].weight)
    assert torch.equal(model.head.weight, head_before)


def test_a_phase_starts_from_the_modules_of_the_earlier_phase_it_names(tmp_path, prw_root):
    phases = [TWO_PHASES[0], {**TWO_PHASES[1], "init_modules": ["features"]}]
    config = load_config(phased_config(tmp_path, prw_root, phases=phases))
    first, second = phase_config(config, 0), phase_config(config, 1)
    assert first.init is None and first.output_dir == config.output_dir / "whole"
    assert second.init.weights == config.output_dir / "whole"
    assert second.init.modules == ["features"]


def test_loading_modules_the_file_lacks_or_the_model_lacks_is_an_error(tmp_path):
    model = ToyPersonSearch({"num_ids": 2})
    save_weights(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no modules \['backbone'\]"):
        load_module_weights(model, tmp_path, ["backbone"])
    bigger = ToyPersonSearch({"num_ids": 2, "dim": 16})
    with pytest.raises(CheckpointError, match="do not fit modules"):
        load_module_weights(bigger, tmp_path, ["head"])
    with pytest.raises(CheckpointError, match="no weights file"):
        load_module_weights(model, tmp_path / "missing", ["head"])


def test_an_interrupted_phase_resumes_and_the_finished_ones_are_not_trained_again(
    tmp_path, prw_root
):
    path = phased_config(tmp_path, prw_root)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["--config", str(path), "--output", str(straight)], ToyPersonSearch) == 0
    built = []

    def interrupting(config):
        model = ToyPersonSearch(config)
        built.append(model)
        if len(built) == 2:  # the second phase's model: SIGINT during its 3rd step
            model.interrupt_after = 3
        return model

    status = main(["--config", str(path), "--output", str(interrupted)], interrupting)
    assert status == 128 + signal.SIGINT
    assert (interrupted / "whole" / DONE_FILE).is_file()
    assert not (interrupted / "head" / DONE_FILE).is_file()
    built.clear()
    assert main(["--resume", str(interrupted)], interrupting) == 0
    assert len(built) == 1  # only the head phase was built again
    final, expected = weights(interrupted), weights(straight)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_the_time_budget_is_shared_among_the_phases(tmp_path, prw_root):
    phases = [{"name": "a", "budget_share": 0.25}, {"name": "b"}, {"name": "c"}]
    config = load_config(
        phased_config(tmp_path, prw_root, phases=phases, schedule={"max_minutes": 20.0})
    )
    assert budget_shares(config) == [0.25, 0.375, 0.375]
    assert [phase_config(config, i).schedule.max_minutes for i in range(3)] == [5.0, 7.5, 7.5]
    setting_it = [{"name": "a", "overrides": {"schedule": {"max_minutes": 3}}}]
    config = load_config(phased_config(tmp_path, prw_root, phases=setting_it))
    with pytest.raises(ConfigError, match="give it a budget_share"):
        phase_config(config, 0)


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "names must be unique"),
        ([{"name": "a", "init_from": "b"}, {"name": "b"}], "'b', which is not an earlier phase"),
        ([{"name": "a", "budget_share": 0.7}, {"name": "b", "budget_share": 0.5}], "more than 1"),
        ([{"name": "A b"}], "String should match pattern"),
    ],
)
def test_impossible_phases_are_config_errors(phases, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate({"phases": phases})


def test_starting_a_phased_run_over_an_existing_one_is_refused(tmp_path, prw_root, capsys):
    path, run = phased_config(tmp_path, prw_root), tmp_path / "run"
    run.mkdir()
    (run / PHASES_FILE).write_text("{}")
    assert main(["--config", str(path), "--output", str(run)], ToyPersonSearch) == 2
    assert "pass --resume" in capsys.readouterr().err
