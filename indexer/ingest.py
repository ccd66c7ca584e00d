"""The ingest pipeline: image files in, their persons in the gallery.

::

    sources ─▶ thread pool: stat, read, hash, decode ─▶ batches of similar aspect ratio
            ─▶ engine.detect ─▶ in input order, hundreds of images per transaction ─▶ gallery

Decoding runs ahead of the engine in ``workers`` threads (Pillow releases the GIL while it
decodes). Images are batched by aspect ratio, because a batch is padded to its largest image:
the engine resizes every image to the same short side, so images of one aspect ratio pad to
nearly nothing. Results are written in input order, so a gallery's image ids follow the order
of its sources whatever the batching, and many images go in one transaction (each commit is an
fsync).

Work is skipped as early as possible: an item that an earlier run of the same job finished is
skipped without reading it while its file keeps the recorded size and modification time
(``indexer/jobs.py``); a file whose content hash is already in the gallery is not decoded. One
bad file never stops an ingest: it is reported with the reason, and the rest goes on.

Files are read with ``common.reading``: a FIFO, a device or a folder is refused without
waiting on it, a file larger than ``max_bytes`` without reading it, and with ``within`` (the
service's allowed roots) a file reached through a link out of them, even one swapped in while
the ingest runs. A job's outcomes are written in the transactions that add its images.
"""

import functools
import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from common.reading import FileRefused, open_regular_file, read_at_most
from indexer.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image
from indexer.jobs import ItemOutcome, Job, JobItem, JobProgress, JobStore
from indexer.sources import ImageSource
from indexer.store import Gallery
from indexer.types import AddResult, NewImage, min_score_for

if TYPE_CHECKING:  # the runtime imports torch, which reading a gallery does not need
    from export.runtime import EngineInfo

DEFAULT_BATCH_SIZE = 8
DEFAULT_WORKERS = 4
WRITE_IMAGES = 256  # images per write transaction...
WRITE_SECONDS = 10.0  # ...or fewer, so that a slow model still records its progress often
ASPECT_STEPS = 8  # batches group aspect ratios within 2 ** (1 / 8), about 9%


class PersonDetector(Protocol):
    """What ingest needs of an engine: ``export.runtime.Engine``, or the service's engine
    behind its micro-batcher."""

    info: "EngineInfo"  # the model: its fingerprint and embedding dim must fit the gallery

    def detect(self, images: list[np.ndarray]) -> list[Any]:
        """Per (H, W, 3) uint8 RGB image, its ``ImageDetections``: boxes (K, 4) in its pixels,
        scores (K,), embeddings (K, D)."""
        ...


class IngestInterrupted(KeyboardInterrupt):
    """Stops an ingest (raised by its ``checkpoint`` or its engine): what is finished is
    written, and the job goes to ``job_status`` with ``reason``, unless it was cancelled
    meanwhile. Any other KeyboardInterrupt (Ctrl-C) is taken as ``IngestInterrupted()``."""

    def __init__(self, job_status: str = "cancelled", reason: str = "interrupted") -> None:
        super().__init__(reason)
        self.job_status = job_status
        self.reason = reason


@dataclass(frozen=True)
class Failure:
    """A file that was not added, and why."""

    path: str
    reason: str


@dataclass
class IngestSummary:
    """What an ingest did. ``skipped`` items were done by an earlier run of the job (their files
    unchanged); ``duplicates`` had the bytes of an image already in the gallery."""

    total: int = 0
    added: int = 0
    duplicates: int = 0
    skipped: int = 0
    persons: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    job_id: int | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        """Images read and run through the model (or found duplicate) per second."""
        return (self.added + self.duplicates) / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One line for people."""
        text = (
            f"added {self.added} images ({self.persons} persons), "
            f"{self.duplicates} duplicates, {self.skipped} skipped (done before), "
            f"{self.failed} unreadable, in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s)"
        )
        return text if self.job_id is None else f"job {self.job_id}: {text}"


# -- the pipeline ------------------------------------------------------------------------


def ingest(
    gallery: Gallery,
    engine: PersonDetector,
    sources: Sequence[ImageSource],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    job: Job | str | None = None,
    progress: bool = True,
    min_score: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    within: Sequence[str] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> IngestSummary:
    """Detect the persons of ``sources`` with ``engine`` and add them to ``gallery``.

    ``workers`` threads read and decode; ``batch_size`` images of similar aspect ratio go to
    ``engine.detect`` at a time (the engine may split them into its own smaller batches).
    Files are read as the module says (regular files of at most ``max_bytes``, inside the
    resolved folders ``within`` when given), decoded by :func:`indexer.images.decode_image`
    (larger than ``max_pixels``: refused), and the persons scoring at least ``min_score`` are
    stored (:meth:`NewImage.from_detections`), as every other route does; None: the model's
    recommended threshold (:func:`~indexer.types.min_score_for`).

    ``job`` records the ingest in the gallery so that it can be resumed: a name (the job of that
    name, created if missing, with ``sources`` appended to its inputs; with no sources, its own
    inputs are resumed) or a :class:`Job` made with :class:`JobStore` (started only if its
    status is still the one it has: :class:`~indexer.jobs.JobChanged` otherwise).
    ``checkpoint()`` is called before each image: raising :class:`IngestInterrupted` there stops
    the ingest. Unreadable files are reported in the summary's ``failures``; an error that is
    not one file's (the gallery, the engine as a whole) stops the ingest and raises, the job
    marked failed (``cancelled`` on KeyboardInterrupt).
    """
    gallery.check_model(engine.info.fingerprint, engine.info.dim)
    _check_sizes(batch_size, workers)
    min_score = min_score_for(min_score, engine.info.detection_threshold)
    with run_plan(gallery, sources, job) as plan:
        sink = GallerySink(gallery, plan, progress)
        with ThreadPoolExecutor(workers) as pool:
            load = functools.partial(
                load_item,
                known_image=functools.partial(_stored_image_id, gallery),
                max_pixels=max_pixels,
                max_bytes=max_bytes,
                within=within,
            )
            batcher = SizeBatcher(batch_size, max_wait=4 * batch_size)
            loads = bounded_map(pool, load, plan.work, window=2 * workers + batch_size)
            try:
                for loaded in loads:
                    if checkpoint is not None:
                        checkpoint()
                    if loaded.pixels is None:
                        sink.put(loaded.result)
                        continue
                    for batch in batcher.add(loaded):
                        sink.put_many(detect_batch(engine, batch, min_score))
                for batch in batcher.drain():
                    sink.put_many(detect_batch(engine, batch, min_score))
            except KeyboardInterrupt:
                sink.write_ready()  # keep what is done: a resumed job skips it
                raise
            finally:
                pool.shutdown(cancel_futures=True)
                sink.close_bar()
        return sink.close()


def _check_sizes(batch_size: int, workers: int) -> None:
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- what the stages pass on -------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One image to ingest: its place in this run, its job item number (None without a job)
    and, when an earlier run finished it, the file's (size, mtime_ns) then."""

    position: int
    source: ImageSource
    seq: int | None = None
    done_stat: tuple[int, int] | None = None


@dataclass(frozen=True)
class ItemResult:
    """The outcome for one work item: ``detected`` (with the image to add), ``skipped``,
    ``duplicate`` (with the stored ``image_id``) or ``failed`` (with the ``error``)."""

    work: WorkItem
    status: str
    size: int | None = None
    mtime_ns: int | None = None
    image: NewImage | None = None
    image_id: int | None = None
    error: str | None = None


@dataclass
class LoadedImage:
    """A work item read and decoded: ``pixels`` (H, W, 3) uint8, or None with the ``result``
    decided already (skipped, duplicate, failed)."""

    work: WorkItem
    result: ItemResult
    content: bytes = b""
    pixels: np.ndarray | None = None


# -- reading and decoding ----------------------------------------------------------------


def load_item(
    work: WorkItem,
    known_image: Callable[[str], int | None],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    within: Sequence[str] | None = None,
) -> LoadedImage:
    """Open, stat, read, hash and decode one file; never raises for a bad file.

    ``known_image(sha256)`` is the id of the stored image with these bytes, or None. The file
    is refused unread unless it is a regular file of at most ``max_bytes`` (inside ``within``,
    when given: see ``common.reading``).
    """
    path = work.source.path
    try:
        with open_regular_file(path, within) as file:
            stat = os.fstat(file.fileno())
            stats = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if work.done_stat == (stat.st_size, stat.st_mtime_ns):
                return LoadedImage(work, ItemResult(work, "skipped", **stats))
            content = read_at_most(file, max_bytes, path)
    except FileRefused as error:
        return LoadedImage(work, ItemResult(work, "failed", error=str(error)))
    except OSError as error:
        return LoadedImage(work, ItemResult(work, "failed", error=_os_reason(error)))
    image_id = known_image(hashlib.sha256(content).hexdigest())
    if image_id is not None:
        return LoadedImage(work, ItemResult(work, "duplicate", image_id=image_id, **stats))
    try:
        pixels = decode_image(content, max_pixels, what="the file")
    except ImageError as error:
        return LoadedImage(work, ItemResult(work, "failed", error=str(error), **stats))
    return LoadedImage(work, ItemResult(work, "detected", **stats), content, pixels)


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error)


def _stored_image_id(gallery: Gallery, sha256: str) -> int | None:
    image = gallery.image_by_sha256(sha256)
    return None if image is None else image.id


def bounded_map(
    pool: ThreadPoolExecutor, function: Callable[[Any], Any], items: Iterable[Any], window: int
) -> Iterator[Any]:
    """``function(item)`` of each item, in order, computed in ``pool`` at most ``window`` items
    ahead of the consumer (``pool.map`` would submit everything at once, holding every result
    in memory)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -- batching and detection --------------------------------------------------------------


def aspect_key(height: int, width: int) -> int:
    """Images with one key have aspect ratios within ``2 ** (1 / ASPECT_STEPS)``."""
    return round(ASPECT_STEPS * math.log2(width / height))


class SizeBatcher:
    """Groups decoded images into batches of ``batch_size`` images of similar aspect ratio.

    An image waits for companions until ``max_wait`` later images have arrived; then its group
    goes as it is. That bounds memory (at most about ``max_wait`` decoded images are held) and
    how far results fall behind input order.
    """

    def __init__(self, batch_size: int, max_wait: int) -> None:
        self.batch_size = batch_size
        self.max_wait = max_wait
        self._groups: dict[int, list[LoadedImage]] = {}

    def add(self, loaded: LoadedImage) -> list[list[LoadedImage]]:
        """Take one image; returns the batches that are ready."""
        height, width = loaded.pixels.shape[:2]
        key = aspect_key(height, width)
        group = self._groups.setdefault(key, [])
        group.append(loaded)
        ready = []
        if len(group) == self.batch_size:
            ready.append(self._groups.pop(key))
        oldest_allowed = loaded.work.position - self.max_wait
        waited_enough = [
            key for key, group in self._groups.items() if group[0].work.position <= oldest_allowed
        ]
        ready += [self._groups.pop(key) for key in waited_enough]
        return ready

    def drain(self) -> list[list[LoadedImage]]:
        """The images still waiting, as batches, oldest first."""
        groups = sorted(self._groups.values(), key=lambda group: group[0].work.position)
        self._groups.clear()
        return groups


def detect_batch(
    engine: PersonDetector, batch: list[LoadedImage], min_score: float
) -> list[ItemResult]:
    """Run the engine on a batch; the persons scoring at least ``min_score`` of each image.

    When the batch fails, each image is tried alone, so that one image the engine cannot take
    fails alone (its result says why).
    """
    try:
        detections = engine.detect([loaded.pixels for loaded in batch])
    except Exception as error:
        if len(batch) == 1:
            reason = " ".join(str(error).split())[:300] or repr(error)
            return [replace(batch[0].result, status="failed", error=f"the model failed: {reason}")]
        return [result for loaded in batch for result in detect_batch(engine, [loaded], min_score)]
    return [
        _detected(loaded, found, min_score) for loaded, found in zip(batch, detections, strict=True)
    ]


def _detected(loaded: LoadedImage, found: Any, min_score: float) -> ItemResult:
    height, width = loaded.pixels.shape[:2]
    source = loaded.work.source
    image = NewImage.from_detections(
        loaded.content,
        found,
        width=width,
        height=height,
        min_score=min_score,
        camera=source.camera,
        timestamp=source.timestamp,
        uri=source.path,
    )
    return replace(loaded.result, image=image)


# -- jobs and writing --------------------------------------------------------------------


@dataclass
class RunPlan:
    """The work of one ingest run and, with a job, where its outcomes are recorded."""

    work: list[WorkItem]
    jobs: JobStore | None = None
    job_id: int | None = None


@contextmanager
def run_plan(
    gallery: Gallery, sources: Sequence[ImageSource], job: Job | str | None
) -> Iterator[RunPlan]:
    """The :class:`RunPlan` of an ingest, for a ``with`` block that ends the job: ``done``
    after a normal exit, ``cancelled`` on KeyboardInterrupt, ``failed`` on any other error."""
    if job is None:
        yield RunPlan([WorkItem(position, source) for position, source in enumerate(sources)])
        return
    jobs = JobStore(gallery)
    try:
        job_id = _job_for(jobs, job, sources)
        jobs.start(job_id, expected_status=job.status if isinstance(job, Job) else None)
        work = [_work_item(position, item) for position, item in enumerate(jobs.items(job_id))]
        try:
            yield RunPlan(work, jobs, job_id)
        except KeyboardInterrupt as interruption:
            stop = (
                interruption if isinstance(interruption, IngestInterrupted) else IngestInterrupted()
            )
            jobs.finish(job_id, stop.job_status, stop.reason)
            raise
        except BaseException as error:
            jobs.finish(job_id, "failed", " ".join(str(error).split()) or repr(error))
            raise
        jobs.finish(job_id, "done")
    finally:
        jobs.close()


def _job_for(jobs: JobStore, job: Job | str, sources: Sequence[ImageSource]) -> int:
    if isinstance(job, Job):
        jobs.extend(job.id, sources)
        return job.id
    found = jobs.find(job)
    if found is None:
        if not sources:
            raise ValueError(f"no job named {job!r} to resume, and no images given to start it")
        return jobs.create(sources, name=job).id
    jobs.extend(found.id, sources)
    return found.id


def _work_item(position: int, item: JobItem) -> WorkItem:
    done_stat = (item.size, item.mtime_ns) if item.done and item.size is not None else None
    return WorkItem(position, item.source, item.seq, done_stat)


class GallerySink:
    """Takes item results in any order and writes them in input order: the detected images
    many per transaction, then their outcomes to the job. Keeps the summary and the progress
    bar."""

    def __init__(
        self,
        gallery: Gallery,
        plan: RunPlan,
        progress: bool,
        write_images: int = WRITE_IMAGES,
        write_seconds: float = WRITE_SECONDS,
    ) -> None:
        self._gallery = gallery
        self._plan = plan
        self._write_images = write_images
        self._write_seconds = write_seconds
        self._early: dict[int, ItemResult] = {}  # results ahead of the next position
        self._next = 0
        self._ready: list[ItemResult] = []  # in order, not yet written
        self._ready_images = 0
        self._last_write = time.monotonic()
        self._found = 0
        self._start = time.perf_counter()
        self.summary = IngestSummary(total=len(plan.work), job_id=plan.job_id)
        self._bar = tqdm(
            total=len(plan.work), unit="img", disable=not progress, smoothing=0.05, leave=False
        )

    def put(self, result: ItemResult) -> None:
        self._early[result.work.position] = result
        if result.image is not None:
            self._found += len(result.image.scores)
            self._bar.set_postfix(persons=self._found, refresh=False)
        self._bar.update(1)
        while self._next in self._early:
            ready = self._early.pop(self._next)
            self._ready.append(ready)
            self._ready_images += ready.image is not None
            self._next += 1
        due = time.monotonic() - self._last_write >= self._write_seconds
        if self._ready_images >= self._write_images or (due and self._ready):
            self.write_ready()

    def put_many(self, results: Iterable[ItemResult]) -> None:
        for result in results:
            self.put(result)

    def close(self) -> IngestSummary:
        """Write what is left; the summary."""
        if self._early:
            missing = sorted(set(range(self._next, max(self._early) + 1)) - set(self._early))
            raise RuntimeError(f"ingest ended without results for positions {missing[:5]}")
        self.write_ready()
        self.close_bar()
        self.summary.seconds = time.perf_counter() - self._start
        return self.summary

    def close_bar(self) -> None:
        self._bar.close()

    def write_ready(self) -> None:
        """Write the results that are ready (all those before the first missing one): the
        detected images in one transaction, which records the job's outcomes of them all."""
        ready, self._ready, self._ready_images = self._ready, [], 0
        self._last_write = time.monotonic()
        detected = [result for result in ready if result.image is not None]
        settled = [result for result in ready if result.image is None]
        answers = self._add(detected, settled)
        for result in settled:
            self._count(result.status, result.work, result.error)
        for result, answer in zip(detected, answers, strict=True):
            if isinstance(answer, str):
                self._count("failed", result.work, answer)
            else:
                self._count("added" if answer.added else "duplicate", result.work)
                self.summary.persons += answer.num_persons if answer.added else 0

    def _add(self, detected: list[ItemResult], settled: list[ItemResult]) -> list[AddResult | str]:
        """The gallery's answer for each detected image, or why it refused one, with the job's
        outcomes of ``settled`` (and of the images) written in the same transaction. A refused
        batch is added image by image, so that only the image at fault fails."""
        progress = self._progress(detected, settled)
        if not detected and (progress is None or not progress.others):
            return []  # nothing to write
        try:
            return self._gallery.add_images([r.image for r in detected], job=progress)
        except ValueError:
            if len(detected) <= 1:
                raise
        answers: list[AddResult | str] = []
        for result in detected:
            try:
                answers += self._gallery.add_images([result.image], job=self._progress([result]))
            except ValueError as error:
                answers.append(f"the gallery refused its detections: {error}")
        refused = [
            replace(result, status="failed", error=answer)
            for result, answer in zip(detected, answers, strict=True)
            if isinstance(answer, str)
        ]
        if self._plan.jobs is not None:
            outcomes = [_outcome(result) for result in [*settled, *refused]]
            self._plan.jobs.record(self._plan.job_id, [o for o in outcomes if o is not None])
        return answers

    def _progress(
        self, detected: list[ItemResult], settled: Sequence[ItemResult] = ()
    ) -> JobProgress | None:
        """The job's outcomes of these results (None without a job)."""
        if self._plan.job_id is None:
            return None
        others = [_outcome(result) for result in settled]
        return JobProgress(
            self._plan.job_id,
            images=[_outcome(result) for result in detected],
            others=[outcome for outcome in others if outcome is not None],
        )

    def _count(self, status: str, work: WorkItem, error: str | None = None) -> None:
        """Count one item's outcome in the summary."""
        summary = self.summary
        if status == "skipped":
            summary.skipped += 1
        elif status == "failed":
            summary.failures.append(Failure(work.source.path, error or "unknown"))
        elif status == "added":
            summary.added += 1
        else:
            summary.duplicates += 1


def _outcome(result: ItemResult) -> ItemOutcome | None:
    """The job outcome of a result (that of a detected image is completed by the gallery); None
    for a skipped item, whose earlier outcome stands."""
    if result.status == "skipped":
        return None
    status = "added" if result.status == "detected" else result.status
    return ItemOutcome(
        result.work.seq, status, result.size, result.mtime_ns, result.image_id, result.error
    )
