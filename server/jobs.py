"""Bulk indexing jobs of the service: server folders and manifests, indexed in the background.

- :func:`collect_job_sources` turns a :class:`~server.schemas.JobRequest` into image sources,
  refusing (403) every path that does not resolve inside the allowed roots (``server/roots.py``).
- :class:`JobRunner` runs the jobs one at a time, in submission order, on a thread of its own,
  with :func:`indexer.ingest.ingest` writing to the service's open gallery. It reads each file
  as ``common.reading`` does within the allowed roots: a symlink swapped in while the job runs
  cannot lead it out of them, and a FIFO, a device or a file over ``max_image_bytes`` fails
  alone, unread, instead of holding up the queue.
- :class:`JobControl` says which job runs and stops it, at a shutdown or when it is cancelled.
- :class:`BatcherEngine` is the engine the jobs see: it sends their images through the service's
  micro-batcher, so that a job never holds the engine. The batcher serves its queue first in,
  first out, and a job submits its next batch only once the previous one is answered: a search
  waits behind at most one job batch (of at most half the queue, so searches always find room).
- :class:`JobService` submits and reports jobs. It is one of the services
  (:func:`server.lifecycle.start_services` opens it once the gallery and the batcher are up,
  resuming the jobs a stop or a crash left queued or running); the app's shutdown closes it
  before the batcher and the gallery.

Jobs live in the gallery's SQLite (``indexer/jobs.py``): a resumed job skips the images it has
done. At shutdown the running job stops after its current batch, keeps what it finished, and
goes back to ``queued``. A job cancelled through the API (queued or running) is ``cancelled``
at once in the gallery, so that it is never resumed, and the running one stops at its next
image or batch, keeping what it finished.
"""

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.runtime import EngineInfo
from indexer.ingest import IngestInterrupted, ingest
from indexer.jobs import Job, JobChanged, JobNotFound, JobStore
from indexer.sources import (
    ImageSource,
    SourceError,
    collect_sources,
    first_of_each_path,
    read_image_manifest,
)
from indexer.store import Gallery
from server.batcher import MicroBatcher
from server.errors import (
    InvalidField,
    JobFinished,
    JobNameTaken,
    NotFound,
    NotReady,
    Overloaded,
)
from server.roots import AllowedRoots
from server.schemas import JobFailureOut, JobListOut, JobOut, JobRequest, JobSummaryOut
from server.settings import ServerSettings
from server.worker import DetectTask

logger = logging.getLogger(__name__)

DECODE_WORKERS = 2  # threads a job decodes images with: few, requests decode too
FAILURES_SHOWN = 20  # failed images listed in a job's report
INTERRUPTED = "interrupted by a shutdown of the service; it resumes when the service starts"


CANCELLED = "cancelled through the API"
CANCEL_WAIT_S = 30.0  # how long a cancel request waits for the running job to stop


# -- paths -------------------------------------------------------------------------------


def collect_job_sources(request: JobRequest, roots: AllowedRoots) -> list[ImageSource]:
    """The images a job request names, each by its real path, in request order, each once.

    Every path is checked against ``roots`` after resolving it: the given paths and manifest
    first (so that nothing outside is even listed or read), then every image found in a folder
    or listed in the manifest (a symlink in an allowed folder may point anywhere). Raises
    :class:`PathNotAllowed` (403) or :class:`InvalidField` (422: a missing path, an unreadable
    manifest, no images at all), naming the path at fault.
    """
    sources: list[ImageSource] = []
    for given in request.paths:
        folder = roots.resolve(given, f"path {given!r}")
        with _source_errors_as_invalid("paths"):
            found = collect_sources([folder], recursive=request.recursive, camera=request.camera)
        sources += (_resolved(source, roots, f"found under {given!r}") for source in found)
    if request.manifest is not None:
        manifest = roots.resolve(request.manifest, f"manifest {request.manifest!r}")
        with _source_errors_as_invalid("manifest"):
            listed = read_image_manifest(manifest, camera=request.camera, within=roots.roots)
        sources += (
            _resolved(source, roots, f"manifest {request.manifest!r}, entry {number}")
            for number, source in enumerate(listed, start=1)
        )
    if not sources:
        raise InvalidField("no image files found in the given paths and manifest")
    # Two names of one file (a symlink and its target) are one image: the first wins.
    return first_of_each_path(sources)


@contextmanager
def _source_errors_as_invalid(field: str) -> Iterator[None]:
    """A missing path or a bad manifest is an invalid field (422)."""
    try:
        yield
    except SourceError as error:
        raise InvalidField(f"{field}: {error}") from None


def _resolved(source: ImageSource, roots: AllowedRoots, where: str) -> ImageSource:
    real = roots.resolve(source.path, f"{source.path!r} ({where})")
    return ImageSource(real, source.camera, source.timestamp)


# -- running jobs ------------------------------------------------------------------------


class JobControl:
    """Which job runs, and whether it is to stop: at a shutdown (it goes back to the queue) or
    because it was cancelled. The job's thread calls :meth:`checkpoint` before each image and
    each batch; ``wake`` ends the engine's pauses at once when it is to stop."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self._changed = threading.Condition()  # guards the three below
        self._stopping = False
        self._running: int | None = None
        self._cancelled = False  # the running job was cancelled

    def checkpoint(self) -> None:
        """Raise :class:`IngestInterrupted` in the running job when it is to stop."""
        with self._changed:
            if self._stopping:
                raise _shutdown()
            if self._cancelled:
                raise IngestInterrupted("cancelled", CANCELLED)

    def shut_down(self) -> None:
        """Stop the running job, and start no other."""
        with self._changed:
            self._stopping = True
        self.wake.set()

    def begin(self, job_id: int) -> bool:
        """Job ``job_id`` runs now; False (it must not) once the service is shutting down."""
        with self._changed:
            if self._stopping:
                return False
            self._running, self._cancelled = job_id, False
            self.wake.clear()
            return True

    def end(self) -> None:
        """The running job has stopped."""
        with self._changed:
            self._running = None
            self._changed.notify_all()

    def stop_if_running(self, job_id: int, timeout_s: float) -> None:
        """Stop job ``job_id`` if it is the running one, and wait (at most ``timeout_s``) until
        it has stopped."""
        with self._changed:
            if self._running == job_id:
                self._cancelled = True
                self.wake.set()
                self._changed.wait_for(lambda: self._running != job_id, timeout_s)


class BatcherEngine:
    """What :func:`~indexer.ingest.ingest` needs of an engine, run on the service's
    micro-batcher from a job's thread (searches and jobs share the one engine worker).

    ``detect`` passes the ``control``'s checkpoint before each submission (it raises
    :class:`IngestInterrupted` when the job is to stop) and raises it itself when the batcher
    stops; images refused because the queue is full are submitted again after a pause.
    """

    def __init__(
        self,
        batcher: MicroBatcher[Any, Any],
        loop: asyncio.AbstractEventLoop,
        info: EngineInfo,
        control: JobControl,
        retry_after_s: float,
    ) -> None:
        self.info = info
        self._batcher = batcher
        self._loop = loop
        self._control = control
        self._retry_after_s = retry_after_s

    def detect(self, images: list[np.ndarray]) -> list[Any]:
        """Per (H, W, 3) uint8 image, its detections (the engine's)."""
        results: list[Any] = [None] * len(images)
        waiting = list(range(len(images)))
        while waiting:
            self._control.checkpoint()
            answers = self._submit([images[index] for index in waiting])
            refused = []
            for index, answer in zip(waiting, answers, strict=True):
                if isinstance(answer, Overloaded):
                    refused.append(index)
                elif isinstance(answer, NotReady):  # the batcher is stopping
                    raise _shutdown()
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    results[index] = answer
            waiting = refused
            if waiting:
                self._control.wake.wait(self._retry_after_s)
        return results

    def _submit(self, images: list[np.ndarray]) -> list[Any]:
        """Results or errors, one per image, from the batcher (in the event loop)."""

        async def submit_all() -> list[Any]:
            submitted = (self._batcher.submit(DetectTask(pixels)) for pixels in images)
            return await asyncio.gather(*submitted, return_exceptions=True)

        try:
            return asyncio.run_coroutine_threadsafe(submit_all(), self._loop).result()
        except concurrent.futures.CancelledError:  # the event loop is going away
            raise _shutdown() from None


def _shutdown() -> IngestInterrupted:
    """The interruption of a job by a shutdown: it goes back to the queue."""
    return IngestInterrupted("queued", INTERRUPTED)


@dataclass(frozen=True)
class IngestOptions:
    """How jobs run ``ingest``: the service's own detection floor and image limits, as
    uploads."""

    batch_size: int
    min_score: float
    max_pixels: int
    max_bytes: int
    workers: int = DECODE_WORKERS


class JobRunner:
    """Runs queued jobs one at a time, in order, on a thread of its own."""

    def __init__(
        self,
        gallery: Gallery,
        engine: BatcherEngine,
        jobs: JobStore,
        roots: AllowedRoots,
        options: IngestOptions,
        control: JobControl,
    ) -> None:
        self._gallery = gallery
        self._engine = engine
        self._jobs = jobs
        self._roots = roots
        self._options = options
        self._control = control
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="ingest-jobs", daemon=True)

    def start(self, job_ids: Iterable[int] = ()) -> None:
        """Start the thread, with ``job_ids`` first in its queue."""
        for job_id in job_ids:
            self._queue.put(job_id)
        self._thread.start()

    def enqueue(self, job_id: int) -> None:
        """Run this job after those queued before it."""
        self._queue.put(job_id)

    def stop(self) -> None:
        """Interrupt the running job after its current image or batch and wait for the thread
        (blocking: call it off the event loop, which the job's last batch still needs)."""
        self._control.shut_down()
        self._queue.put(None)
        self._thread.join()

    def cancel(self, job_id: int) -> Job:
        """Cancel the job in the gallery (a queued one is then skipped; the running one stops,
        and this waits at most :data:`CANCEL_WAIT_S` for it); returns the job as it is then.
        Raises :class:`JobNotFound`."""
        if self._jobs.cancel(job_id, CANCELLED).status == "cancelled":
            self._control.stop_if_running(job_id, CANCEL_WAIT_S)
        return self._jobs.get(job_id)

    def _work(self) -> None:
        while (job_id := self._queue.get()) is not None:
            job = self._jobs.get(job_id)
            if job.status not in ("queued", "running"):  # cancelled while it waited
                continue
            if not self._control.begin(job_id):  # shutting down
                return
            try:
                self._run(job)
            except Exception:  # one job's failure must not stop the others
                logger.exception("job %d failed", job_id)
            finally:
                self._control.end()

    def _run(self, job: Job) -> None:
        logger.info("job %d: indexing %d images (%d done before)", job.id, job.total, job.done)
        options = self._options
        try:
            summary = ingest(
                self._gallery,
                self._engine,
                [],
                job=job,
                batch_size=options.batch_size,
                workers=options.workers,
                progress=False,
                min_score=options.min_score,
                max_pixels=options.max_pixels,
                max_bytes=options.max_bytes,
                within=self._roots.roots,
                checkpoint=self._control.checkpoint,
            )
        except JobChanged:
            logger.info("job %d was cancelled before it started", job.id)
            return
        except IngestInterrupted as interruption:
            logger.info("job %d stopped: %s", job.id, interruption.reason)
            return
        logger.info("%s", summary.describe())


# -- the service -------------------------------------------------------------------------


class JobService:
    """Submits jobs to the runner and reports them. Its methods block: call them off the event
    loop."""

    def __init__(
        self,
        jobs: JobStore,
        runner: JobRunner,
        roots: AllowedRoots,
    ) -> None:
        self._jobs = jobs
        self._runner = runner
        self._roots = roots

    @classmethod
    def open(
        cls,
        settings: ServerSettings,
        gallery: Gallery,
        batcher: MicroBatcher[Any, Any],
        info: EngineInfo,
        roots: AllowedRoots,
        loop: asyncio.AbstractEventLoop,
        min_score: float,
    ) -> "JobService":
        """Open the gallery's jobs and start the runner on those left queued or running (by a
        shutdown or a crash), oldest first. Jobs store the persons scoring at least
        ``min_score``, as uploads do."""
        # A job's batch takes at most half the queue: searches always find room in it.
        batch_size = max(1, min(settings.max_batch_size, settings.queue_size // 2))
        options = IngestOptions(
            batch_size, min_score, settings.max_image_pixels, settings.max_image_bytes
        )

        control = JobControl()
        engine = BatcherEngine(batcher, loop, info, control, settings.retry_after_s)
        jobs = JobStore(gallery)
        runner = JobRunner(gallery, engine, jobs, roots, options, control)
        try:
            unfinished = [job.id for job in jobs.all_jobs() if job.status in ("queued", "running")]
        except BaseException:
            jobs.close()
            raise
        if unfinished:
            logger.info("resuming jobs %s", ", ".join(map(str, sorted(unfinished))))
        runner.start(sorted(unfinished))
        return cls(jobs, runner, roots)

    def close(self) -> None:
        """Stop the runner (the running job goes back to the queue) and close the jobs."""
        self._runner.stop()
        self._jobs.close()

    def submit(self, request: JobRequest) -> JobOut:
        """Check and list the request's images, record the job, queue it."""
        sources = collect_job_sources(request, self._roots)
        try:
            job = self._jobs.create(sources, name=request.name)
        except ValueError as error:  # the only one create raises for valid input: name taken
            raise JobNameTaken(f"name: {error}") from None
        self._runner.enqueue(job.id)
        logger.info("job %d queued: %d images", job.id, job.total)
        return self.get(job.id)

    def get(self, job_id: int) -> JobOut:
        """The job's status and progress; 404 if there is none of this id."""
        try:
            job = self._jobs.get(job_id)
        except JobNotFound as error:
            raise NotFound(str(error)) from None
        counts = self._jobs.counts(job_id)
        failures = self._jobs.failures(job_id, FAILURES_SHOWN)
        return JobOut(
            **_summary(job).model_dump(),
            added=counts["added"],
            duplicates=counts["duplicate"],
            failed=counts["failed"],
            failures=[
                JobFailureOut(path=item.source.path, reason=item.error or "unknown")
                for item in failures
            ],
        )

    def all_jobs(self) -> JobListOut:
        """Every job, newest first."""
        return JobListOut(jobs=[_summary(job) for job in self._jobs.all_jobs()])

    def cancel(self, job_id: int) -> JobOut:
        """Cancel a queued or running job (a running one stops after its current image or
        batch, keeping what it finished); 404 if there is none of this id, 409 if it has
        finished."""
        try:
            job = self._runner.cancel(job_id)
        except JobNotFound as error:
            raise NotFound(str(error)) from None
        if job.status in ("done", "failed"):
            raise JobFinished(f"job {job_id} is {job.status}: there is nothing to cancel")
        logger.info("job %d cancelled (%s)", job_id, job.status)
        return self.get(job_id)


def _summary(job: Job) -> JobSummaryOut:
    return JobSummaryOut(
        id=job.id,
        name=job.name,
        status=job.status,
        error=job.error,
        total=job.total,
        done=job.done,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )
