"""The trainer end to end, on a tiny PRW dataset and a toy model that satisfies the model contract
(tests/training/toy.py)."""

import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file
from torch import nn

from tests.training.toy import ToyPersonSearch, config_file
from training.checkpoint import load_state, load_weights, save_weights
from training.cli import main
from training.config import ConfigError, ScheduleConfig, load_config
from training.inference import evaluate_model
from training.trainer import IterationPlan, Trainer, build_optimizer, fit_plan, train


def same_weights(run_a: Path, run_b: Path) -> bool:
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Training, checkpoints, resuming.


def trained_toy(tmp_path: Path, prw_root: Path, epochs: int) -> ToyPersonSearch:
    """The toy model after `epochs` epochs of the test config."""
    built: list[ToyPersonSearch] = []

    def build(config):
        built.append(ToyPersonSearch(config))
        return built[-1]

    config = load_config(config_file(tmp_path, prw_root), [f"schedule.epochs={epochs}"])
    config.output_dir = tmp_path / "run"
    train(config, build)
    return built[0]


def test_a_short_run_reduces_the_loss(tmp_path, prw_root):
    history = trained_toy(tmp_path, prw_root, epochs=6).history
    assert len(history) == 6 * 4  # 8 frames in batches of 2, 6 epochs
    assert np.mean(history[-4:]) < 0.5 * np.mean(history[:4])


def test_the_model_is_told_the_size_of_each_image_in_its_padded_batch(tmp_path, prw_root):
    """Multi-scale training resizes the 48 x 64 frames of a batch to different sizes: each
    image's (height, width) keeps the frame's 3:4 shape and fits in the padded batch."""
    batches = trained_toy(tmp_path, prw_root, epochs=1).batches
    assert len(batches) == 4
    padded = 0
    for shape, image_sizes in batches:
        heights, widths = image_sizes[:, 0], image_sizes[:, 1]
        assert image_sizes.shape == (shape[0], 2)
        assert (heights <= shape[2]).all() and (widths <= shape[3]).all()
        assert torch.allclose(widths / heights, torch.tensor(4 / 3), atol=0.05)
        padded += int((heights < shape[2]).any() or (widths < shape[3]).any())
    assert padded > 0


def test_run_folder_holds_weights_with_buffers_the_resolved_config_and_the_state(
    tmp_path, prw_root
):
    path = config_file(tmp_path, prw_root)
    assert main(["--config", str(path), "--output", str(tmp_path / "run")], ToyPersonSearch) == 0
    run = tmp_path / "run"
    weights = load_file(run / "model.safetensors")
    # The 8 frames hold 6 persons of identity 0 and 7 of identity 1, counted in each epoch.
    assert weights["id_counts"].tolist() == [12.0, 14.0]
    resolved = load_config(run / "config.yaml")
    assert resolved.output_dir == run
    assert resolved.model == {"num_ids": 2}
    state = load_state(run)
    assert (state["epoch"], state["batch"], state["iteration"]) == (2, 0, 8)


def test_resuming_after_an_epoch_ends_where_an_uninterrupted_run_does(tmp_path, prw_root):
    path = config_file(tmp_path, prw_root)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--config", str(path), "--output", str(straight)], ToyPersonSearch) == 0
    first = ["--config", str(path), "--output", str(resumed), "--set", "schedule.epochs=1"]
    assert main(first, ToyPersonSearch) == 0
    assert not same_weights(straight, resumed)
    assert main(["--resume", str(resumed), "--set", "schedule.epochs=2"], ToyPersonSearch) == 0
    assert same_weights(straight, resumed)


def test_an_interrupted_run_saves_a_checkpoint_and_resumes_to_the_same_weights(tmp_path, prw_root):
    path = config_file(tmp_path, prw_root)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["--config", str(path), "--output", str(straight)], ToyPersonSearch) == 0

    def interrupting(config):
        model = ToyPersonSearch(config)
        model.interrupt_after = 3  # SIGINT during the 3rd step of the first epoch
        return model

    status = main(["--config", str(path), "--output", str(interrupted)], interrupting)
    assert status == 128 + signal.SIGINT
    state = load_state(interrupted)
    # The 3rd step finishes, then the loop saves: 3 of the epoch's 4 batches are done.
    assert (state["epoch"], state["batch"], state["iteration"]) == (0, 3, 3)
    assert main(["--resume", str(interrupted)], ToyPersonSearch) == 0
    assert same_weights(straight, interrupted)


def test_a_non_finite_loss_stops_training_with_an_error(tmp_path, prw_root):
    class Diverging(ToyPersonSearch):
        def _losses(self, *args):
            losses = super()._losses(*args)
            return {**losses, "loss_box": losses["loss_box"] * float("nan")}

    config = load_config(config_file(tmp_path, prw_root))
    config.output_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 0"):
        train(config, Diverging)


def test_training_ends_with_an_evaluation_written_to_the_run_folder(tmp_path, prw_root):
    path = config_file(tmp_path, prw_root, eval={"at_end": True}, tensorboard=True)
    assert main(["--config", str(path), "--output", str(tmp_path / "run")], ToyPersonSearch) == 0
    run = tmp_path / "run"
    record = yaml.safe_load((run / "metrics.json").read_text())  # JSON is YAML
    assert (record["epoch"], record["iteration"]) == (2, 8)
    metrics = record["metrics"]
    assert metrics["num_queries"] == 2
    for name in ("mAP", "top1", "cross_camera_mAP", "det_ap", "det_recall"):
        assert 0.0 <= metrics[name] <= 1.0
    assert (run / "predictions.npz").is_file()
    assert any((run / "tensorboard").iterdir())


# ---------------------------------------------------------------------------------------------
# A time budget: the schedule fitted to the pace, and a hard stop.


@pytest.mark.parametrize(
    ("seconds_per_iteration", "total", "warmup", "milestones"),
    [
        (1.0, 1000, 100, (800,)),  # the whole configured run (10 epochs of 100) fits in 1000 s
        (2.0, 500, 50, (400,)),  # half fits: warmup and milestone at the same fractions
        (3.0, 333, 33, (266,)),  # a partial last epoch: 3.33 epochs
        (50.0, 20, 2, (16,)),  # not even one epoch fits: still warmup and decay
        (2000.0, 1, 0, ()),  # not one iteration fits: one, and a milestone at 1 is at the end
    ],
)
def test_a_budget_plans_the_iterations_that_fit_with_warmup_and_milestones_as_fractions(
    seconds_per_iteration, total, warmup, milestones
):
    schedule = ScheduleConfig(epochs=10, milestones=[8], warmup_iters=100, max_minutes=1000 / 60)
    plan = fit_plan(schedule, iters_per_epoch=100, seconds_per_iteration=seconds_per_iteration)
    assert plan == IterationPlan(total, warmup, milestones)


def test_a_plan_counts_the_iterations_already_done_and_the_time_already_spent():
    schedule = ScheduleConfig(epochs=10, milestones=[5], warmup_iters=10, max_minutes=1000 / 60)
    # 600 s spent on 300 iterations; 400 s left at 1 s per iteration: 700 in all.
    plan = fit_plan(schedule, 100, 1.0, iterations_done=300, seconds_spent=600.0)
    assert plan == IterationPlan(700, 7, (350,))
    # Over budget already: the run ends where it is.
    assert fit_plan(schedule, 100, 1.0, 300, 2000.0).total == 300


class FakeClock:
    """One second passes between two readings; two seconds for the first `slow` readings."""

    def __init__(self, slow: int = 0) -> None:
        self.now, self.readings, self.slow = 0.0, 0, slow

    def __call__(self) -> float:
        self.readings += 1
        self.now += 2.0 if self.readings <= self.slow else 1.0
        return self.now


def budgeted_run(
    tmp_path: Path, prw_root: Path, schedule: dict, clock: FakeClock, **sections
) -> tuple[Trainer, dict[str, float]]:
    """A trainer of the test config with `schedule`, timed by `clock`, after its run (and the
    run's metrics)."""
    config = load_config(config_file(tmp_path, prw_root, schedule=schedule, **sections))
    config.output_dir = tmp_path / "run"
    trainer = Trainer(config, ToyPersonSearch)
    trainer.clock = clock
    return trainer, trainer.run()


def test_a_budgeted_run_plans_from_its_pace_and_keeps_the_plan_in_its_checkpoint(
    tmp_path, prw_root
):
    # 4 iterations per epoch at 1 s each (the fake clock). The first plan, after 10 timed
    # iterations: 12 s hold 12 of the 24 iterations of 6 epochs, so the milestone at epoch 4
    # (iteration 16) moves to iteration 8 and the warmup of 2 iterations to 1.
    schedule = {"epochs": 6, "milestones": [4], "max_minutes": 12 / 60}
    trainer, _ = budgeted_run(tmp_path, prw_root, schedule, FakeClock())
    assert trainer.plan == IterationPlan(total=12, warmup=1, milestones=(8,))
    assert (trainer.iteration, trainer.stopped_by, trainer.train_seconds) == (12, "schedule", 12.0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1)  # decayed
    state = load_state(tmp_path / "run")
    assert (state["plan"]["total"], state["train_seconds"]) == (12, 12.0)
    assert load_config(tmp_path / "run" / "config.yaml").schedule.epochs == 6  # the user's


def test_a_budgeted_run_may_end_inside_an_epoch(tmp_path, prw_root):
    # 14 s hold 14 iterations at 1 s each: three epochs of 4 and half of the fourth.
    schedule = {"epochs": 6, "milestones": [4], "max_minutes": 14 / 60}
    trainer, _ = budgeted_run(tmp_path, prw_root, schedule, FakeClock())
    assert (trainer.iteration, trainer.epoch, trainer.batch) == (14, 3, 2)
    assert trainer.stopped_by == "schedule"
    state = load_state(tmp_path / "run")
    assert (state["iteration"], state["epoch"], state["batch"]) == (14, 3, 2)


def test_a_budgeted_plan_follows_the_pace_and_keeps_its_milestones_once_decay_begins(
    tmp_path, prw_root
):
    # The first 4 iterations take 2 s each (the start reading and 4 iterations are slow), the
    # rest 1 s; the pace is timed from the end of the first iteration. The first plan comes
    # after 10 timed iterations (iteration 11, 15 s spent, 1.3 s per iteration): 13 s left hold
    # 10 more, 21 of 24 iterations, and the milestone at epoch 3 (iteration 12) moves to
    # round(12 * 21 / 24) = 10 (the warmup stays at round(2 * 21 / 24) = 2), soon reached: once
    # the learning rate has begun to decay the milestone stays at 10, while the length still
    # follows the pace, which tends to 1 s per iteration: the run ends at iteration 23, at 27 s
    # of its 28.
    schedule = {"epochs": 6, "milestones": [3], "max_minutes": 28 / 60}
    trainer, _ = budgeted_run(tmp_path, prw_root, schedule, FakeClock(slow=5))
    assert trainer.plan == IterationPlan(total=23, warmup=2, milestones=(10,))
    assert (trainer.iteration, trainer.train_seconds, trainer.stopped_by) == (23, 27.0, "schedule")


def test_a_budgeted_run_interrupted_on_the_last_step_of_an_epoch_resumes(tmp_path, prw_root):
    # Interrupted before any plan, with the epoch's 4 batches done: the resumed run starts
    # with an empty epoch, which has nothing to time, and goes on to the configured end (the
    # whole run is shorter than the pacing window).
    path = config_file(tmp_path, prw_root, schedule={"epochs": 3, "max_minutes": 60.0})
    run = tmp_path / "run"

    def interrupting(config):
        model = ToyPersonSearch(config)
        model.interrupt_after = 4
        return model

    assert main(["--config", str(path), "--output", str(run)], interrupting) == 128 + signal.SIGINT
    assert (load_state(run)["epoch"], load_state(run)["batch"]) == (0, 4)
    assert main(["--resume", str(run)], ToyPersonSearch) == 0
    state = load_state(run)
    assert (state["iteration"], state["epoch"]) == (12, 3)


def test_a_run_stops_when_its_budget_is_spent_with_a_checkpoint_and_an_evaluation(
    tmp_path, prw_root
):
    # 2.5 s of budget: the fourth step sees 3 s spent, is taken, and is the last one.
    schedule = {"epochs": 6, "milestones": [4], "max_minutes": 2.5 / 60}
    evaluate = {"at_end": True}
    trainer, metrics = budgeted_run(tmp_path, prw_root, schedule, FakeClock(), eval=evaluate)
    assert (trainer.iteration, trainer.stopped_by) == (4, "time budget")
    assert (load_state(tmp_path / "run")["iteration"], metrics["num_queries"]) == (4, 2)


# ---------------------------------------------------------------------------------------------
# Parameter groups: learning rate and weight decay multipliers.


class Tower(nn.Module):
    """A conv with a bias, a GroupNorm and a frozen linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.offset_predictor = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def groups_by_name(model: nn.Module, **optim) -> dict[str, tuple[float, float]]:
    """Each trainable parameter's (lr, weight decay) in an optimizer built for `optim` (base lr
    1, weight decay 1, batch of 4 images on one process)."""
    config = load_config(None, [f"optim.{k}={v}" for k, v in optim.items()])
    config = config.model_copy(update={"data": config.data.model_copy(update={"batch_size": 4})})
    config.optim.lr, config.optim.weight_decay = 1.0, 1.0
    optimizer = build_optimizer(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for p in group["params"]
    }


def test_biases_and_norm_layers_take_their_multipliers_and_frozen_parameters_are_left_out():
    groups = groups_by_name(Tower(), bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.5)
    assert groups == {
        "conv.weight": (1.0, 1.0),
        "conv.bias": (2.0, 0.0),  # AlignPS' released optimiser: bias lr x2, no decay
        "norm.weight": (1.0, 0.5),
        "norm.bias": (1.0, 0.5),  # a norm layer's bias is a norm parameter, not a bias
        "offset_predictor.weight": (1.0, 1.0),
        "offset_predictor.bias": (2.0, 0.0),
    }


def test_the_first_matching_name_rule_decides_over_the_bias_and_norm_multipliers():
    rules = (
        "[{pattern: '*offset_predictor.*', lr_mult: 0.1}, "
        "{pattern: '*.bias', lr_mult: 5.0, decay_mult: 0.0}]"
    )
    groups = groups_by_name(Tower(), param_groups=rules, bias_lr_mult=2.0)
    assert groups["offset_predictor.weight"] == (pytest.approx(0.1), 1.0)
    assert groups["offset_predictor.bias"] == (pytest.approx(0.1), 1.0)  # first rule wins
    assert groups["conv.bias"] == groups["norm.bias"] == (5.0, 0.0)
    assert groups["conv.weight"] == (1.0, 1.0)


def test_a_name_rule_that_matches_no_trainable_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match=r"no trainable parameter matches \['\*frozen\.\*'\]"):
        groups_by_name(Tower(), param_groups="[{pattern: '*frozen.*', lr_mult: 0.0}]")


def test_a_reference_batch_size_scales_the_learning_rate_to_the_images_of_a_step():
    # lr 1 is meant for 16 images; a step here has 4.
    groups = groups_by_name(Tower(), reference_batch_size=16)
    assert set(groups.values()) == {(0.25, 1.0)}


# ---------------------------------------------------------------------------------------------
# Distributed data parallel: two CPU processes over Gloo.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, config_path: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    config = load_config(config_path)
    config.output_dir = Path(out) / "run"
    trainer = Trainer(config, ToyPersonSearch)
    trainer.run()
    save_weights(trainer.model, Path(out) / f"rank{rank}.safetensors")
    dist.destroy_process_group()


def test_two_ddp_processes_end_with_identical_weights(tmp_path, prw_root):
    path = config_file(tmp_path, prw_root, schedule={"epochs": 1}, eval={"at_end": True})
    # Forked workers skip re-importing torch, as DataLoader workers do.
    args = (2, free_port(), str(path), str(tmp_path))
    mp.start_processes(ddp_worker, args=args, nprocs=2, start_method="fork")
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Each rank saw half of the 8 frames; the identity counts were summed over both.
    assert rank0["id_counts"].tolist() == [6.0, 7.0]
    state = load_state(tmp_path / "run")
    assert state["iteration"] == 2  # 8 frames / 2 ranks / batches of 2
    assert len(state["rng"]) == 2  # one set of random streams per rank
    # Both ranks evaluated half of the test images; rank 0 scored them all, exactly as one
    # process evaluating the same weights does.
    model = ToyPersonSearch({"num_ids": 2})
    load_weights(model, tmp_path / "rank0.safetensors")
    alone = evaluate_model(model, load_config(path), torch.device("cpu"))
    assert yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())["metrics"] == alone


# ---------------------------------------------------------------------------------------------
# Mistakes a user makes: one line on stderr, exit status 2, no traceback.


def run_cli(argv, capsys) -> tuple[int, str]:
    status = main(argv, ToyPersonSearch)
    err = capsys.readouterr().err
    return status, err


def test_config_typo_is_one_line_naming_the_key(tmp_path, prw_root, capsys):
    path = config_file(tmp_path, prw_root, optim={"lrr": 0.1})
    status, err = run_cli(["--config", str(path)], capsys)
    assert status == 2
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_model_config_typo_is_reported_like_other_config_errors(tmp_path, prw_root, capsys):
    path = config_file(tmp_path, prw_root)
    argv = ["--config", str(path), "--output", str(tmp_path / "run"), "--set", "model.dimm=4"]
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert "unknown key 'model.dimm'" in err


def test_unknown_model_name_is_reported_with_the_known_names(tmp_path, prw_root, capsys):
    path = config_file(tmp_path, prw_root)
    argv = ["--config", str(path), "--output", str(tmp_path / "run"), "--set", "model.name=lepas"]
    status = main(argv)  # the real registry, models.build_model
    err = capsys.readouterr().err
    assert status == 2
    assert "unknown model name 'lepas'" in err and "leaps" in err
    assert "Traceback" not in err


def test_missing_config_file_is_reported(tmp_path, capsys):
    status, err = run_cli(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert status == 2
    assert "config file not found" in err


def test_wrong_data_root_is_reported_with_the_loaders_message(tmp_path, prw_root, capsys):
    path = config_file(tmp_path, prw_root, data={"root": str(tmp_path / "not-prw")})
    status, err = run_cli(["--config", str(path), "--output", str(tmp_path / "run")], capsys)
    assert status == 2
    assert "not-prw: no such folder" in err
    assert "Traceback" not in err


def test_starting_over_an_existing_run_is_refused(tmp_path, prw_root, capsys):
    path = config_file(tmp_path, prw_root, schedule={"epochs": 1})
    run = tmp_path / "run"
    assert main(["--config", str(path), "--output", str(run)], ToyPersonSearch) == 0
    status, err = run_cli(["--config", str(path), "--output", str(run)], capsys)
    assert status == 2
    assert f"pass --resume {run}" in err


def test_resuming_a_folder_without_checkpoint_is_reported(tmp_path, prw_root, capsys):
    path = config_file(tmp_path, prw_root)
    status, err = run_cli(["--config", str(path), "--resume", str(tmp_path / "empty")], capsys)
    assert status == 2
    assert "no model.safetensors; is it a run folder?" in err


def test_cuda_request_without_cuda_is_a_config_error(tmp_path, prw_root):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    config = load_config(config_file(tmp_path, prw_root), ["device=cuda"])
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(config, ToyPersonSearch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_mixed_precision_on_cuda_trains_checkpoints_and_evaluates(tmp_path, prw_root):
    path = config_file(tmp_path, prw_root, device="cuda", amp=True, eval={"at_end": True})
    run = tmp_path / "run"
    assert main(["--config", str(path), "--output", str(run)], ToyPersonSearch) == 0
    state = load_state(run)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the checkpoint
    assert "mAP" in yaml.safe_load((run / "metrics.json").read_text())["metrics"]


def test_a_box_query_mode_the_model_cannot_embed_is_refused_before_training(tmp_path, prw_root):
    config = load_config(config_file(tmp_path, prw_root, eval={"query_mode": "gt_box"}))
    config.output_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="gt_box needs a model with embed_boxes"):
        Trainer(config, ToyPersonSearch)
    assert not (tmp_path / "run").exists()
