"""``python -m demo.ship``: train, measure and ship the demo's model (``demo/model/``).

::

    python -m demo.ship [--minutes 20] [--config configs/tiny/alignps_synthetic.yaml]
                        [--seed 0] [--data-dir data/demo] [--out demo/model]

It trains the config on the demo's synthetic data (the same data ``make demo`` generates) for
the budget, exports the run to an ONNX model folder (checked against PyTorch), scores it on the
test split twice (the search protocol, and the demo's own check through the HTTP API), records
its answer to a probe frame, and writes the folder with its card (``demo/shipped.py``) in place
of ``--out``. Take the figures on an idle machine: the card records the machine's load.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from demo.build import DATASET_FORMAT, DemoModel, synthetic_dataset, training_config
from demo.cli import run_demo
from demo.options import DEFAULT_CONFIG, REPOSITORY, DemoOptions, Stage, log
from demo.shipped import CARD_FILE, CARD_MARKDOWN, PROBE_FILE, SHIPPED_DIR, probe_answer
from export.artifact import load_model, read_model_manifest
from export.cli import export_checkpoint
from models import build_model
from training.config import TrainConfig
from training.datasets import load_dataset
from training.inference import evaluate_model, load_test_split
from training.synthetic import generator_fingerprint
from training.trainer import Trainer

DEFAULT_SHIP_MINUTES = 20.0
FIGURES = ("mAP", "top1", "top5", "cross_camera_mAP", "cross_camera_top1", "det_ap", "det_recall")


def machine() -> dict[str, Any]:
    """What trained the model: processor, cores, torch and the load when asked."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def commit() -> str:
    """The repository's commit (with '+changes' when the tree differs from it)."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True)
        return result.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def train(options: DemoOptions, data_root: Path, run_dir: Path) -> dict[str, Any]:
    """Train the demo's config within the budget in a fresh run folder; what the run did."""
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    trainer = Trainer(training_config(options, data_root, run_dir), build_model)
    trainer.run()
    return {
        "iterations": trainer.iteration,
        "epochs": round(trainer.iteration / len(trainer.loader), 2),
        "train_seconds": round(trainer.train_seconds, 1),
        "stopped_by": trainer.stopped_by,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def protocol_figures(model_dir: Path, run_config: TrainConfig) -> dict[str, float]:
    """The search protocol's figures of the exported model on the demo's test split."""
    model = load_model(model_dir)
    metrics = evaluate_model(model, run_config, torch.device("cpu"), load_test_split(run_config))
    return {key: round(metrics[key], 4) for key in FIGURES if key in metrics}


def markdown(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the card in words."""
    figures = card["figures"]
    rows = "\n".join(f"| {name} | {100 * value:.2f} |" for name, value in figures.items())
    training, host = card["training"], card["machine"]
    return f"""# The demo's model

A tiny {card["model"]} that psearch trained itself on the demo's synthetic data, so that
`make demo` serves a good search at once. It is not a model for real images.

- Made by: `{card["command"]}` at commit {card["commit"]} on {card["date"]}
- Config: `{card["config"]}` with seed {card["seed"]}; data: synthetic PRW format, seed
  {card["data"]["seed"]}, the generator's default options (generator {card["data"]["generator"]})
- Training: {training["iterations"]} iterations ({training["epochs"]} epochs) in
  {training["train_seconds"]:.0f} s within a budget of {card["minutes"]:g} min, stopped by
  {training["stopped_by"]}
- Machine: {host["processor"]}, {host["cpus"]} CPUs, torch {host["torch"]} on
  {host["threads"]} threads; load average {training["load_average_before"]:.2f} before and
  {training["load_average_after"]:.2f} after training
- Fingerprint: `{card["fingerprint"]}`

On the synthetic test split ({card["queries"]} queries, PRW protocol at detection threshold
{card["det_thresh"]:g}, percent):

| figure | value |
|---|---|
{rows}

Through the HTTP API, as the demo checks it: the top hit was the query's person for
{card["api"]["right"]} of {card["api"]["queries"]} queries (top-1 {100 * card["api"]["top1"]:.2f}).

`card.json` holds the same and the model's answer to `{PROBE_FILE}`, which the demo and the
tests compare with today's code (`demo/shipped.py`).
"""


def ship(options: DemoOptions, out: Path, argv: Sequence[str]) -> dict[str, Any]:
    """Train, export, measure and write the model folder with its card to `out`."""
    data_root = synthetic_dataset(options, Stage("data"))
    staging = out.with_name(f".{out.name}.partial")
    run_dir = options.data_dir / "ship-run"
    log(f"training {options.config.name} for {options.minutes:g} min in {run_dir}")
    training = train(options, data_root, run_dir)
    shutil.rmtree(staging, ignore_errors=True)
    manifest, report = export_checkpoint(run_dir, staging, parity=True, log=log)
    if report is not None and not report.passed:
        raise SystemExit(f"the export does not reproduce the model; see {staging}")
    run_config = training_config(options, data_root, run_dir)
    split = load_dataset(DATASET_FORMAT, data_root, "test")
    shutil.copyfile(split.images[0].path, staging / PROBE_FILE)
    result = run_demo(options, DemoModel(staging, run_config.eval.det_thresh))
    assert result is not None  # an in-process check always ends
    card = {
        "model": manifest.name,
        "config": str(options.config.relative_to(REPOSITORY)),
        "seed": options.seed,
        "minutes": options.minutes,
        "command": shlex.join(["python", "-m", "demo.ship", *argv]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "training": training,
        "data": {"seed": options.seed, "generator": generator_fingerprint()},
        "det_thresh": run_config.eval.det_thresh,
        "queries": len(split.queries),
        "figures": protocol_figures(staging, run_config),
        "api": {
            "right": result.right,
            "queries": len(result.outcomes),
            "top1": round(result.right / max(len(result.outcomes), 1), 4),
        },
        "fingerprint": read_model_manifest(staging).fingerprint,
        "probe": probe_answer(staging),
    }
    (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (staging / CARD_MARKDOWN).write_text(markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m demo.ship", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--minutes", type=float, default=DEFAULT_SHIP_MINUTES, help="training budget (%(default)g)"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="tiny model config")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (0)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data/demo"), help="the demo's cache (data/demo)"
    )
    parser.add_argument(
        "--out", type=Path, default=SHIPPED_DIR, help="the model folder to write (demo/model)"
    )
    args = parser.parse_args(argv)
    options = DemoOptions(
        data_dir=args.data_dir,
        config=args.config.resolve(),
        seed=args.seed,
        minutes=args.minutes,
        serve=False,
    )
    card = ship(options, args.out, argv)
    log(f"shipped {args.out}: API top-1 {card['api']['top1']:.2%}, figures {card['figures']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
