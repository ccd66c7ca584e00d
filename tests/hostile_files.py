"""Hostile files that the tests list as images: a FIFO that cannot hang the test reading it, and
a file of any size that takes no disk."""

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

UNBLOCK_AFTER_S = 10.0


@contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO at ``path``. Opening a FIFO for reading waits for a writer: a reader that does (the
    defect the tests guard against) is set free every :data:`UNBLOCK_AFTER_S` seconds by opening
    it for writing, so that the test fails on what it read instead of hanging."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock_readers() -> None:
        while not done.wait(UNBLOCK_AFTER_S):
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading it
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    watchdog = threading.Thread(target=unblock_readers, name="fifo-watchdog", daemon=True)
    watchdog.start()
    try:
        yield path
    finally:
        done.set()
        watchdog.join()


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` bytes (zeros) that takes no disk space."""
    with path.open("wb") as file:
        file.truncate(size)
    return path
