"""Training in phases from one config: a detector first, then a re-id network beside the frozen
detector, say, each phase a complete run of the trainer in its own folder.

::

    RUN_DIR/
        phases.yaml          the phased config, as given (``--resume RUN_DIR`` reads it)
        <phase 1>/           a run folder (model.safetensors, config.yaml, state.pt, ...)
        <phase 2>/           ... started from <phase 1>'s weights where it says so
        model.safetensors    the last phase's weights and resolved config, once it has
        config.yaml          finished: RUN_DIR exports like any run folder

A phase's config is the base config with the phase's ``overrides`` merged in (nested mappings
key by key), its own folder, its starting weights (an earlier phase's, all or some modules; the
first phase takes the base ``init``), the base ``freeze`` plus its own, and its share of the base
time budget. A phase that finished leaves ``phase-done.json`` in its folder; resuming skips it,
continues the phase that was interrupted, and starts the ones after.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from common.files import write_atomically, write_text_atomically
from common.run_folder import RUN_CONFIG_FILE, RUN_STATE_FILE, RUN_WEIGHTS_FILE
from training.config import ConfigError, InitConfig, TrainConfig, dump_config, validate_config
from training.trainer import ModelBuilder, Trainer

PHASES_FILE = "phases.yaml"
DONE_FILE = "phase-done.json"


def merge_sections(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: nested mappings key by key, other values replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


def budget_shares(config: TrainConfig) -> list[float]:
    """Each phase's share of the time budget: its own, or an equal part of what the others
    leave."""
    given = [phase.budget_share for phase in config.phases]
    unset = given.count(None)
    rest = (1 - sum(share for share in given if share is not None)) / max(unset, 1)
    return [share if share is not None else rest for share in given]


def phase_config(config: TrainConfig, index: int) -> TrainConfig:
    """The resolved config of phase `index` of a phased config."""
    phase = config.phases[index]
    schedule = phase.overrides.get("schedule", {})
    if isinstance(schedule, dict) and "max_minutes" in schedule:
        raise ConfigError(
            f"phases: {phase.name!r} sets schedule.max_minutes; give it a budget_share of the "
            "base schedule.max_minutes instead"
        )
    base = config.model_dump(mode="json", exclude={"phases", "init", "freeze"})
    data = merge_sections(base, phase.overrides)
    resolved = validate_config(data, f"phases.{phase.name}")
    run_dir = Path(config.output_dir)
    if phase.init_from is not None:
        init = InitConfig(weights=run_dir / phase.init_from, modules=phase.init_modules)
    else:
        init = config.init if index == 0 else None
    budget = config.schedule.max_minutes
    if budget is not None:
        resolved.schedule.max_minutes = budget * budget_shares(config)[index]
    resolved.output_dir = run_dir / phase.name
    resolved.init = init
    resolved.freeze = [*config.freeze, *phase.freeze]
    return resolved


def train_phases(
    config: TrainConfig, build_model: ModelBuilder, resume: bool = False
) -> dict[str, float]:
    """Train every phase in order (on resume: skip the finished ones, continue the interrupted
    one); returns the last phase's final metrics."""
    run_dir = Path(config.output_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes
    if is_main and not resume:
        write_atomically(run_dir / PHASES_FILE, lambda tmp: dump_config(config, tmp))
    metrics: dict[str, float] = {}
    for index in range(len(config.phases)):
        phase_run = phase_config(config, index)
        done = phase_run.output_dir / DONE_FILE
        if done.is_file():
            metrics = json.loads(done.read_text())["metrics"]
            continue
        started = (phase_run.output_dir / RUN_STATE_FILE).is_file()
        trainer = Trainer(phase_run, build_model, resume=started)
        metrics = trainer.run()
        if is_main:
            record = {"iteration": trainer.iteration, "stopped_by": trainer.stopped_by}
            _write_json(done, record | {"metrics": metrics})
    if is_main:
        last = run_dir / config.phases[-1].name
        for name in (RUN_WEIGHTS_FILE, RUN_CONFIG_FILE):
            write_atomically(
                run_dir / name, lambda tmp, name=name: shutil.copyfile(last / name, tmp)
            )
    return metrics


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")
