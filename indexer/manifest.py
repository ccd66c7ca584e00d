"""``manifest.json``: what the FAISS snapshot next to it holds, and durable file replacement."""

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """Describes ``vectors.faiss``.

    ``watermark`` is the last person id the snapshot accounts for: every person with a larger id
    was added after the snapshot and is replayed from SQLite on open.
    """

    fingerprint: str
    dim: int
    metric: str
    index_type: str
    index_params: dict[str, Any]
    watermark: int
    ntotal: int
    version: int = MANIFEST_VERSION


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, or None when it is missing or unreadable (then the snapshot is
    not trusted and the index is rebuilt from SQLite)."""
    try:
        fields = json.loads(path.read_text())
        manifest = Manifest(**fields)
    except (OSError, ValueError, TypeError):
        return None
    return manifest if manifest.version == MANIFEST_VERSION else None


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Replace ``path`` durably by ``manifest`` (see :func:`replace_durably`)."""
    text = json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n"
    replace_durably(path, lambda temporary: temporary.write_text(text))


def replace_durably(path: Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` so that a crash at any moment leaves either the old or the new file.

    ``write`` writes the new content to a temporary file beside ``path``; it is fsynced, renamed
    over ``path`` (atomic on POSIX), and the directory is fsynced so that the rename itself is on
    disk when this returns.
    """
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
