"""The service's business logic, behind the routers.

- :class:`SearchService`: search (decode the query, embed it on the inference worker, search
  the gallery) and adding images (decode, detect on the worker, store in one transaction).
- :class:`GalleryService`: reading and removing gallery images, serving their files, counts.
- :class:`~server.jobs.JobService`: bulk indexing jobs, run on the batcher in the background.

``server/lifecycle.py`` builds them once the model and the gallery are loaded. Blocking work
(decoding, SQLite, FAISS, files) runs in the thread pool, never on the event loop; the engine
runs only on the batcher's worker thread.
"""

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from common.boxes import Box
from common.reading import FileRefused, read_regular_file
from indexer.images import image_media_type
from indexer.store import Gallery
from indexer.types import Hit, ImageInfo, ImageNotFound, NewImage
from server.batcher import MicroBatcher
from server.errors import InvalidField, NotFound, TooLarge
from server.roots import AllowedRoots
from server.schemas import (
    AddedImage,
    AddImagesResponse,
    AddImagesTimings,
    GalleryStatsOut,
    ImageOut,
    PersonOut,
    QueryInfo,
    RemovedImage,
    SearchForm,
    SearchHit,
    SearchResponse,
    SearchTimings,
)
from server.settings import ServerSettings
from server.timing import Timeline
from server.uploads import Upload, decode_upload, image_size
from server.worker import DetectTask, InferenceTask, QueryEmbedding, QueryTask

T = TypeVar("T")


class SearchService:
    """Searches and adds images: the work that needs the engine."""

    def __init__(
        self,
        settings: ServerSettings,
        gallery: Gallery,
        batcher: MicroBatcher[InferenceTask, Any],
        min_score: float,
    ) -> None:
        self.settings = settings
        self.gallery = gallery
        self.batcher = batcher
        self.min_score = min_score  # the setting, or the model's recommended threshold

    async def search(
        self, upload: Upload, form: SearchForm, timeline: Timeline | None = None
    ) -> SearchResponse:
        """Embed the query person and find the most similar gallery persons, marking each step
        on the request's ``timeline`` (``server/timing.py``)."""
        timeline = timeline or Timeline()
        started = timeline.mark("receive")
        if form.top_k > self.settings.top_k_max:
            raise InvalidField(
                f"top_k: {form.top_k} is more than this service returns ({self.settings.top_k_max})"
            )
        pixels = await run_in_threadpool(self._decode, upload, "the query image")
        decoded = timeline.mark("decode")
        width, height = image_size(pixels)
        requested = _requested_box(form.box, width, height)
        query: QueryEmbedding
        query, run = await self.batcher.submit_timed(QueryTask(pixels, requested))
        timeline.mark("queue", run.started)
        timeline.mark("engine", run.finished)
        embedded = timeline.mark("wake")
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
        finished = timeline.mark("search")
        return SearchResponse(
            query=QueryInfo(
                box=list(query.box),
                method=query.method,
                requested_box=list(requested),
                iou=query.iou,
                det_score=query.det_score,
                width=width,
                height=height,
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
        """Detect the persons in each image and store all images in one gallery transaction,
        each with its bytes kept as its file (written before the transaction commits, removed
        with the image)."""
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
        detections = await _all(self.batcher.submit(DetectTask(pixels)) for pixels in images)
        detected = time.perf_counter()
        sizes = [image_size(pixels) for pixels in images]
        new_images = [
            NewImage.from_detections(
                upload.data,
                found,
                width=width,
                height=height,
                min_score=self.min_score,
                camera=camera,
                timestamp=timestamp,
                uri=upload.filename,
                keep_file=True,
            )
            for upload, (width, height), found, camera, timestamp in zip(
                uploads, sizes, detections, per_image_cameras, per_image_timestamps, strict=True
            )
        ]
        results = await run_in_threadpool(self.gallery.add_images, new_images)
        finished = time.perf_counter()
        return AddImagesResponse(
            images=[
                AddedImage(
                    filename=upload.filename,
                    image_id=result.image_id,
                    sha256=result.sha256,
                    added=result.added,
                    num_persons=result.num_persons,
                    width=width,
                    height=height,
                )
                for upload, (width, height), result in zip(uploads, sizes, results, strict=True)
            ],
            timings=AddImagesTimings(
                decode_ms=_ms(started, decoded),
                detect_ms=_ms(decoded, detected),
                store_ms=_ms(detected, finished),
                total_ms=_ms(started, finished),
            ),
        )

    def _decode(self, upload: Upload, what: str) -> np.ndarray:
        settings = self.settings
        return decode_upload(upload, settings.max_image_pixels, settings.max_image_bytes, what)


@dataclass(frozen=True)
class ImageFile:
    """A gallery image's file to serve, as read (a file removed or swapped after this read
    changes nothing about the answer)."""

    content: bytes
    media_type: str


class GalleryService:
    """Reading and removing gallery images; no engine needed."""

    def __init__(self, settings: ServerSettings, gallery: Gallery, roots: AllowedRoots) -> None:
        self.settings = settings
        self.gallery = gallery
        self.roots = roots

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
        """Remove the image, its persons and its kept file (the gallery removes them together);
        404 if there is no such image."""
        try:
            removed = self.gallery.remove_image(image_id)
        except ImageNotFound as error:
            raise NotFound(str(error)) from None
        return RemovedImage(image_id=image_id, num_persons=removed)

    def image_file(self, image_id: int) -> ImageFile:
        """The image's file: the bytes uploaded to this service, or the file the image was
        indexed from (a folder, a manifest, ``psearch-index add``) when it lies under an allowed
        root and still holds the same bytes; 404 saying why otherwise."""
        info = self._image(image_id)
        content = self._kept_file(info) or self._indexed_file(info)
        return ImageFile(content, image_media_type(content))

    def _kept_file(self, info: ImageInfo) -> bytes | None:
        kept = self.gallery.kept_file(info.sha256)
        try:
            return None if kept is None else kept.read_bytes()
        except FileNotFoundError:  # the image was removed since it was looked up
            raise NotFound(f"no image with id {info.id}") from None

    def _indexed_file(self, info: ImageInfo) -> bytes:
        """The bytes of the file an image was indexed from, read as a job reads (within the
        allowed roots, a regular file of at most max_image_bytes) and checked against its
        hash: what is served is what was checked."""
        unavailable = f"the file of image {info.id} is not available on this server"
        if not info.uri or not Path(info.uri).is_absolute():
            raise NotFound(f"{unavailable}: it was not uploaded here and has no server path")
        if self.roots.locate(info.uri) is None:
            raise NotFound(
                f"{unavailable}: {info.uri} is outside the allowed roots "
                f"({self.roots.describe()}); add its folder to allowed_roots to serve it"
            )
        try:
            content = read_regular_file(info.uri, self.settings.max_image_bytes, self.roots.roots)
        except FileRefused as error:
            raise NotFound(f"{unavailable}: {error}") from None
        except OSError as error:
            raise NotFound(f"{unavailable}: {info.uri}: {error.strerror or error}") from None
        if hashlib.sha256(content).hexdigest() != info.sha256:
            raise NotFound(f"{unavailable}: {info.uri} has changed since it was indexed")
        return content

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


def _requested_box(box: list[float] | None, width: int, height: int) -> Box:
    """The query box asked for (the whole image when none), checked to lie inside the image."""
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise InvalidField(
            f"box: {box} is not inside the {width} x {height} image "
            f"(0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height})"
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
