"""Synthetic datasets cached on disk, named by what they hold.

A dataset lives in ``DATA_DIR/<format>-seed<S>-<hash>``, the hash taken over the generator's
options and its source code (:func:`~training.synthetic.generate.generator_fingerprint`): two
datasets never share a folder, and a changed generator never reuses what an older one wrote. A
dataset is generated into a temporary sibling folder and renamed when complete, with a marker
file written last, so an interrupted run leaves no half dataset under the cached name. The demo
and ``benchmarks/learn.py`` both take their data from here.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

from training.synthetic.generate import Summary, generate, generator_fingerprint, make_options

COMPLETE_MARKER = "SYNTHETIC.txt"  # written last: a folder without it is an unfinished dataset


class CachedDataset(NamedTuple):
    """A cached dataset's ``root``, and the :class:`Summary` of what was ``generated`` now
    (None when an earlier run's copy was reused)."""

    root: Path
    generated: Summary | None


def dataset_options(format: str, **overrides: Any) -> dict[str, Any]:
    """The generator's options for ``format`` (its defaults, then ``overrides``) as plain data,
    without how progress is shown (it does not change what is written). Raises ValueError for an
    unknown format or option."""
    options = dataclasses.asdict(make_options(format, **overrides))
    options.pop("progress")
    return options


def dataset_folder(
    data_dir: str | PathLike, format: str, seed: int, options: dict[str, Any]
) -> Path:
    """Where the dataset of (``format``, ``seed``, ``options``) is cached."""
    key = {**options, "generator": generator_fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(data_dir) / f"{format}-seed{seed}-{digest}"


def cached_dataset(
    data_dir: str | PathLike, format: str, seed: int = 0, **overrides: Any
) -> CachedDataset:
    """The synthetic dataset of ``format`` with ``overrides`` of the generator's options,
    generated unless a complete copy is cached under ``data_dir``."""
    progress = overrides.pop("progress", True)
    options = dataset_options(format, **overrides)
    root = dataset_folder(data_dir, format, seed, options)
    if (root / COMPLETE_MARKER).is_file():
        return CachedDataset(root, None)
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    summary = generate(format, partial, seed=seed, progress=progress, **options)
    (partial / COMPLETE_MARKER).write_text(f"{summary}\noptions {json.dumps(options)}\n")
    shutil.rmtree(root, ignore_errors=True)  # an unfinished copy from an older run, if any
    partial.rename(root)
    return CachedDataset(root, summary)
