"""``psearch-train``: train a model from a YAML config (``python -m training`` is the same).

::

    psearch-train --config configs/alignps_r50_prw.yaml [--set optim.lr=0.002] [--output RUN_DIR]
    psearch-train --resume RUN_DIR [--set schedule.epochs=30 ...]

A config with ``phases`` trains them one after the other from the one command
(``training.phases``); ``--resume`` continues whichever phase was interrupted.
    torchrun --nproc_per_node 4 -m training --config ...

Mistakes a user can fix (a config typo, a missing file, a wrong data root) end the program with
a one-line message and exit status 2, without a traceback. An interrupted run (Ctrl-C, SIGTERM)
saves a checkpoint first and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from common.config_files import add_overrides_argument
from common.run_folder import RUN_CONFIG_FILE, RUN_STATE_FILE
from training.checkpoint import CheckpointError
from training.config import ConfigError, TrainConfig, load_config
from training.datasets import DatasetError
from training.phases import PHASES_FILE, train_phases
from training.trainer import ModelBuilder, TrainingInterrupted, format_metrics, train

USER_ERROR = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="psearch-train", description="Train a person search model from a YAML config."
    )
    parser.add_argument(
        "--config", type=Path, help="YAML config (default with --resume: the run's own)."
    )
    add_overrides_argument(parser, "a config field", "optim.lr=0.002")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a saved run")
    parser.add_argument(
        "--output", type=Path, metavar="RUN_DIR", help="the run folder (output_dir)"
    )
    args = parser.parse_args(argv)
    if args.config is None and args.resume is None:
        parser.error("one of --config or --resume is required")
    return args


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The config of this run: the file (or the resumed run's), overrides, then the run folder."""
    if args.resume is not None:
        if args.output is not None and args.output.resolve() != args.resume.resolve():
            raise ConfigError("--output must be left out or equal --resume: a run resumes in place")
        config = load_config(args.config or saved_config(args.resume), args.overrides)
        config.output_dir = args.resume
        return config
    config = load_config(args.config, args.overrides)
    if args.output is not None:
        config.output_dir = args.output
    if (config.output_dir / RUN_STATE_FILE).exists() or (config.output_dir / PHASES_FILE).exists():
        raise ConfigError(
            f"{config.output_dir} already holds a checkpoint; pass --resume {config.output_dir} "
            "to continue it, or choose another --output"
        )
    return config


def saved_config(run_dir: Path) -> Path:
    """The config a run folder was started with: the phased config of a run in phases."""
    phases = run_dir / PHASES_FILE
    return phases if phases.is_file() else run_dir / RUN_CONFIG_FILE


def default_model_builder() -> ModelBuilder:
    from models import build_model

    return build_model


def main(argv: Sequence[str] | None = None, build_model: ModelBuilder | None = None) -> int:
    """Run the command line; returns the exit status. `build_model` defaults to
    ``models.build_model``."""
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    try:
        config = resolve_config(args)
        run = train_phases if config.phases else train
        metrics = run(
            config, build_model or default_model_builder(), resume=args.resume is not None
        )
    except (ConfigError, DatasetError, CheckpointError) as error:
        print(f"psearch-train: error: {error}", file=sys.stderr)
        return USER_ERROR
    except TrainingInterrupted as interrupted:
        print(
            f"psearch-train: {interrupted}; continue with --resume {interrupted.run_dir}",
            file=sys.stderr,
        )
        return 128 + interrupted.signum
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if is_main and metrics:
        print(f"final metrics: {format_metrics(metrics)}")
    return 0
