"""Proof that models learn: train tiny configs on synthetic data for a wall-clock budget, and
score each next to the same model before training and a reference that sees the true boxes, in
one run.

    python benchmarks/learn.py --config configs/tiny/alignps_synthetic.yaml \\
        [--config configs/tiny/leaps_synthetic.yaml ...] [--minutes 20] [--seeds 0 [1 2]] \\
        [--threads 2] [--reference-minutes 5] [--data-seed 0] [--data-dir data/synthetic] \\
        [--synthetic KEY=VALUE ...] [--set KEY=VALUE ...] [--runs-dir runs/learn] \\
        [--record-spread]

For each config: the synthetic dataset in the config's format (``data.dataset``: prw, cuhk_sysu
or crowdhuman) is generated, or taken from the cache folder
``--data-dir/<format>-seed<S>-<hash of the options and the generator>``. The benchmark's PRW test
split is larger than the generator's default (300 identities in 900 frames: 300 queries), so
that one query is a third of a point of top-1. The model is built with the config's seed and
scored on the held-out test split (its identities are disjoint from the training ones) before
training; it is then trained by the trainer (``training.trainer.Trainer``, as ``psearch-train``
does) with a time budget of ``--minutes`` (``schedule.max_minutes``: the trainer plans the
iterations that fit, with the warmup and the milestones at the same fractions, and stops when
the budget is spent), once per ``--seeds`` value, and scored again.

Person search configs report mAP and top-1 over all cameras and across cameras (PRW protocol,
at each config's own detection threshold), and detection AP and recall over every detection
scored >= 0.05, the same floor for every model, so that detectors are compared like for like.
Detector configs (CrowdHuman format) report MR^-2, AP and recall. The reference row of each
person search dataset is a plain CNN trained for ``--reference-minutes`` on ground-truth crops
and scored with the true boxes as detections (``benchmarks/reference.py``): the re-id ceiling
of the data for a model of that size, with perfect detection.

The spread between repeated runs is measured once, with ``--seeds 0 1 2 --record-spread``
(written to ``benchmarks/learn_spread.json``), and printed with every table: a difference
between two configs counts only where it exceeds that spread. The targets printed beside the
search figures: mAP >= 60 %, top-1 >= 80 % (all cameras), and the orderings the papers report
(LEAPS >= AlignPS, PS-ARM >= SeqNet, the decoupled model >= its SeqNet baseline) for the configs
of the run. A script, not a test: the figures depend on the machine (how many iterations fit in
the budget) and nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import statistics
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

from benchmarks.reference import evaluate_reference, train_reference
from common.config_files import ConfigFileError, add_overrides_argument, apply_overrides
from common.run_folder import RUN_WEIGHTS_FILE
from models import build_model
from training.checkpoint import load_weights
from training.config import ConfigError, TrainConfig, load_config
from training.data import load_split
from training.datasets import DatasetError, PersonSearchSplit
from training.evaluation import evaluate_detections
from training.inference import (
    DETECTION_ONLY_DATASETS,
    InferenceSettings,
    evaluate_model,
    load_test_split,
    predict_split,
    score_predictions,
)
from training.synthetic import cached_dataset
from training.trainer import (
    ProcessGroup,
    Trainer,
    build_model_checked,
    seed_everything,
    select_device,
)

SPREAD_FILE = Path(__file__).with_name("learn_spread.json")

# The benchmark's test split, where it differs from the generator's defaults: 300 queries.
BENCHMARK_OPTIONS: dict[str, dict[str, Any]] = {
    "prw": {"test_identities": 300, "test_images": 900},
}
DETECTION_FLOOR = 0.05  # detection AP and recall of every search model over scores >= this

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
SEARCH_TARGETS = {"mAP": 0.60, "top1": 0.80}  # all-camera protocol, the one papers quote first
SPREAD_METRICS = ("mAP", "top1")
# (model name, model name, the claim): the first should reach at least the second's mAP.
PAPER_ORDERINGS = [
    ("leaps", "alignps", "LEAPS >= AlignPS (PRW mAP 55.0 vs 45.9 in the papers)"),
    ("psarm", "seqnet", "PS-ARM >= SeqNet (PS-ARM Table 1)"),
    ("decoupled", "seqnet", "decoupled >= its two-stage baseline (its paper's claim)"),
]


def log(line: str) -> None:
    """Print a progress line now (a run takes minutes; the lines should not wait in a buffer)."""
    print(line, flush=True)


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
    iterations of the config that fit and stops when the budget is spent. The run folder keeps
    the checkpoint (weights, config, state) for ``psearch-export`` or ``--resume``."""
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


# --- scoring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    seconds: float


def benchmark_metrics(
    model: nn.Module, config: TrainConfig, device: torch.device, split: PersonSearchSplit
) -> dict[str, float]:
    """The trainer's metrics, except that a person search model's detection AP and recall are
    taken over every detection scored >= DETECTION_FLOOR rather than at its own threshold, so
    that models with different thresholds are compared like for like."""
    if split.dataset in DETECTION_ONLY_DATASETS:
        return evaluate_model(model, config, device, split)
    floor = min(DETECTION_FLOOR, config.eval.det_thresh)
    settings = InferenceSettings(device=device, batch_size=config.eval.batch_size)
    was_training = model.training
    model.eval()
    try:
        predictions = predict_split(model, split, floor, config.eval.query_mode, settings)
    finally:
        model.train(was_training)
    assert predictions is not None  # one process
    metrics = score_predictions(split, predictions, config.eval)
    detection = evaluate_detections(split.images, predictions.detections, DETECTION_FLOOR)
    return metrics | {"det_ap": detection.average_precision, "det_recall": detection.recall}


def evaluate_timed(
    model: nn.Module, config: TrainConfig, device: torch.device, split: PersonSearchSplit
) -> Evaluation:
    """The model's metrics on `split` and how long they took to compute."""
    start = time.perf_counter()
    metrics = benchmark_metrics(model, config, device, split)
    return Evaluation(metrics, time.perf_counter() - start)


# --- one config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedRun:
    """One seed's training of a config and the trained model's scores."""

    seed: int
    training: TrainingRecord
    trained: Evaluation


@dataclass(frozen=True)
class ConfigResult:
    """Everything one config's runs measured: the untrained model (first seed) and each seed's
    trained model."""

    config_path: Path
    model_name: str
    dataset: str
    data_root: Path
    parameters: int
    untrained: Evaluation
    runs: list[TrainedRun]

    @property
    def is_search(self) -> bool:
        return "mAP" in self.untrained.metrics

    def mean(self, key: str) -> float:
        """A trained metric's mean over the seeds."""
        return statistics.fmean(run.trained.metrics[key] for run in self.runs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_config(config_path: Path, args: argparse.Namespace) -> ConfigResult:
    """Generate (or reuse) the data, score the untrained model, then per seed train it and score
    it again."""
    config = load_config(config_path, args.overrides)
    log(f"\n=== {config_path} ===")
    try:
        root, generated = cached_dataset(
            args.data_dir, config.data.dataset, args.data_seed, **benchmark_options(config, args)
        )
    except ValueError as error:  # a format without a generator, an unknown option
        raise ConfigError(f"synthetic data of {config.data.dataset!r}: {error}") from None
    log(f"data: {root} ({'generated now' if generated else 'cached'})")
    config.data.root = root
    log("config (resolved):")
    log(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())

    device = select_device(config, ProcessGroup())
    test_split = load_test_split(config)
    runs, untrained, parameters = [], None, 0
    for seed in args.seeds:
        config.seed = seed
        seed_everything(seed)  # the initial weights the trainer builds from the same seed
        model = build_model_checked(build_model, config.model).to(device)
        parameters = count_parameters(model)
        if untrained is None:
            log(f"model: {type(model).__name__}, {parameters:,} parameters, on {device}")
            untrained = evaluate_timed(model, config, device, test_split)
            log(f"untrained ({untrained.seconds:.1f} s): {format_metrics(untrained.metrics)}")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = args.runs_dir / f"{config_path.stem}-seed{seed}-{stamp}"
        training = train_within_budget(config, args.minutes, run_dir)
        for which, losses in (("first", training.first_losses), ("last", training.last_losses)):
            if losses:
                log(f"loss, {which} {config.log_every} iterations: {format_losses(losses)}")
        log(
            f"seed {seed}: trained {training.iterations} of {training.planned_iterations} "
            f"planned iterations ({training.epochs:.2f} epochs) in {training.seconds:.1f} s; "
            f"stopped by {training.stopped_by}"
        )
        trained = evaluate_timed(load_trained(run_dir, config, device), config, device, test_split)
        log(f"trained ({trained.seconds:.1f} s): {format_metrics(trained.metrics)}")
        runs.append(TrainedRun(seed, training, trained))
    assert untrained is not None  # at least one seed
    return ConfigResult(
        config_path,
        str(config.model.get("name")),
        config.data.dataset,
        root,
        parameters,
        untrained,
        runs,
    )


def benchmark_options(config: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The generator options of the config's dataset: the benchmark's, then ``--synthetic``."""
    return {**BENCHMARK_OPTIONS.get(config.data.dataset, {}), **args.synthetic}


def load_trained(run_dir: Path, config: TrainConfig, device: torch.device) -> nn.Module:
    """The model with the weights of the run's last checkpoint."""
    model = build_model_checked(build_model, config.model).to(device)
    load_weights(model, run_dir / RUN_WEIGHTS_FILE)
    return model


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


@dataclass(frozen=True)
class ReferenceResult:
    """The ground-truth-crop reference of one dataset."""

    data_root: Path
    iterations: int
    evaluation: Evaluation


def run_reference(result: ConfigResult, args: argparse.Namespace) -> ReferenceResult:
    """Train and score the reference CNN on a person search config's data."""
    config = load_config(result.config_path, args.overrides)
    config.data.root = result.data_root
    train = load_split(config.data, config.data.train_split)
    log(f"\n=== reference: a plain CNN on ground-truth crops of {result.data_root} ===")
    start = time.perf_counter()
    model, iterations = train_reference(train, args.reference_minutes, seed=args.seeds[0])
    log(f"reference: {iterations} iterations in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    metrics = evaluate_reference(model, load_test_split(config))
    evaluation = Evaluation(metrics, time.perf_counter() - start)
    log(f"reference: {format_metrics(metrics)}")
    return ReferenceResult(result.data_root, iterations, evaluation)


# --- the spread between repeated runs -----------------------------------------------------


def measured_spread(result: ConfigResult) -> dict[str, float]:
    """max - min over the seeds of each spread metric."""
    values = {key: [run.trained.metrics[key] for run in result.runs] for key in SPREAD_METRICS}
    return {key: max(v) - min(v) for key, v in values.items()}


def spread_record(result: ConfigResult, argv: Sequence[str], minutes: float) -> dict[str, Any]:
    """What --record-spread writes: the spread and how it was measured."""
    return {
        "config": result.config_path.name,
        "seeds": [run.seed for run in result.runs],
        "minutes": minutes,
        "runs": [
            {key: run.trained.metrics[key] for key in SPREAD_METRICS} | {"seed": run.seed}
            for run in result.runs
        ],
        "spread": measured_spread(result),
        "command": f"python benchmarks/learn.py {shlex.join(argv)}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }


def read_spread(path: Path) -> dict[str, Any] | None:
    """The recorded spread, or None when none was recorded."""
    return json.loads(path.read_text()) if path.is_file() else None


def describe_spread(record: dict[str, Any] | None) -> str:
    if record is None:
        return "spread between repeated runs: not measured (run with --seeds 0 1 2 --record-spread)"
    spread = record["spread"]
    return (
        f"spread between repeated runs (max - min of {record['config']} over seeds "
        f"{record['seeds']}, {record['minutes']:g} min each, measured {record['date']}): "
        f"mAP {100 * spread['mAP']:.2f}, top-1 {100 * spread['top1']:.2f} points"
    )


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


def metrics_table(
    results: Sequence[ConfigResult],
    columns: list[tuple[str, str]],
    references: Sequence[ReferenceResult] = (),
) -> list[str]:
    """Rows per config: untrained, trained (per seed, and their mean with several), in percent;
    then the reference rows. Columns that some result lacks (CUHK-SYSU has no cross-camera
    protocol) are left out."""
    columns = [
        (key, title) for key, title in columns if all(key in r.untrained.metrics for r in results)
    ]
    name_width = max(len(r.config_path.name) for r in results) + 2
    header = f"{'config':<{name_width}}{'model':<15}" + "".join(f"{t:>10}" for _, t in columns)
    lines = [header + f"{'iters':>8}{'train s':>9}"]

    def row(name: str, state: str, metrics: dict[str, float], iters: int, seconds: float) -> str:
        cells = "".join(
            f"{100 * metrics[key]:>10.2f}" if key in metrics else f"{'-':>10}" for key, _ in columns
        )
        return f"{name:<{name_width}}{state:<15}{cells}{iters:>8}{seconds:>9.0f}"

    for result in results:
        name = result.config_path.name
        lines.append(row(name, "untrained", result.untrained.metrics, 0, 0.0))
        for run in result.runs:
            state = "trained" if len(result.runs) == 1 else f"trained s{run.seed}"
            training = run.training
            lines.append(
                row(name, state, run.trained.metrics, training.iterations, training.seconds)
            )
        if len(result.runs) > 1:
            means = {key: result.mean(key) for key, _ in columns}
            lines.append(row(name, "trained mean", means, 0, 0.0))
    for reference in references:
        metrics = {k: v for k, v in reference.evaluation.metrics.items() if not k.startswith("det")}
        lines.append(row("reference", "GT crops", metrics, reference.iterations, 0.0))
    return lines


def search_verdicts(result: ConfigResult) -> list[str]:
    """One line per target: the value (the mean over seeds), the target and whether it is met."""
    titles = dict(SEARCH_METRICS)
    lines = []
    for key, target in SEARCH_TARGETS.items():
        value = result.mean(key)
        met = "yes" if value >= target else "NO"
        lines.append(f"{titles[key]} {100 * value:.2f} >= {100 * target:.0f}: {met}")
    return [f"  {result.config_path.name}: {line}" for line in lines]


def ordering_verdicts(results: Sequence[ConfigResult], spread: dict[str, Any] | None) -> list[str]:
    """The papers' orderings among the configs of the run: whether each holds on mAP, and
    whether the difference exceeds the measured spread."""
    lines = []
    by_model = {r.model_name: r for r in results if r.is_search}
    for better, worse, claim in PAPER_ORDERINGS:
        if better not in by_model or worse not in by_model:
            continue
        difference = by_model[better].mean("mAP") - by_model[worse].mean("mAP")
        holds = "yes" if difference >= 0 else "NO"
        if spread is None:
            beyond = "spread not measured"
        else:
            exceeds = abs(difference) > spread["spread"]["mAP"]
            beyond = "beyond" if exceeds else "within"
            beyond += f" the spread of {100 * spread['spread']['mAP']:.2f}"
        lines.append(f"  {claim}: {holds} (mAP difference {100 * difference:+.2f}, {beyond})")
    return lines


def run_summary(result: ConfigResult) -> list[str]:
    lines = []
    for run in result.runs:
        training = run.training
        lines.append(
            f"{result.config_path.name}, seed {run.seed}: {result.dataset} data in "
            f"{result.data_root}, {result.parameters:,} parameters, {training.iterations} "
            f"iterations ({training.epochs:.2f} epochs) in {training.seconds:.0f} s, stopped by "
            f"{training.stopped_by}; evaluation {run.trained.seconds:.0f} s"
        )
    return lines


def final_table(
    results: Sequence[ConfigResult],
    references: Sequence[ReferenceResult] = (),
    spread: dict[str, Any] | None = None,
) -> list[str]:
    """What each run did, then the search table with its targets, orderings and spread, and the
    detection table (each if any)."""
    lines = [line for result in results for line in run_summary(result)] + [""]
    search = [r for r in results if r.is_search]
    detection = [r for r in results if not r.is_search]
    if search:
        lines += [
            "person search (PRW protocol at each config's det_thresh; cc = cross-camera; det AP "
            f"and recall over detections scored >= {DETECTION_FLOOR}; percent)"
        ]
        lines += metrics_table(search, SEARCH_METRICS, references)
        titles = dict(SEARCH_METRICS)
        targets = ", ".join(f"{titles[k]} >= {100 * v:.0f}" for k, v in SEARCH_TARGETS.items())
        lines += [f"targets (all cameras): {targets}"]
        for result in search:
            lines += search_verdicts(result)
        orderings = ordering_verdicts(search, spread)
        if orderings:
            lines += ["orderings of the papers:", *orderings]
        lines += [describe_spread(spread)]
    if detection:
        lines += [""] * bool(search)
        lines += ["pedestrian detection (CrowdHuman protocol; MR^-2 lower is better; percent)"]
        lines += metrics_table(detection, DETECTION_METRICS)
    return lines


# --- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/learn.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", type=Path, action="append", required=True, help="a YAML config; repeatable"
    )
    parser.add_argument(
        "--minutes", type=float, default=20.0, help="training time budget per run (20)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds: each config is trained once per seed (0)",
    )
    parser.add_argument(
        "--reference-minutes",
        type=float,
        default=5.0,
        help="training time of the ground-truth-crop reference per dataset; 0 = none (5)",
    )
    parser.add_argument(
        "--record-spread",
        action="store_true",
        help=f"write the spread of the first config over the seeds to {SPREAD_FILE.name}",
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
        help="generator options other than the benchmark's, e.g. train_images=8 (see "
        "training.synthetic.SyntheticOptions); they change the cached dataset's name",
    )
    add_overrides_argument(parser, "a field of every config", "data.workers=0")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.reference_minutes < 0:
        parser.error("--reference-minutes must be >= 0")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.record_spread and len(args.seeds) < 2:
        parser.error("--record-spread needs at least two --seeds")
    try:
        args.synthetic = apply_overrides({}, args.synthetic)
    except ConfigFileError as error:
        parser.error(f"--synthetic: {error}")
    return args


def references_for(
    results: Sequence[ConfigResult], args: argparse.Namespace
) -> list[ReferenceResult]:
    """One reference per person search dataset of the run (none with --reference-minutes 0)."""
    if args.reference_minutes == 0:
        return []
    first_per_root: dict[Path, ConfigResult] = {}
    for result in results:
        if result.is_search:
            first_per_root.setdefault(result.data_root, result)
    return [run_reference(result, args) for result in first_per_root.values()]


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
        references = references_for(results, args)
    except (ConfigError, DatasetError) as error:
        print(f"learn.py: error: {error}", file=sys.stderr)
        return 2
    if args.record_spread:
        SPREAD_FILE.write_text(json.dumps(spread_record(results[0], argv, args.minutes), indent=2))
        print(f"spread written to {SPREAD_FILE}")
    print("\n=== final table ===")
    print("\n".join(final_table(results, references, read_spread(SPREAD_FILE))))
    print(f"wall time {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
