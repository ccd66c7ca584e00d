"""Bulk ingest jobs, recorded in the gallery's SQLite so that they survive restarts and resume.

A job lists its inputs (``job_items``: path, camera, timestamp) and, for each, the outcome of
its last attempt: ``added`` or ``duplicate`` (done: the file's size and modification time are
recorded with it), ``failed`` (with the reason) or ``pending``. Running a job again retries
what failed or is pending, and skips a done item without reading it while its file keeps the
recorded size and modification time; a changed file is read again.

Job status: ``queued`` (created, not started), ``running``, ``done`` (every item was
attempted; some may have failed), ``failed`` (stopped by an error that is not one file's),
``cancelled`` (stopped on purpose: interrupted, or cancelled through the service). ``done``
counts the items whose outcome is recorded.

The outcomes of the items that added images are recorded in the gallery's transaction that
adds them (:class:`JobProgress`, ``Gallery.add_images(job=...)``): a crash keeps both or
neither, so a resumed job never mistakes the images it added for duplicates. A job leaves
``running`` only through :meth:`JobStore.finish` and :meth:`JobStore.cancel`, each a
conditional update, so a cancellation is never overwritten by the end of the run it stopped.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from indexer import schema
from indexer.sources import ImageSource
from indexer.types import AddResult, GalleryError
from indexer.validation import check_name

if TYPE_CHECKING:  # the gallery records job progress itself: it imports this module
    from indexer.store import Gallery

JOB_KIND = "ingest"
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
ITEM_STATUSES = ("pending", "added", "duplicate", "failed")
DONE_ITEM_STATUSES = ("added", "duplicate")


class JobNotFound(GalleryError, KeyError):
    """No job with the given id."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class JobChanged(GalleryError):
    """The job is not in the status its caller saw (it was cancelled meanwhile)."""


@dataclass(frozen=True)
class Job:
    """An ingest job. ``done`` of ``total`` items have a recorded outcome."""

    id: int
    name: str | None
    status: str
    done: int
    total: int
    error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class JobItem:
    """One input of a job and the outcome of its last attempt."""

    seq: int
    source: ImageSource
    status: str
    size: int | None = None
    mtime_ns: int | None = None
    image_id: int | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in DONE_ITEM_STATUSES


@dataclass(frozen=True)
class ItemOutcome:
    """What an attempt at job item ``seq`` did: ``added`` or ``duplicate`` (with the file's
    ``size`` and ``mtime_ns`` as read, and the gallery's ``image_id``) or ``failed``
    (``error``)."""

    seq: int
    status: str
    size: int | None = None
    mtime_ns: int | None = None
    image_id: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class JobProgress:
    """Outcomes of a job's items to record in the transaction that adds their images
    (``Gallery.add_images(images, job=...)``).

    ``images`` holds one outcome per image added, in order, with the file's ``size`` and
    ``mtime_ns``; its status (added or duplicate) and image id are known once the images are
    inserted (:meth:`outcomes`). ``others`` are the outcomes of the batch's other items
    (failed, or found duplicate before decoding).
    """

    job_id: int
    images: Sequence[ItemOutcome] = ()
    others: Sequence[ItemOutcome] = ()

    def outcomes(self, results: Sequence[AddResult]) -> list[ItemOutcome]:
        """Every outcome, those of the images completed with what adding them did."""
        stored = [
            replace(item, status="added" if result.added else "duplicate", image_id=result.image_id)
            for item, result in zip(self.images, results, strict=True)
        ]
        return stored + list(self.others)


class JobStore:
    """The jobs of one open gallery, through a SQLite connection of their own.

    Safe to use from several threads (calls are serialised). Close it before the gallery.
    """

    def __init__(self, gallery: "Gallery") -> None:
        self._connection = schema.connect(gallery.path / schema.SQLITE_FILE)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------------

    def create(self, sources: Sequence[ImageSource], name: str | None = None) -> Job:
        """A new ``queued`` job over ``sources`` (in this order). A ``name`` lets the job be
        found again (:meth:`find`); names are unique (ValueError if taken)."""
        if name is not None:
            check_name(name, "a job name")
        now = time.time()
        with self._transaction() as connection:
            if name is not None and _job_id_named(connection, name) is not None:
                raise ValueError(f"a job named {name!r} exists already")
            job_id = connection.execute(
                "INSERT INTO jobs (kind, spec, status, done, total, created_at, updated_at) "
                "VALUES (?, ?, 'queued', 0, 0, ?, ?)",
                (JOB_KIND, json.dumps({"name": name}), now, now),
            ).lastrowid
            _append_items(connection, job_id, sources)
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        """The job with this id; :class:`JobNotFound` if none."""
        with self._lock:
            row = self._connection.execute(_SELECT_JOB + " WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id}")
        return _job(row)

    def find(self, name: str) -> Job | None:
        """The job of this name, or None."""
        with self._lock:
            job_id = _job_id_named(self._connection, name)
        return None if job_id is None else self.get(job_id)

    def all_jobs(self) -> list[Job]:
        """All ingest jobs, newest first."""
        with self._lock:
            rows = self._connection.execute(
                _SELECT_JOB + " WHERE kind = ? ORDER BY id DESC", (JOB_KIND,)
            ).fetchall()
        return [_job(row) for row in rows]

    def extend(self, job_id: int, sources: Iterable[ImageSource]) -> int:
        """Append the ``sources`` whose path the job does not list yet; returns how many."""
        with self._transaction() as connection:
            _require_job(connection, job_id)
            return _append_items(connection, job_id, sources)

    def start(self, job_id: int, expected_status: str | None = None) -> Job:
        """Mark the job ``running`` for a new attempt: failed items become pending again.

        ``expected_status``: start only if the job is still in this status (the one its caller
        saw), else raise :class:`JobChanged`; None starts it whatever its status (resuming a
        job by name).
        """
        with self._transaction() as connection:
            status = _require_job(connection, job_id)
            if expected_status is not None and status != expected_status:
                raise JobChanged(f"job {job_id} is {status}, no longer {expected_status}")
            connection.execute(
                "UPDATE job_items SET status = 'pending' WHERE job_id = ? AND status = 'failed'",
                (job_id,),
            )
            connection.execute(
                "UPDATE jobs SET status = 'running', error = NULL, updated_at = ?, done = "
                "(SELECT count(*) FROM job_items WHERE job_id = ? AND status != 'pending') "
                "WHERE id = ?",
                (time.time(), job_id, job_id),
            )
        return self.get(job_id)

    def finish(self, job_id: int, status: str, error: str | None = None) -> Job:
        """End the job's run: a ``running`` job moves to ``status``; a job that is no longer
        running (cancelled meanwhile) keeps its status."""
        if status not in JOB_STATUSES:
            raise ValueError(f"job status must be one of {JOB_STATUSES}, got {status!r}")
        with self._transaction() as connection:
            _require_job(connection, job_id)
            connection.execute(
                "UPDATE jobs SET status = ?, error = ?, updated_at = ? "
                "WHERE id = ? AND status = 'running'",
                (status, error, time.time(), job_id),
            )
        return self.get(job_id)

    def cancel(self, job_id: int, reason: str) -> Job:
        """Cancel a ``queued`` or ``running`` job (whoever runs it stops at its next
        checkpoint); a finished job is left as it is. Returns the job; :class:`JobNotFound` if
        there is none."""
        with self._transaction() as connection:
            _require_job(connection, job_id)
            connection.execute(
                "UPDATE jobs SET status = 'cancelled', error = ?, updated_at = ? "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (reason, time.time(), job_id),
            )
        return self.get(job_id)

    # -- items ----------------------------------------------------------------------------

    def items(self, job_id: int) -> list[JobItem]:
        """The job's items in order."""
        with self._lock:
            _require_job(self._connection, job_id)
            rows = self._connection.execute(
                _SELECT_ITEM + " WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        return [_item(row) for row in rows]

    def counts(self, job_id: int) -> dict[str, int]:
        """How many of the job's items are in each of :data:`ITEM_STATUSES` (every status is a
        key). Counted by SQLite: cheap to poll, unlike building every item (:meth:`items`)."""
        with self._lock:
            _require_job(self._connection, job_id)
            rows = self._connection.execute(
                "SELECT status, count(*) FROM job_items WHERE job_id = ? GROUP BY status",
                (job_id,),
            ).fetchall()
        return {status: 0 for status in ITEM_STATUSES} | dict(rows)

    def failures(self, job_id: int, limit: int) -> list[JobItem]:
        """The job's first ``limit`` failed items, in job order."""
        if limit < 0:
            raise ValueError(f"limit must be at least 0, got {limit}")
        with self._lock:
            _require_job(self._connection, job_id)
            rows = self._connection.execute(
                _SELECT_ITEM + " WHERE job_id = ? AND status = 'failed' ORDER BY seq LIMIT ?",
                (job_id, limit),
            ).fetchall()
        return [_item(row) for row in rows]

    def record(self, job_id: int, outcomes: Sequence[ItemOutcome]) -> None:
        """Record the outcomes of some items, and count them as done, in one transaction. The
        outcomes of images added to the gallery go in the transaction that adds them instead
        (:class:`JobProgress`)."""
        if not outcomes:
            return
        with self._transaction() as connection:
            record_outcomes(connection, job_id, outcomes)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise


_SELECT_JOB = (
    "SELECT id, json_extract(spec, '$.name'), status, done, total, error, created_at, "
    "updated_at FROM jobs"
)


def _job(row: tuple[Any, ...]) -> Job:
    return Job(*row[:4], row[4] or 0, *row[5:])


_SELECT_ITEM = (
    "SELECT seq, path, camera, timestamp, status, size, mtime_ns, image_id, error FROM job_items"
)


def _item(row: tuple[Any, ...]) -> JobItem:
    return JobItem(row[0], ImageSource(*row[1:4]), *row[4:])


def _job_id_named(connection: sqlite3.Connection, name: str) -> int | None:
    row = connection.execute(
        "SELECT id FROM jobs WHERE kind = ? AND json_extract(spec, '$.name') = ?",
        (JOB_KIND, name),
    ).fetchone()
    return None if row is None else row[0]


def _require_job(connection: sqlite3.Connection, job_id: int) -> str:
    """The job's status; :class:`JobNotFound` if there is no such job."""
    row = connection.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(f"no job with id {job_id}")
    return row[0]


def record_outcomes(
    connection: sqlite3.Connection, job_id: int, outcomes: Sequence[ItemOutcome]
) -> None:
    """Record the outcomes of some of the job's items and count them as done, inside the
    caller's transaction (the gallery's, when they come with images)."""
    for outcome in outcomes:
        if outcome.status not in ITEM_STATUSES[1:]:
            raise ValueError(f"an outcome is one of {ITEM_STATUSES[1:]}, got {outcome.status!r}")
    if not outcomes:
        return
    seqs = json.dumps([outcome.seq for outcome in outcomes])
    # Only items that were pending add to ``done``: a changed file re-read is done twice.
    newly_done = connection.execute(
        "SELECT count(*) FROM job_items WHERE job_id = ? AND status = 'pending' "
        "AND seq IN (SELECT value FROM json_each(?))",
        (job_id, seqs),
    ).fetchone()[0]
    connection.executemany(
        "UPDATE job_items SET status = ?, size = ?, mtime_ns = ?, image_id = ?, "
        "error = ? WHERE job_id = ? AND seq = ?",
        [(o.status, o.size, o.mtime_ns, o.image_id, o.error, job_id, o.seq) for o in outcomes],
    )
    connection.execute(
        "UPDATE jobs SET done = done + ?, updated_at = ? WHERE id = ?",
        (newly_done, time.time(), job_id),
    )


def _append_items(
    connection: sqlite3.Connection, job_id: int, sources: Iterable[ImageSource]
) -> int:
    """Insert the sources whose path is new to the job, after its last item; update the job's
    total. Returns how many were inserted."""
    known = {row[0] for row in connection.execute(
        "SELECT path FROM job_items WHERE job_id = ?", (job_id,)
    )}  # fmt: skip
    next_seq = connection.execute(
        "SELECT coalesce(max(seq) + 1, 0) FROM job_items WHERE job_id = ?", (job_id,)
    ).fetchone()[0]
    rows = []
    for source in sources:
        if source.path in known:
            continue
        known.add(source.path)
        rows.append((job_id, next_seq + len(rows), source.path, source.camera, source.timestamp))
    connection.executemany(
        "INSERT INTO job_items (job_id, seq, path, camera, timestamp) VALUES (?, ?, ?, ?, ?)",
        rows,
    )
    connection.execute(
        "UPDATE jobs SET total = (SELECT count(*) FROM job_items WHERE job_id = ?) WHERE id = ?",
        (job_id, job_id),
    )
    return len(rows)
