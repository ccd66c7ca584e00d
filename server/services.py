"""The service's business logic, behind the routers.

- :class:`SearchService`: search (decode the query, embed it on the inference worker, search
  the gallery) and adding images (decode, detect on the worker, store in one transaction).
- :class:`GalleryService`: reading and removing gallery images, serving their files, counts.
- :class:`~server.jobs.JobService`: bulk indexing jobs, run on the batcher in the background.
- :class:`ServiceState`: the services once loaded, or why they are not (yet).

Blocking work (decoding, SQLite, FAISS, files) runs in the thread pool, never on the event
loop; the engine runs only on the batcher's worker thread.
"""

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from indexer.store import Gallery
from indexer.types import (
    AddResult,
    GalleryMismatch,
    GalleryNotFound,
    Hit,
    ImageInfo,
    ImageNotFound,
    NewImage,
)
from server.batcher import MicroBatcher
from server.errors import InvalidField, ModelMismatch, NotFound, NotReady, ServiceError, TooLarge
from server.files import ImageFiles, media_type
from server.images import DecodedImage, check_media_type, decode_image
from server.inference import (
    Box,
    DetectJob,
    Engine,
    EngineLoader,
    InferenceWorker,
    Job,
    QueryEmbedding,
    QueryJob,
    warm_up,
)
from server.jobs import JobService
from server.metrics import ServiceMetrics
from server.schemas import (
    AddedImage,
    AddImagesResponse,
    AddImagesTimings,
    GalleryStatsOut,
    ImageOut,
    ModelOut,
    PersonOut,
    QueryInfo,
    RemovedImage,
    SearchForm,
    SearchHit,
    SearchResponse,
    SearchTimings,
)
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    """An uploaded file as read from the request."""

    data: bytes
    filename: str | None
    media_type: str | None


async def read_upload(file: UploadFile) -> Upload:
    """The bytes, file name and declared media type of an uploaded file."""
    return Upload(await file.read(), file.filename, file.content_type)


class SearchService:
    """Searches and adds images: the work that needs the engine."""

    def __init__(
        self,
        settings: ServerSettings,
        gallery: Gallery,
        batcher: MicroBatcher[Job, Any],
        files: ImageFiles,
    ) -> None:
        self.settings = settings
        self.gallery = gallery
        self.batcher = batcher
        self.files = files

    async def search(self, upload: Upload, form: SearchForm) -> SearchResponse:
        """Embed the query person and find the most similar gallery persons."""
        started = time.perf_counter()
        if form.top_k > self.settings.top_k_max:
            raise InvalidField(
                f"top_k: {form.top_k} is more than this service returns ({self.settings.top_k_max})"
            )
        image = await run_in_threadpool(self._decode, upload, "the query image")
        decoded = time.perf_counter()
        requested = _requested_box(form.box, image)
        query: QueryEmbedding = await self.batcher.submit(QueryJob(image.pixels, requested))
        embedded = time.perf_counter()
        time_range = None if form.since is None and form.until is None else (form.since, form.until)
        hits = await run_in_threadpool(
            self.gallery.search,
            query.embedding,
            form.top_k,
            cameras=form.cameras or None,
            time_range=time_range,
            exclude_images=form.exclude_images or None,
            min_similarity=form.min_similarity,
        )
        finished = time.perf_counter()
        return SearchResponse(
            query=QueryInfo(
                box=list(query.box),
                method=query.method,
                requested_box=list(requested),
                iou=query.iou,
                det_score=query.det_score,
                width=image.width,
                height=image.height,
            ),
            hits=[_hit(hit) for hit in hits],
            timings=SearchTimings(
                decode_ms=_ms(started, decoded),
                embed_ms=_ms(decoded, embedded),
                search_ms=_ms(embedded, finished),
                total_ms=_ms(started, finished),
            ),
        )

    async def add_images(
        self, uploads: Sequence[Upload], cameras: Sequence[str], timestamps: Sequence[float]
    ) -> AddImagesResponse:
        """Detect the persons in each image and store all images in one gallery transaction."""
        started = time.perf_counter()
        if len(uploads) > self.settings.max_images_per_request:
            raise TooLarge(
                f"{len(uploads)} images in one request; the limit is "
                f"{self.settings.max_images_per_request}"
            )
        per_image_cameras = _one_per_image(list(cameras), len(uploads), "cameras")
        per_image_timestamps = _one_per_image(list(timestamps), len(uploads), "timestamps")
        images = await _all(
            run_in_threadpool(self._decode, upload, _name(upload, i))
            for i, upload in enumerate(uploads)
        )
        decoded = time.perf_counter()
        detections = await _all(self.batcher.submit(DetectJob(image.pixels)) for image in images)
        detected = time.perf_counter()
        new_images = [
            self._new_image(upload, image, found, camera, timestamp)
            for upload, image, found, camera, timestamp in zip(
                uploads, images, detections, per_image_cameras, per_image_timestamps, strict=True
            )
        ]
        results = await run_in_threadpool(self._store, uploads, new_images)
        finished = time.perf_counter()
        return AddImagesResponse(
            images=[
                AddedImage(
                    filename=upload.filename,
                    image_id=result.image_id,
                    sha256=result.sha256,
                    added=result.added,
                    num_persons=result.num_persons,
                    width=image.width,
                    height=image.height,
                )
                for upload, image, result in zip(uploads, images, results, strict=True)
            ],
            timings=AddImagesTimings(
                decode_ms=_ms(started, decoded),
                detect_ms=_ms(decoded, detected),
                store_ms=_ms(detected, finished),
                total_ms=_ms(started, finished),
            ),
        )

    def _decode(self, upload: Upload, what: str) -> DecodedImage:
        check_media_type(upload.media_type, what)
        return decode_image(upload.data, self.settings.max_image_pixels, what)

    def _new_image(
        self,
        upload: Upload,
        image: DecodedImage,
        detections: Any,
        camera: str | None,
        timestamp: float | None,
    ) -> NewImage:
        scores = np.asarray(detections.scores, dtype=np.float64)
        keep = (scores > 0) & (scores >= self.settings.min_detection_score)
        return NewImage(
            data=upload.data,
            boxes=np.asarray(detections.boxes, dtype=np.float64)[keep].reshape(-1, 4),
            scores=scores[keep],
            embeddings=np.asarray(detections.embeddings, dtype=np.float32)[keep],
            width=image.width,
            height=image.height,
            camera=camera,
            timestamp=timestamp,
            uri=upload.filename,
        )

    def _store(self, uploads: Sequence[Upload], images: list[NewImage]) -> list[AddResult]:
        # Files first: once an image id is visible, its file can be served.
        for upload in uploads:
            self.files.save(hashlib.sha256(upload.data).hexdigest(), upload.data)
        return self.gallery.add_images(images)


class GalleryService:
    """Reading and removing gallery images; no engine needed."""

    def __init__(
        self, settings: ServerSettings, gallery: Gallery, files: ImageFiles, model: ModelOut
    ) -> None:
        self.settings = settings
        self.gallery = gallery
        self.files = files
        self.model = model

    def get_image(self, image_id: int) -> ImageOut:
        """The image's metadata and persons; 404 if there is no such image."""
        info = self._image(image_id)
        return ImageOut(
            id=info.id,
            uri=info.uri,
            sha256=info.sha256,
            camera=info.camera,
            timestamp=info.timestamp,
            width=info.width,
            height=info.height,
            added_at=info.added_at,
            persons=[
                PersonOut(id=person.id, box=list(person.box), det_score=person.det_score)
                for person in info.persons
            ],
        )

    def remove_image(self, image_id: int) -> RemovedImage:
        """Remove the image, its persons and its kept file; 404 if there is no such image."""
        sha256 = self._image(image_id).sha256
        try:
            removed = self.gallery.remove_image(image_id)
        except ImageNotFound as error:  # removed by another request meanwhile
            raise NotFound(str(error)) from None
        self.files.remove(sha256)
        return RemovedImage(image_id=image_id, num_persons=removed)

    def image_file(self, image_id: int) -> tuple[Path, str]:
        """(path, media type) of the image's file: the uploaded bytes, or a file under an allowed
        root whose content still hashes as indexed; 404 otherwise."""
        info = self._image(image_id)
        path = self.files.find(info.sha256) or self._indexed_file(info.uri, info.sha256)
        if path is None:
            raise NotFound(f"the file of image {image_id} is not available on this server")
        return path, media_type(path)

    def _indexed_file(self, uri: str | None, sha256: str) -> Path | None:
        if not uri or not self.settings.allowed_roots:
            return None
        path = Path(uri)
        if not path.is_absolute() or not path.is_file():
            return None
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root.resolve()) for root in self.settings.allowed_roots):
            return None
        if hashlib.sha256(resolved.read_bytes()).hexdigest() != sha256:
            return None  # changed since it was indexed: it is not the image any more
        return resolved

    def stats(self) -> GalleryStatsOut:
        """Counts and settings of the gallery."""
        stats = self.gallery.stats()
        return GalleryStatsOut(
            num_images=stats.num_images,
            num_persons=stats.num_persons,
            indexed=stats.indexed,
            pending=stats.pending,
            dim=stats.dim,
            metric=stats.metric,
            index_type=stats.index_type,
            fingerprint=stats.fingerprint,
        )

    def counts(self) -> tuple[int, int]:
        """(images, persons) in the gallery."""
        stats = self.gallery.stats()
        return stats.num_images, stats.num_persons

    def _image(self, image_id: int) -> ImageInfo:
        try:
            return self.gallery.get_image(image_id)
        except ImageNotFound as error:
            raise NotFound(str(error)) from None


@dataclass
class Services:
    """Everything loaded: the gallery, the batcher on the engine, and the services on them."""

    gallery: Gallery
    batcher: MicroBatcher[Job, Any]
    search: SearchService
    gallery_service: GalleryService
    jobs: JobService

    @property
    def model(self) -> ModelOut:
        return self.gallery_service.model


def load_engine_and_gallery(
    settings: ServerSettings, load_engine: EngineLoader
) -> tuple[Engine, Gallery]:
    """Load the model, warm it up, and open (or create) its gallery: blocking, for a worker
    thread.

    Raises :class:`ModelMismatch` when the gallery belongs to another model, :class:`NotReady`
    when there is no gallery and ``create_gallery`` is off.
    """
    engine = load_engine(settings)
    try:
        gallery = Gallery.open(settings.gallery_dir, engine.info.fingerprint)
    except GalleryMismatch as error:
        raise ModelMismatch(str(error)) from None
    except GalleryNotFound as error:
        if not settings.create_gallery:
            raise NotReady(f"{error}; create one, or set create_gallery") from None
        gallery = Gallery.create(settings.gallery_dir, engine.info.fingerprint, engine.info.dim)
    try:
        warm_up(engine)
    except BaseException:
        gallery.close()
        raise
    return engine, gallery


async def start_services(
    settings: ServerSettings, engine: Engine, gallery: Gallery, metrics: ServiceMetrics
) -> Services:
    """Start the batcher on the engine, build the services, and start the job runner, which
    resumes the jobs left unfinished (in the event loop). Stop them with :func:`stop_services`.
    """
    batcher: MicroBatcher[Job, Any] = MicroBatcher(
        InferenceWorker(engine),
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        queue_size=settings.queue_size,
        retry_after_s=settings.retry_after_s,
        observer=metrics,
        name="inference",
    )
    await batcher.start()
    files = ImageFiles(settings.uploads_dir)
    info = engine.info
    model = ModelOut(
        name=info.name,
        fingerprint=info.fingerprint,
        dim=info.dim,
        backend=str(info.backend),
        device=str(info.device),
    )
    try:
        jobs = await run_in_threadpool(
            JobService.open, settings, gallery, batcher, model, asyncio.get_running_loop()
        )
    except BaseException:
        await batcher.stop()
        raise
    return Services(
        gallery=gallery,
        batcher=batcher,
        search=SearchService(settings, gallery, batcher, files),
        gallery_service=GalleryService(settings, gallery, files, model),
        jobs=jobs,
    )


async def stop_services(services: Services) -> None:
    """Stop the job runner (its running job stops after its current batch, which still needs
    the batcher and the gallery), then the batcher, then close the gallery, which writes its
    index snapshot."""
    await run_in_threadpool(services.jobs.close)  # off the loop: the last batch needs it
    await services.batcher.stop()
    await run_in_threadpool(services.gallery.close)


class ServiceState:
    """The services once loaded; until then, or when loading failed, why there are none."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self.services: Services | None = None
        self._failure: tuple[type[ServiceError], str] | None = None

    def fail(self, error: ServiceError) -> None:
        """Loading failed for good: requests get this error from now on."""
        self._failure = (type(error), error.message)

    def require(self) -> Services:
        """The services; raises while loading (503) or if loading failed."""
        if self.services is not None:
            return self.services
        if self._failure is not None:
            error_type, message = self._failure
            raise error_type(message)  # a new exception each time: tracebacks do not pile up
        raise NotReady(
            "the model and the gallery are still loading", retry_after_s=self.retry_after_s
        )


def _requested_box(box: list[float] | None, image: DecodedImage) -> Box:
    """The query box asked for (the whole image when none), checked to lie inside the image."""
    if box is None:
        return (0.0, 0.0, float(image.width), float(image.height))
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 > image.width or y2 > image.height:
        raise InvalidField(
            f"box: {box} is not inside the {image.width} x {image.height} image "
            f"(0 <= x1 < x2 <= {image.width}, 0 <= y1 < y2 <= {image.height})"
        )
    return (x1, y1, x2, y2)


def _one_per_image(values: list[Any], count: int, field: str) -> list[Any]:
    """None, one for all, or one per image -> one per image (422 otherwise)."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InvalidField(
            f"{field}: {len(values)} values for {count} images; give none, one for all, or "
            "one per image"
        )
    return values


async def _all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all, then raise the first error if any (every error is retrieved: none is left
    to be logged as never retrieved)."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _hit(hit: Hit) -> SearchHit:
    return SearchHit(
        person_id=hit.person_id,
        image_id=hit.image_id,
        uri=hit.uri,
        camera=hit.camera,
        timestamp=hit.timestamp,
        box=list(hit.box),
        similarity=hit.similarity,
        det_score=hit.det_score,
    )


def _name(upload: Upload, index: int) -> str:
    return f"image {index} ({upload.filename})" if upload.filename else f"image {index}"


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
