"""Proof that a model learns: train a tiny config on synthetic data for a wall-clock budget, then
score the trained model next to the same model before training, in one run.

    python benchmarks/learn.py --config configs/tiny/alignps_synthetic.yaml \\
        [--config configs/tiny/leaps_synthetic.yaml ...] [--minutes 15] [--threads 2] \\
        [--data-seed 0] [--data-dir data/synthetic] [--synthetic KEY=VALUE ...] \\
        [--set KEY=VALUE ...] [--runs-dir runs/learn]

For each config: the synthetic dataset in the config's format (``data.dataset``: prw, cuhk_sysu
or crowdhuman) is generated with the generator's default size and difficulty, or taken from the
cache folder ``--data-dir/<format>-seed<S>-<hash of the options>`` when an earlier run wrote it.
The model is built with the config's seed and scored on the held-out test split (the test
identities are disjoint from the training ones) before training; it is then trained by the
trainer (``training.trainer.Trainer``, as ``psearch-train`` does) with a time budget of
``--minutes`` (``schedule.max_minutes``): the trainer times its first iterations, keeps the
config's epochs that fit with the learning rate milestones moved alike, and stops when the budget
is spent. The trained model is scored again. Person search configs report mAP and
top-1 over all cameras and across cameras (PRW protocol, ``training.inference``); detector
configs (CrowdHuman format) report MR^-2, AP and recall.

The targets printed beside the search figures: mAP >= 60 %, top-1 >= 70 % (all cameras) and a
trained mAP at least 3x the untrained one. A script, not a test: the figures depend on the
machine (how many iterations fit in the budget) and nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model
from training.checkpoint import WEIGHTS_FILE, load_weights
from training.config import ConfigError, TrainConfig, load_config
from training.datasets import DatasetError, PersonSearchSplit
from training.inference import evaluate_model, load_test_split
from training.synthetic import FORMATS, generate, generator_fingerprint, make_options
from training.trainer import (
    ProcessGroup,
    Trainer,
    build_model_checked,
    seed_everything,
    select_device,
)

COMPLETE_MARKER = "SYNTHETIC.txt"  # written last: a folder without it is an unfinished dataset

# (metric key of training.inference, column title), in table order.
SEARCH_METRICS = [
    ("mAP", "mAP"),
    ("top1", "top-1"),
    ("cross_camera_mAP", "mAP cc"),
    ("cross_camera_top1", "top-1 cc"),
    ("det_ap", "det AP"),
    ("det_recall", "det rec"),
]
DETECTION_METRICS = [("mr2", "MR^-2"), ("ap", "AP"), ("recall", "recall")]
SEARCH_TARGETS = {"mAP": 0.60, "top1": 0.70}  # all-camera protocol, the one papers quote first
MIN_MAP_RATIO = 3.0  # trained mAP over untrained mAP


def log(line: str) -> None:
    """Print a progress line now (a run takes minutes; the lines should not wait in a buffer)."""
    print(line, flush=True)


# --- data ---------------------------------------------------------------------------------


def synthetic_options(format: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The generator's options for `format` (its defaults, then `overrides`), as plain data."""
    try:
        options = dataclasses.asdict(make_options(format, **overrides))
    except (TypeError, ValueError) as error:  # an unknown option, or a value out of range
        raise ConfigError(f"--synthetic: {error}") from None
    options.pop("progress")  # how it is shown does not change what is written
    return options


def dataset_folder(data_dir: Path, format: str, seed: int, options: dict[str, Any]) -> Path:
    """Where the dataset of (format, seed, options) is cached: a name that changes with any
    option and with the generator's code, so that two datasets never share a folder."""
    key = {**options, "generator": generator_fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return data_dir / f"{format}-seed{seed}-{digest}"


def synthetic_dataset(
    data_dir: Path, format: str, seed: int, overrides: dict[str, Any]
) -> tuple[Path, bool]:
    """The root of the synthetic dataset, generated unless a complete copy is cached; returns
    (root, whether it was generated now).

    The dataset is written to a temporary sibling folder and renamed when complete, so an
    interrupted run leaves no half-written dataset under the cached name.
    """
    if format not in FORMATS:
        raise ConfigError(
            f"data.dataset: {format!r} has no synthetic generator; expected one of {FORMATS}"
        )
    options = synthetic_options(format, overrides)
    root = dataset_folder(data_dir, format, seed, options)
    if (root / COMPLETE_MARKER).is_file():
        return root, False
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    summary = generate(format, partial, seed=seed, **options)
    (partial / COMPLETE_MARKER).write_text(f"{summary}\noptions {json.dumps(options)}\n")
    shutil.rmtree(root, ignore_errors=True)  # an unfinished copy from an older run, if any
    partial.rename(root)
    return root, True


# --- training -----------------------------------------------------------------------------


@dataclass
class TrainingRecord:
    """What a budgeted training run did; ``first_losses`` and ``last_losses`` are the mean
    losses of its first and last logging windows (``log_every`` iterations)."""

    iterations: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    stopped_by: str = "schedule"
    planned_iterations: int = 0
    first_losses: dict[str, float] = dataclasses.field(default_factory=dict)
    last_losses: dict[str, float] = dataclasses.field(default_factory=dict)
    run_dir: Path | None = None


def train_within_budget(config: TrainConfig, minutes: float, run_dir: Path) -> TrainingRecord:
    """Train with ``training.trainer.Trainer`` under a time budget of `minutes`: it plans the
    epochs of the config that fit and stops when the budget is spent. The run folder keeps the
    checkpoint (weights, config, state) for ``psearch-export`` or ``--resume``."""
    config = config.model_copy(deep=True)
    config.schedule.max_minutes = minutes
    config.eval.at_end = False  # scored below, beside the untrained model
    config.output_dir = run_dir
    trainer = Trainer(config, build_model)
    log(
        f"training: {len(trainer.loader.dataset)} images, {len(trainer.loader)} iterations per "
        f"epoch, up to {config.schedule.epochs} epochs in {minutes:g} min; run folder {run_dir}"
    )
    trainer.run()
    history = [{k: v for k, v in window.items() if k != "iteration"} for window in trainer.history]
    return TrainingRecord(
        iterations=trainer.iteration,
        epochs=trainer.iteration / len(trainer.loader),
        seconds=trainer.train_seconds,
        stopped_by=trainer.stopped_by,
        planned_iterations=trainer.plan.total,
        first_losses=history[0] if history else {},
        last_losses=history[-1] if history else {},
        run_dir=run_dir,
    )


def format_losses(losses: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in losses.items())


# --- one config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class ConfigResult:
    """Everything one config's run measured."""

    config_path: Path
    dataset: str
    data_root: Path
    parameters: int
    untrained: Evaluation
    trained: Evaluation
    training: TrainingRecord

    @property
    def is_search(self) -> bool:
        return "mAP" in self.trained.metrics


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_timed(
    model: nn.Module, config: TrainConfig, device: torch.device, split: PersonSearchSplit
) -> Evaluation:
    """The model's metrics on `split` and how long they took to compute."""
    start = time.perf_counter()
    metrics = evaluate_model(model, config, device, split)
    return Evaluation(metrics, time.perf_counter() - start)


def run_config(config_path: Path, args: argparse.Namespace) -> ConfigResult:
    """Generate (or reuse) the data, score the untrained model, train it, score it again."""
    config = load_config(config_path, args.overrides)
    log(f"\n=== {config_path} ===")
    root, generated = synthetic_dataset(
        args.data_dir, config.data.dataset, args.data_seed, args.synthetic
    )
    log(f"data: {root} ({'generated now' if generated else 'cached'})")
    config.data.root = root
    log("config (resolved):")
    log(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())

    device = select_device(config, ProcessGroup())
    seed_everything(config.seed)  # the initial weights the trainer builds from the same seed
    model = build_model_checked(build_model, config.model).to(device)
    log(f"model: {type(model).__name__}, {count_parameters(model):,} parameters, on {device}")
    test_split = load_test_split(config)
    untrained = evaluate_timed(model, config, device, test_split)
    log(f"untrained ({untrained.seconds:.1f} s): {format_metrics(untrained.metrics)}")

    run_dir = args.runs_dir / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    training = train_within_budget(config, args.minutes, run_dir)
    for which, losses in (("first", training.first_losses), ("last", training.last_losses)):
        if losses:
            log(f"loss, {which} {config.log_every} iterations: {format_losses(losses)}")
    log(
        f"trained {training.iterations} of {training.planned_iterations} planned iterations "
        f"({training.epochs:.2f} epochs) in {training.seconds:.1f} s; stopped by "
        f"{training.stopped_by}"
    )
    model = load_trained(run_dir, config, device)
    trained = evaluate_timed(model, config, device, test_split)
    log(f"trained ({trained.seconds:.1f} s): {format_metrics(trained.metrics)}")
    parameters = count_parameters(model)
    return ConfigResult(
        config_path, config.data.dataset, root, parameters, untrained, trained, training
    )


def load_trained(run_dir: Path, config: TrainConfig, device: torch.device) -> nn.Module:
    """The model with the weights of the run's last checkpoint."""
    model = build_model_checked(build_model, config.model).to(device)
    load_weights(model, run_dir / WEIGHTS_FILE)
    return model


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


# --- the final table ----------------------------------------------------------------------


def ratio(trained: float, untrained: float) -> float:
    """trained / untrained; infinite when an untrained zero became something."""
    if untrained > 0:
        return trained / untrained
    return float("inf") if trained > 0 else float("nan")


def format_ratio(value: float) -> str:
    """``2.5x``; ``inf`` when the untrained figure was zero, ``-`` when both were (NaN)."""
    if value != value:
        return "-"
    return "inf" if value == float("inf") else f"{value:.1f}x"


def metrics_table(results: Sequence[ConfigResult], columns: list[tuple[str, str]]) -> list[str]:
    """Rows untrained / trained / ratio per config, metrics in percent. Columns that some
    result lacks (CUHK-SYSU has no cross-camera protocol) are left out."""
    columns = [
        (key, title) for key, title in columns if all(key in r.trained.metrics for r in results)
    ]
    name_width = max(len(r.config_path.name) for r in results) + 2
    header = f"{'config':<{name_width}}{'model':<11}" + "".join(f"{t:>10}" for _, t in columns)
    lines = [header + f"{'iters':>8}{'train s':>9}"]
    for result in results:
        name = result.config_path.name
        for state, evaluation in (("untrained", result.untrained), ("trained", result.trained)):
            cells = "".join(f"{100 * evaluation.metrics[key]:>10.2f}" for key, _ in columns)
            iters = result.training.iterations if state == "trained" else 0
            seconds = result.training.seconds if state == "trained" else 0.0
            lines.append(f"{name:<{name_width}}{state:<11}{cells}{iters:>8}{seconds:>9.0f}")
        ratios = (
            ratio(result.trained.metrics[key], result.untrained.metrics[key]) for key, _ in columns
        )
        cells = "".join(f"{format_ratio(value):>10}" for value in ratios)
        lines.append(f"{name:<{name_width}}{'ratio':<11}{cells}")
    return lines


def search_verdicts(result: ConfigResult) -> list[str]:
    """One line per target: the value, the target and whether it is met."""
    trained, untrained = result.trained.metrics, result.untrained.metrics
    titles = dict(SEARCH_METRICS)
    lines = []
    for key, target in SEARCH_TARGETS.items():
        met = "yes" if trained[key] >= target else "NO"
        lines.append(f"{titles[key]} {100 * trained[key]:.2f} >= {100 * target:.0f}: {met}")
    value = ratio(trained["mAP"], untrained["mAP"])
    met = "yes" if trained["mAP"] > 0 and value >= MIN_MAP_RATIO else "NO"
    lines.append(f"mAP trained / untrained {format_ratio(value)} >= {MIN_MAP_RATIO:.0f}x: {met}")
    return [f"  {result.config_path.name}: {line}" for line in lines]


def run_summary(result: ConfigResult) -> str:
    training = result.training
    return (
        f"{result.config_path.name}: {result.dataset} data in {result.data_root}, "
        f"{result.parameters:,} parameters, {training.iterations} iterations "
        f"({training.epochs:.2f} epochs) in {training.seconds:.0f} s, stopped by "
        f"{training.stopped_by}; evaluation {result.untrained.seconds:.0f} s untrained, "
        f"{result.trained.seconds:.0f} s trained"
    )


def final_table(results: Sequence[ConfigResult]) -> list[str]:
    """What each run did, then the search table with its targets and the detection table
    (each if any)."""
    lines = [run_summary(result) for result in results] + [""]
    search = [r for r in results if r.is_search]
    detection = [r for r in results if not r.is_search]
    if search:
        lines += ["person search (PRW protocol; cc = cross-camera; percent)"]
        lines += metrics_table(search, SEARCH_METRICS)
        titles = dict(SEARCH_METRICS)
        targets = ", ".join(f"{titles[k]} >= {100 * v:.0f}" for k, v in SEARCH_TARGETS.items())
        lines += [f"targets (all cameras): {targets}, mAP >= {MIN_MAP_RATIO:.0f}x untrained"]
        for result in search:
            lines += search_verdicts(result)
    if detection:
        lines += [""] * bool(search)
        lines += ["pedestrian detection (CrowdHuman protocol; MR^-2 lower is better; percent)"]
        lines += metrics_table(detection, DETECTION_METRICS)
    return lines


# --- command line -------------------------------------------------------------------------


def parse_key_values(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings as a dict; values are read as YAML (``8``, ``0.5``, ``[50]``)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--synthetic {pair!r} is not of the form option=value")
        parsed[key] = yaml.safe_load(value)
    return parsed


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/learn.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", type=Path, action="append", required=True, help="a YAML config; repeatable"
    )
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="training time budget per config (15)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs/learn"),
        help="where each training run's folder is written (runs/learn)",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (0)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data/synthetic"),
        help="where synthetic datasets are cached (data/synthetic)",
    )
    parser.add_argument(
        "--synthetic",
        nargs="+",
        default=[],
        metavar="OPTION=VALUE",
        help="generator options other than the defaults, e.g. train_images=8 (see "
        "training.synthetic.SyntheticOptions); they change the cached dataset's name",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of every config, e.g. --set data.workers=0",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    try:
        args.synthetic = parse_key_values(args.synthetic)
    except ConfigError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's plan and stop
    start = time.perf_counter()
    print(f"command: python benchmarks/learn.py {shlex.join(argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    try:
        results = [run_config(path, args) for path in args.config]
    except (ConfigError, DatasetError) as error:
        print(f"learn.py: error: {error}", file=sys.stderr)
        return 2
    print("\n=== final table ===")
    print("\n".join(final_table(results)))
    print(f"wall time {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
