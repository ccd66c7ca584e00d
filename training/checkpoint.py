"""Checkpoints of a training run folder (its layout: ``common/run_folder.py``): weights, the
resolved config and the training state needed to resume exactly.

Each file is replaced durably and atomically (``common.files``), so a crash never leaves a
half-written file. Weights and state record the iteration they belong to; loading checks that
they agree, because a crash between the two renames would otherwise resume from mismatched
halves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from common.files import write_atomically
from common.run_folder import RUN_CONFIG_FILE, RUN_STATE_FILE, RUN_WEIGHTS_FILE
from training.config import TrainConfig, dump_config


class CheckpointError(ValueError):
    """A run folder is missing a file or its files do not belong together."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_weights(model: nn.Module, path: Path, iteration: int | None = None) -> None:
    """Write every parameter and persistent buffer as safetensors.

    The metadata holds the model's config as JSON (``model_config``, when the model has a
    pydantic ``config``) and the training iteration the weights belong to.
    """
    model = unwrap(model)
    metadata = {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_dump_json"):
        metadata["model_config"] = config.model_dump_json()
    if iteration is not None:
        metadata["iteration"] = str(iteration)
    write_atomically(path, lambda tmp: safetensors.torch.save_model(model, str(tmp), metadata))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load weights written by save_weights; every key must match the model's."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        missing, unexpected = safetensors.torch.load_model(unwrap(model), str(path), strict=False)
    except RuntimeError as error:  # shapes differ: torch lists every mismatch, one per line
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise CheckpointError(f"{path}: weights do not fit the model: {details}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_module_weights(model: nn.Module, source: Path, modules: Sequence[str] = ()) -> None:
    """Load the weights of `modules` (module names, prefixes of parameter names; empty = the
    whole model) from `source`, a run folder or a weights file. Every parameter and buffer of
    those modules must be in the file with its shape; the rest of the model is left as it is."""
    path = source / RUN_WEIGHTS_FILE if source.is_dir() else source
    if not path.is_file():
        raise CheckpointError(f"{source}: no weights file (a run folder or a .safetensors file)")
    if not modules:
        load_weights(model, path)
        return
    model = unwrap(model)
    own = model.state_dict()
    wanted = {k for k in own if any(k == m or k.startswith(f"{m}.") for m in modules)}
    unknown = [m for m in modules if not any(k == m or k.startswith(f"{m}.") for k in own)]
    if unknown:
        raise CheckpointError(f"{path}: the model has no modules {unknown} to load")
    loaded = safetensors.torch.load_file(str(path))
    missing = sorted(wanted - set(loaded))
    misshapen = sorted(k for k in wanted & set(loaded) if loaded[k].shape != own[k].shape)
    if missing or misshapen:
        raise CheckpointError(
            f"{path}: weights do not fit modules {list(modules)}: missing {missing[:5]}, "
            f"other shapes {misshapen[:5]}"
        )
    model.load_state_dict({k: loaded[k] for k in wanted}, strict=False)


def weights_iteration(path: Path) -> int | None:
    """The training iteration recorded in a weights file, if any."""
    with safe_open(str(path), framework="pt") as file:
        value = (file.metadata() or {}).get("iteration")
    return int(value) if value is not None else None


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a training step can touch, as plain Python
    values (generator states as bytes): they pass through ``all_gather_object`` and load with
    ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.astype(np.uint32).tobytes(), pos, has_gauss, cached),
        "torch": _tensor_bytes(torch.get_rng_state()),
        "cuda": [_tensor_bytes(state) for state in cuda],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by rng_state (CUDA ones only where CUDA is present)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(cuda) for cuda in state["cuda"]])


def _tensor_bytes(state: torch.Tensor) -> bytes:
    return state.cpu().numpy().tobytes()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def save_checkpoint(
    run_dir: Path, model: nn.Module, config: TrainConfig, state: dict[str, Any]
) -> None:
    """Write the three files of a checkpoint; `state` must hold the global ``iteration``."""
    write_atomically(run_dir / RUN_CONFIG_FILE, lambda tmp: dump_config(config, tmp))
    save_weights(model, run_dir / RUN_WEIGHTS_FILE, iteration=state["iteration"])
    write_atomically(run_dir / RUN_STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_state(run_dir: Path) -> dict[str, Any]:
    """The training state of a run folder, checked against its weights file."""
    weights, state_path = run_dir / RUN_WEIGHTS_FILE, run_dir / RUN_STATE_FILE
    for path in (weights, state_path):
        if not path.is_file():
            raise CheckpointError(f"{run_dir}: no {path.name}; is it a run folder?")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if weights_iteration(weights) != state["iteration"]:
        raise CheckpointError(
            f"{run_dir}: {RUN_WEIGHTS_FILE} (iteration {weights_iteration(weights)}) and "
            f"{RUN_STATE_FILE} (iteration {state['iteration']}) come from different moments of "
            "training"
        )
    return state
