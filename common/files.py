"""The one way psearch replaces a file: durably and atomically.

A crash (of the process or of the machine) at any moment leaves either the old file or the new
one, whole, never a mixture: the new content is written to a temporary file beside the target,
fsynced, renamed over the target (atomic on POSIX), and the folder is fsynced so that the rename
itself is on disk when the call returns. Checkpoints, exported model folders, gallery snapshots,
uploaded images and TensorRT engines are all written this way.
"""

import glob
import os
import secrets
from collections.abc import Callable, Iterable
from os import PathLike
from pathlib import Path


def write_atomically(path: str | PathLike, write: Callable[[Path], object]) -> Path:
    """Replace ``path`` by what ``write(temporary)`` writes to a temporary file beside it.

    The folder is made if missing. The temporary file is created empty with the permissions a
    new file gets (the umask applies), so ``write`` may open it or replace it by name. When
    ``write`` fails, the temporary file is removed and ``path`` is left as it was. Returns
    ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(path)
    try:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_bytes_atomically(path: str | PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` (see :func:`write_atomically`)."""
    return write_atomically(path, lambda temporary: temporary.write_bytes(data))


def write_text_atomically(path: str | PathLike, text: str) -> Path:
    """Replace ``path`` by ``text`` in UTF-8 (see :func:`write_atomically`)."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _new_temporary(path: Path) -> Path:
    """An empty new file beside ``path``, hidden, with a name no other writer uses."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


def remove_leftover_temporaries(path: str | PathLike) -> int:
    """Remove the temporary files a crash in :func:`write_atomically` left beside ``path``;
    returns how many. Only for a caller that knows nobody else is writing ``path`` now (one that
    holds a lock on it), as they would lose their temporary file."""
    path = Path(path)
    return _remove_all(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def remove_leftover_temporaries_in(folder: str | PathLike) -> int:
    """Remove the temporary files a crash in :func:`write_atomically` left in ``folder``,
    whatever file they were to replace; returns how many. Only for a caller that knows nobody
    else is writing in ``folder`` now."""
    return _remove_all(Path(folder).glob(".*.tmp"))


def _remove_all(paths: Iterable[Path]) -> int:
    leftovers = list(paths)
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


def fsync_path(path: str | PathLike) -> None:
    """fsync a file or a folder by its path."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
