"""The files a gallery keeps: the bytes of images that were uploaded (``NewImage.keep_file``),
so that they can be served back. Images indexed from a path are not copied; their files stay
where they are.

Files are kept in the gallery folder as ``files/<sha256[:2]>/<sha256>`` (two levels, so that no
folder grows to millions of entries), written durably and atomically (``common.files``), the
same bytes once. Their life follows the image rows that reference them, and only the gallery
(``indexer/store.py``) writes and removes them, under its write lock: a file is written before
the transaction that adds its image commits, and removed after the one that removes its image
commits. A crash between the two leaves a file without a row (never a row without its file),
and temporary files of interrupted writes; :meth:`ImageFiles.sweep` removes both.
"""

import os
from collections.abc import Callable
from pathlib import Path

from common.files import remove_leftover_temporaries_in, write_bytes_atomically

FILES_FOLDER = "files"
_HEX = frozenset("0123456789abcdef")


class ImageFiles:
    """Image files by SHA-256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the file with this hash is (or would be) kept."""
        if not _is_sha256(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def save(self, sha256: str, data: bytes) -> Path:
        """Keep ``data`` (whose hash the caller computed) unless already kept."""
        target = self.path(sha256)
        if not target.exists():
            write_bytes_atomically(target, data)
        return target

    def find(self, sha256: str) -> Path | None:
        """The kept file with this hash, or None."""
        target = self.path(sha256)
        return target if target.is_file() else None

    def remove(self, sha256: str) -> None:
        """Forget the file with this hash (nothing if none)."""
        self.path(sha256).unlink(missing_ok=True)

    def sweep(self, referenced: Callable[[list[str]], set[str]]) -> int:
        """Remove the temporary files of interrupted writes, and the kept files whose hash
        ``referenced(hashes)`` (the subset of ``hashes`` that image rows reference) leaves out;
        returns how many files were removed. Only while nobody else adds or removes images (the
        gallery sweeps as it opens)."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and len(folder.name) == 2 and set(folder.name) <= _HEX:
                removed += remove_leftover_temporaries_in(folder)
                kept = [entry.name for entry in os.scandir(folder) if _is_sha256(entry.name)]
                unreferenced = set(kept) - referenced(kept)
                for name in unreferenced:
                    (folder / name).unlink(missing_ok=True)
                removed += len(unreferenced)
        return removed


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX
