"""Distributed ingest on Ray Data: the local pipeline's stages, spread over a cluster.

::

    sources ─▶ Ray tasks: stat, read, decode ─▶ Ray actors: engine.detect ─▶ the driver:
            in input order, hundreds of images per transaction ─▶ gallery

Each actor loads the model folder once and holds one GPU when the cluster has GPUs (a CPU
otherwise). On a cluster without GPUs, Ray Data fuses reading into the actors (the two stages
ask for the same resources), which spares shipping decoded pixels between processes.

Ray Data keeps the input order, and every write goes through the driver's one
:class:`~indexer.ingest.GallerySink`, so the gallery is the one the local pipeline makes from
the same sources: same images, ids, boxes and embeddings, and the same job records.

Image files must be readable at the same paths on every node (a shared file system). Unlike
the local pipeline, tasks cannot look up content hashes in the gallery (it is on the driver),
so a duplicate file is decoded and detected before the gallery recognises it.

Needs the ``distributed`` extra: ``pip install "psearch[distributed]"`` (``ray[data]``).
"""

from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any, NamedTuple

import numpy as np

from indexer.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from indexer.ingest import (
    DEFAULT_BATCH_SIZE,
    GallerySink,
    IngestSummary,
    ItemResult,
    LoadedImage,
    SizeBatcher,
    WorkItem,
    detect_batch,
    load_item,
    run_plan,
)
from indexer.jobs import Job
from indexer.sources import ImageSource
from indexer.store import Gallery
from indexer.types import NewImage, min_score_for

ROWS_PER_BLOCK = 64  # rows a read task decodes: big enough to amortise a task, small to spread


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # the Data library comes with the ray[data] extra
    except ImportError as error:
        raise ImportError(
            f"--engine ray needs Ray Data ({error}): pip install 'psearch[distributed]'"
        ) from None
    return ray


class ModelIdentity(NamedTuple):
    """What the driver needs of a model folder: what the gallery records, and the detection
    threshold the folder recommends (None for folders exported before it was recorded)."""

    fingerprint: str
    dim: int
    detection_threshold: float | None


def model_identity(model_dir: str | PathLike) -> ModelIdentity:
    """The :class:`ModelIdentity` of an exported model folder, read from its manifest without
    loading the model (the driver does not run it)."""
    from export.artifact import read_model_manifest

    manifest = read_model_manifest(model_dir)
    return ModelIdentity(manifest.fingerprint, manifest.embedding_dim, manifest.detection_threshold)


def ingest_ray(
    gallery: Gallery,
    model_dir: str | PathLike,
    sources: Sequence[ImageSource],
    *,
    backend: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    actors: int | None = None,
    job: Job | str | None = None,
    progress: bool = True,
    min_score: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    address: str | None = None,
) -> IngestSummary:
    """:func:`indexer.ingest.ingest` on Ray Data, with the model folder ``model_dir`` loaded in
    ``actors`` actors (default: one per GPU of the cluster, or one on CPU).

    Uses the running Ray instance, or connects to ``address`` (None: starts a local one, shut
    down at the end).
    """
    ray = import_ray()
    fingerprint, dim, recommended = model_identity(model_dir)
    gallery.check_model(fingerprint, dim)
    min_score = min_score_for(min_score, recommended)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        with run_plan(gallery, sources, job) as plan:
            sink = GallerySink(gallery, plan, progress)
            try:
                rows = _detected_rows(ray, plan.work, str(model_dir), backend, batch_size, actors,
                                      min_score, max_pixels, max_bytes)  # fmt: skip
                for row in rows:
                    sink.put(_result(plan.work[row["position"]], row, dim))
            except KeyboardInterrupt:
                sink.write_ready()  # keep what is done: a resumed job skips it
                raise
            finally:
                sink.close_bar()
            return sink.close()
    finally:
        if started_here:
            ray.shutdown()


def _detected_rows(
    ray: Any,
    work: list[WorkItem],
    model_dir: str,
    backend: str,
    batch_size: int,
    actors: int | None,
    min_score: float,
    max_pixels: int,
    max_bytes: int,
) -> Iterator[dict[str, Any]]:
    """The detection rows of every work item, in input order."""
    if not work:
        return iter(())
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the gallery's ids follow the input order
    context.enable_progress_bars = False  # the sink has one
    context.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    items = [
        {"position": item.position, "path": item.source.path, "done": item.done_stat or (-1, -1)}
        for item in work
    ]
    dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // ROWS_PER_BLOCK))
    dataset = dataset.map(_load_row, fn_kwargs={"max_pixels": max_pixels, "max_bytes": max_bytes})
    dataset = dataset.map_batches(
        DetectionActor,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "backend": backend,
            "device": "cuda" if gpus else "cpu",
            "min_score": min_score,
            "batch_size": batch_size,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors or max(gpus, 1)),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )
    return dataset.iter_rows()


# -- Ray tasks: reading and decoding -----------------------------------------------------


def _load_row(row: dict[str, Any], max_pixels: int, max_bytes: int) -> dict[str, Any]:
    """Read and decode one file (a Ray task). Pixels travel as raw bytes with their shape:
    Ray's tensor columns want one shape per column, and images differ."""
    done = tuple(int(value) for value in row["done"])
    work = WorkItem(row["position"], ImageSource(row["path"]), None, None if -1 in done else done)
    loaded = load_item(work, lambda _: None, max_pixels, max_bytes)
    pixels = loaded.pixels
    height, width = (0, 0) if pixels is None else pixels.shape[:2]
    return {
        **_result_columns(loaded.result),
        "content": loaded.content,
        "pixels": b"" if pixels is None else pixels.tobytes(),
        "height": height,
        "width": width,
    }


def _result_columns(result: ItemResult) -> dict[str, Any]:
    """The columns every row carries; -1 and "" stand for None (a column keeps one type)."""
    return {
        "position": result.work.position,
        "status": result.status,
        "size": -1 if result.size is None else result.size,
        "mtime_ns": -1 if result.mtime_ns is None else result.mtime_ns,
        "error": result.error or "",
    }


# -- Ray actors: detection ---------------------------------------------------------------


class DetectionActor:
    """A Ray actor: the model folder loaded once; detects the persons of batches of rows."""

    def __init__(
        self, model_dir: str, backend: str, device: str, min_score: float, batch_size: int
    ) -> None:
        from export.runtime import load_engine

        self.engine = load_engine(model_dir, backend=backend, device=device, batch_size=batch_size)
        self.min_score = min_score

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = [_loaded_from_row(batch, row) for row in range(len(batch["position"]))]
        results = {image.work.position: image.result for image in loaded if image.pixels is None}
        # Batch images of similar aspect ratio, as the local pipeline does.
        grouper = SizeBatcher(len(loaded), max_wait=len(loaded) + 1)
        ready = [group for image in loaded if image.pixels is not None
                 for group in grouper.add(image)]  # fmt: skip
        for group in ready + grouper.drain():
            for result in detect_batch(self.engine, group, self.min_score):
                results[result.work.position] = result
        rows = [_detection_row(results[position]) for position in batch["position"]]
        return {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}


def _loaded_from_row(batch: dict[str, np.ndarray], row: int) -> LoadedImage:
    work = WorkItem(int(batch["position"][row]), ImageSource(""))
    size, mtime_ns = int(batch["size"][row]), int(batch["mtime_ns"][row])
    result = ItemResult(
        work,
        str(batch["status"][row]),
        size=None if size < 0 else size,
        mtime_ns=None if mtime_ns < 0 else mtime_ns,
        error=str(batch["error"][row]) or None,
    )
    height, width = int(batch["height"][row]), int(batch["width"][row])
    if result.status != "detected":
        return LoadedImage(work, result)
    pixels = np.frombuffer(batch["pixels"][row], dtype=np.uint8).reshape(height, width, 3)
    return LoadedImage(work, result, bytes(batch["content"][row]), pixels)


def _detection_row(result: ItemResult) -> dict[str, Any]:
    """A result as columns; detections as raw float64 boxes and scores, float32 embeddings."""
    row = _result_columns(result)
    image = result.image
    if image is None:
        return {**row, "content": b"", "boxes": b"", "scores": b"", "embeddings": b"",
                "width": 0, "height": 0}  # fmt: skip
    return {
        **row,
        "content": image.data,
        "boxes": np.ascontiguousarray(image.boxes, dtype=np.float64).tobytes(),
        "scores": np.ascontiguousarray(image.scores, dtype=np.float64).tobytes(),
        "embeddings": np.ascontiguousarray(image.embeddings, dtype=np.float32).tobytes(),
        "width": image.width,
        "height": image.height,
    }


# -- back on the driver ------------------------------------------------------------------


def _result(work: WorkItem, row: dict[str, Any], dim: int) -> ItemResult:
    """The driver's :class:`ItemResult` of a detection row, with the source's metadata."""
    size, mtime_ns = int(row["size"]), int(row["mtime_ns"])
    result = ItemResult(
        work,
        row["status"],
        size=None if size < 0 else size,
        mtime_ns=None if mtime_ns < 0 else mtime_ns,
        error=row["error"] or None,
    )
    if result.status != "detected":
        return result
    boxes = np.frombuffer(row["boxes"], dtype=np.float64).reshape(-1, 4)
    embeddings = np.frombuffer(row["embeddings"], dtype=np.float32).reshape(len(boxes), dim)
    image = NewImage(
        data=bytes(row["content"]),
        boxes=boxes,
        scores=np.frombuffer(row["scores"], dtype=np.float64),
        embeddings=embeddings,
        width=int(row["width"]),
        height=int(row["height"]),
        camera=work.source.camera,
        timestamp=work.source.timestamp,
        uri=work.source.path,
    )
    return ItemResult(work, "detected", result.size, result.mtime_ns, image)
