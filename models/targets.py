"""Checks of the training targets every model takes (the contract in ``models/__init__.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_targets(targets: Sequence[dict[str, Tensor]], batch: int) -> None:
    """Raise ValueError unless there is one target per image, each with ``boxes`` (n, 4) and
    ``pids`` (n,) long."""
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    for image, target in enumerate(targets):
        boxes, pids = target.get("boxes"), target.get("pids")
        if boxes is None or pids is None:
            raise ValueError(f"target {image} must hold 'boxes' and 'pids', got {sorted(target)}")
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target {image}: boxes must be (n, 4), got {tuple(boxes.shape)}")
        if pids.shape != (boxes.shape[0],) or pids.dtype != torch.long:
            raise ValueError(
                f"target {image}: pids must be a ({boxes.shape[0]},) long tensor, "
                f"got {tuple(pids.shape)} {pids.dtype}"
            )
