"""Reading a file that someone else named (a bulk job's image, a manifest, a gallery image
served by its path): never blocking, never unbounded, never through a link out of the folders
the reader is allowed.

- The file is opened once, non-blocking, and everything is checked on that open descriptor:
  what is checked is what is read. A FIFO, a socket, a device or a folder is refused before a
  byte is read (opening a FIFO for reading would otherwise wait for a writer forever), and so is
  a file larger than the caller's limit (reading it would take that much memory).
- ``within``: the path must resolve inside one of these folders, and it is then opened one
  folder at a time from ``/`` without following any symbolic link. The resolved path has no
  links in it, so a link met on the way was swapped in after the check, and the open is
  refused instead of following it out.

Not covered: a folder moved out of the allowed ones while a file in it is being opened (by
someone who can write both places), and hard links, which are the same file under two names.
"""

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from typing import BinaryIO

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class FileRefused(ValueError):
    """A file refused before any of it was read; the message says why."""


def real_path(path: str | PathLike) -> str:
    """``path`` with ``..`` and symbolic links resolved (as far as it exists). Raises
    :class:`FileRefused` for a path no file system takes (a NUL byte, a loop of links)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError) as error:
        raise FileRefused(f"{os.fspath(path)!r}: {error}") from None


def lies_within(real: str, folders: Sequence[str]) -> bool:
    """Whether the resolved path ``real`` is one of the resolved ``folders`` or inside one."""
    return any(os.path.commonpath([real, folder]) == folder for folder in folders)


@contextmanager
def open_regular_file(
    path: str | PathLike, within: Sequence[str] | None = None
) -> Iterator[BinaryIO]:
    """The regular file at ``path``, open for reading (``with`` closes it).

    ``within``: resolved folders (``real_path``) the file must lie in, reached without
    following a link (see the module). Raises :class:`FileRefused` (not a regular file, outside
    ``within``, a link swapped in) or OSError (missing, unreadable).
    """
    descriptor = _open(os.fspath(path), within)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise FileRefused(f"{os.fspath(path)} is {kind}, not a regular file")
        file = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        yield file


def read_regular_file(
    path: str | PathLike, max_bytes: int, within: Sequence[str] | None = None
) -> bytes:
    """The bytes of the regular file at ``path`` (:func:`open_regular_file`), refused with
    :class:`FileRefused` when it holds more than ``max_bytes``."""
    with open_regular_file(path, within) as file:
        return read_at_most(file, max_bytes, os.fspath(path))


def read_at_most(file: BinaryIO, max_bytes: int, name: str) -> bytes:
    """All of an open regular file, refused with :class:`FileRefused` when it holds more than
    ``max_bytes``: checked from its size before reading, and again while reading (it may grow
    meanwhile)."""
    size = os.fstat(file.fileno()).st_size
    if size > max_bytes:
        raise FileRefused(f"{name} is {size} bytes; the limit is {max_bytes}")
    content = file.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise FileRefused(f"{name} grew beyond the limit of {max_bytes} bytes while being read")
    return content


def _open(path: str, within: Sequence[str] | None) -> int:
    if within is None:
        return os.open(path, _READ_FLAGS)
    real = real_path(path)
    if not lies_within(real, within):
        raise FileRefused(f"{path} is outside the allowed roots ({', '.join(within)})")
    return _open_without_links(real, path)


def _open_without_links(real: str, path: str) -> int:
    """Open the resolved path ``real`` one component at a time from ``/``, following no link."""
    *folders, name = real.split(os.sep)[1:]
    descriptor = os.open(os.sep, _FOLDER_FLAGS)
    try:
        for folder in folders:
            inner = _open_component(folder, _FOLDER_FLAGS, descriptor, path)
            os.close(descriptor)
            descriptor = inner
        return _open_component(name, _READ_FLAGS | os.O_NOFOLLOW, descriptor, path)
    finally:
        os.close(descriptor)


def _open_component(name: str, flags: int, folder: int, path: str) -> int:
    try:
        return os.open(name, flags, dir_fd=folder)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_link(name, folder):
            raise
    # The resolved path had no link here: one was swapped in after it was resolved.
    raise FileRefused(f"{path} changed while it was opened (a symbolic link was swapped in)")


def _is_link(name: str, folder: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False
