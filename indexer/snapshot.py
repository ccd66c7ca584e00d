"""``manifest.json`` of a gallery: what the FAISS snapshot ``vectors.faiss`` next to it holds."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import write_text_atomically

SNAPSHOT_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SnapshotManifest:
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
    version: int = SNAPSHOT_MANIFEST_VERSION


def read_snapshot_manifest(path: Path) -> SnapshotManifest | None:
    """The manifest at ``path``, or None when it is missing or unreadable (then the snapshot is
    not trusted and the index is rebuilt from SQLite)."""
    try:
        fields = json.loads(path.read_text())
        manifest = SnapshotManifest(**fields)
    except (OSError, ValueError, TypeError):
        return None
    return manifest if manifest.version == SNAPSHOT_MANIFEST_VERSION else None


def write_snapshot_manifest(path: Path, manifest: SnapshotManifest) -> None:
    """Replace ``path`` durably and atomically by ``manifest``."""
    write_text_atomically(path, json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
