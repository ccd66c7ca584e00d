"""The gallery: person embeddings in SQLite (the truth) and a FAISS index over them (a snapshot).

A gallery is a folder::

    gallery.sqlite   images, persons (box, detection score, embedding), jobs; WAL mode
    vectors.faiss    FAISS index of the person embeddings, ids = person ids, inner product
    manifest.json    fingerprint, dim, metric, index type and params, watermark
    files/           the bytes of uploaded images, by content hash (indexer/image_files.py)
    gallery.lock     held (flock) by the one process that has the gallery open; not empty
                     while it is open, so the next opener knows when the last one crashed

Durability: every add and remove is one SQLite transaction, committed (``synchronous=FULL``)
before it is acknowledged and before its persons enter the in-memory index. ``snapshot()``
writes the index file durably and only then moves the manifest's watermark. Opening the gallery
loads the snapshot and replays what SQLite holds beyond it, so a crash at any point loses
nothing acknowledged and duplicates nothing (images are keyed by the SHA-256 of their bytes).
A kept file is written before its image's transaction and removed after the removal's, under
the write lock, so an image is never seen without its file; opening after a crash removes the
files that no image references any more. A bulk job's progress is recorded in the transaction
that stores its images (``job=`` of :meth:`Gallery.add_images`), so a crash never leaves an
image stored that its job does not know it added.

Concurrency: searches may run in any number of threads while one thread adds. Writers are
serialised by a lock held over the SQLite transaction and the index update; the FAISS index
itself is guarded by a second lock, so a search sees an image's persons all at once, and only
after their transaction committed. Each thread uses its own SQLite connection.
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.files import remove_leftover_temporaries
from indexer import schema
from indexer.image_files import FILES_FOLDER, ImageFiles
from indexer.index import IndexSpec, IndexTrainingError, VectorIndex, resolve_spec
from indexer.jobs import JobProgress, record_outcomes
from indexer.schema import SQLITE_FILE
from indexer.snapshot import SnapshotManifest, read_snapshot_manifest, write_snapshot_manifest
from indexer.types import (
    AddResult,
    GalleryBusy,
    GalleryError,
    GalleryExists,
    GalleryMismatch,
    GalleryNotFound,
    GalleryStats,
    Hit,
    ImageInfo,
    ImageNotFound,
    NewImage,
    Person,
)
from indexer.validation import check_camera, check_detections, check_query

INDEX_FILE = "vectors.faiss"
SNAPSHOT_MANIFEST_FILE = "manifest.json"
LOCK_FILE = "gallery.lock"
METRIC = "inner_product"

_CHUNK = 65536  # persons read from SQLite at a time when (re)filling an index
_SAMPLE_SEED = 0  # training samples are reproducible

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _PreparedImage:
    """A validated image, ready to insert: hashed, its arrays checked."""

    sha256: str
    uri: str | None
    camera: str | None
    timestamp: float | None
    width: int
    height: int
    boxes: np.ndarray  # (n, 4)
    scores: np.ndarray  # (n,)
    embeddings: np.ndarray  # (n, D) float32, unit norm
    kept_bytes: bytes | None  # the bytes to keep as the image's file (keep_file), else None


class Gallery:
    """A person gallery on local disk. Use :meth:`create` or :meth:`open` (or
    :func:`open_gallery_for`, which creates a missing one), then :meth:`close` (or a ``with``
    block), which snapshots the index when it changed.

    What the indexer and the service use of it, and all that another store would provide:

    - its model: ``fingerprint``, ``dim``, :meth:`check_model`;
    - writing: :meth:`add_images` (:meth:`add_image` for one), with a bulk job's progress in
      the same transaction (``job=``), and with the image's bytes kept as its file
      (``NewImage.keep_file``); :meth:`remove_image`, which removes the kept file too;
    - reading: :meth:`get_image` (by id), :meth:`image_by_sha256` (by content),
      :meth:`images_by_uri` (by where it came from), :meth:`kept_file`, :meth:`search`,
      :meth:`stats`;
    - upkeep: :meth:`snapshot`, :meth:`rebuild`, :meth:`close`.

    Bulk jobs (``indexer/jobs.py``) keep their records in the same SQLite file (``path``).
    """

    def __init__(self, root: Path, lock_descriptor: int) -> None:
        """Not for direct use: takes over an already acquired lock on ``root``."""
        self.path = root
        self._lock_descriptor: int | None = lock_descriptor
        self._local = threading.local()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}  # one per thread
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer: SQLite transaction + index update
        self._index_lock = threading.Lock()  # the FAISS index: mutation vs search
        self._dirty = False  # changed since the last snapshot
        self._files = ImageFiles(root / FILES_FOLDER)
        self._crashed_before = _mark_open(lock_descriptor)  # its files may need a sweep
        for name in (INDEX_FILE, SNAPSHOT_MANIFEST_FILE):  # what a crash mid-snapshot left
            remove_leftover_temporaries(root / name)
        meta = schema.read_meta(self._db())
        if "fingerprint" not in meta:
            self.close(snapshot=False)
            raise GalleryError(
                f"{root / SQLITE_FILE} is not a complete gallery (was its creation interrupted?)"
            )
        schema.add_missing_indexes(self._db())
        self.fingerprint: str = meta["fingerprint"]
        self.dim = int(meta["dim"])
        self._spec = IndexSpec(meta["index_type"], json.loads(meta["index_params"]))
        self._index: VectorIndex = VectorIndex.new(IndexSpec(), self.dim)  # replaced on load
        self._watermark = 0

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | PathLike,
        fingerprint: str,
        dim: int,
        index_type: str = "flat",
        **index_params: Any,
    ) -> "Gallery":
        """Create an empty gallery in folder ``path`` (made if missing) for the model with this
        ``fingerprint`` and embedding dimension ``dim``.

        IVF index types are trained on stored embeddings, so a new gallery is "flat" (optionally
        ``gpu=True``); switch with :meth:`rebuild` once it holds enough persons.
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        spec = resolve_spec(index_type, dim, 0, **index_params)
        if spec.needs_training:
            raise ValueError(
                f"{index_type} is trained on stored embeddings and a new gallery has none: "
                "create it 'flat', add images, then rebuild"
            )
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        lock_descriptor = _lock(root)
        try:
            if (root / SQLITE_FILE).exists():
                raise GalleryExists(f"a gallery already exists at {root}")
            meta = {
                "fingerprint": fingerprint,
                "dim": str(dim),
                "metric": METRIC,
                "index_type": spec.type,
                "index_params": json.dumps(spec.params, sort_keys=True),
            }
            connection = schema.connect(root / SQLITE_FILE)
            schema.create_tables(connection, meta)
            connection.close()
        except BaseException:
            os.close(lock_descriptor)
            raise
        gallery = cls(root, lock_descriptor)
        with gallery._write_lock:
            gallery._index = VectorIndex.new(spec, dim)
            gallery._snapshot_locked()
        return gallery

    @classmethod
    def open(cls, path: str | PathLike, fingerprint: str | None) -> "Gallery":
        """Open the gallery in folder ``path`` for the model with this ``fingerprint``.

        Raises :class:`GalleryMismatch` when the gallery was built with another model (``None``
        skips the check: for tools that only count, remove or rebuild), :class:`GalleryBusy`
        when it is open elsewhere. Loads the index snapshot and replays the persons added or
        removed after it; a missing, corrupt or outdated snapshot is rebuilt from SQLite.
        """
        root = Path(path)
        if not (root / SQLITE_FILE).is_file():
            raise GalleryNotFound(f"no gallery at {root} (no {SQLITE_FILE} there)")
        gallery = cls(root, _lock(root))
        try:
            gallery.check_model(fingerprint)
            gallery._load_index()
            if gallery._crashed_before:
                gallery._sweep_files()
        except BaseException:
            gallery.close(snapshot=False)
            raise
        return gallery

    def close(self, snapshot: bool = True) -> None:
        """Snapshot the index if it changed (unless ``snapshot=False``), close the SQLite
        connections and release the gallery. Closing twice is harmless."""
        if self._lock_descriptor is None:
            return
        if snapshot and self._dirty:
            self.snapshot()
        with self._connections_lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
        if not self._crashed_before:  # else the files still need the sweep of the next open
            os.ftruncate(self._lock_descriptor, 0)  # closed cleanly
        os.close(self._lock_descriptor)  # releases the flock
        self._lock_descriptor = None

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check_model(self, fingerprint: str | None, dim: int | None = None) -> None:
        """Refuse, with :class:`GalleryMismatch` naming both, a model whose embeddings are not
        comparable with the gallery's: another fingerprint, or another dimension (None skips
        that check)."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise GalleryMismatch(
                f"the gallery at {self.path} holds embeddings of model {self.fingerprint!r}, but "
                f"model {fingerprint!r} was given: embeddings of two models are not comparable "
                "(index the images again with this model, into a new gallery)"
            )
        if dim is not None and dim != self.dim:
            raise GalleryMismatch(
                f"the gallery at {self.path} holds {self.dim}-dimensional embeddings, the model "
                f"gives {dim}"
            )

    def _load_index(self) -> None:
        with self._write_lock:
            manifest = read_snapshot_manifest(self.path / SNAPSHOT_MANIFEST_FILE)
            snapshot = self._read_snapshot(manifest)
            if snapshot is None or manifest is None:
                self._rebuild_locked(self._spec, fall_back_to_flat=True)
                return
            self._index, self._watermark = snapshot, manifest.watermark
            self._catch_up()
            persons = self._count("persons")
            if self._index.ntotal != persons:
                logger.warning(
                    "%s: index holds %d vectors for %d persons after replay; rebuilding it",
                    self.path,
                    self._index.ntotal,
                    persons,
                )
                self._rebuild_locked(self._spec, fall_back_to_flat=True)

    def _sweep_files(self) -> None:
        """After a crash: remove the kept files no image references and half-written ones."""
        removed = self._files.sweep(self._referenced_hashes)
        if removed:
            logger.warning("%s: removed %d files left by a crash", self.path, removed)
        self._crashed_before = False

    def _referenced_hashes(self, hashes: list[str]) -> set[str]:
        rows = self._db().execute(
            "SELECT sha256 FROM images WHERE sha256 IN (SELECT value FROM json_each(?))",
            (json.dumps(hashes),),
        )
        return {row[0] for row in rows}

    def _read_snapshot(self, manifest: SnapshotManifest | None) -> VectorIndex | None:
        """The snapshot if the manifest vouches for it as an index of the current spec."""
        expected = (self.fingerprint, self.dim, self._spec.type, self._spec.params)
        if manifest is None:
            logger.warning("%s: manifest missing or unreadable; rebuilding the index", self.path)
            return None
        found = (manifest.fingerprint, manifest.dim, manifest.index_type, manifest.index_params)
        if found != expected:
            logger.warning("%s: snapshot is of another index spec; rebuilding it", self.path)
            return None
        try:
            return VectorIndex.read(self.path / INDEX_FILE, self._spec, self.dim)
        except ValueError as error:
            logger.warning("%s: %s; rebuilding the index", self.path, error)
            return None

    def _catch_up(self) -> None:
        """Bring a freshly loaded snapshot up to date with SQLite."""
        removed = self._db().execute("SELECT person_id FROM removed_persons").fetchall()
        changed = self._index.remove(np.array([row[0] for row in removed], dtype=np.int64))
        # A crash after the index file was replaced but before the manifest was can leave
        # persons above the manifest's watermark in the file: drop them, the replay re-adds them.
        changed += self._index.remove_above(self._watermark)
        for ids, vectors in self._stored_embeddings(after_id=self._watermark):
            self._index.add(ids, vectors)
            changed += len(ids)
        self._dirty = changed > 0

    # -- adding and removing ---------------------------------------------------------------

    def add_image(
        self,
        data: bytes | str | PathLike,
        detections: Sequence[Any],
        *,
        width: int,
        height: int,
        camera: str | None = None,
        timestamp: float | None = None,
        uri: str | None = None,
    ) -> AddResult:
        """Add one image and its detections ``(boxes (n, 4), scores (n,), embeddings (n, D))``
        (a tuple, or the runtime's ``ImageDetections`` of one image). Adding an image whose bytes
        are already stored changes nothing and returns ``added=False``. See :class:`NewImage`.
        """
        boxes, scores, embeddings = detections
        image = NewImage(data, boxes, scores, embeddings, width, height, camera, timestamp, uri)
        return self.add_images([image])[0]

    def add_images(
        self, images: Iterable[NewImage], *, job: JobProgress | None = None
    ) -> list[AddResult]:
        """Add many images in ONE transaction: all of them are stored, or (on error) none.

        Inputs are validated (and files read and hashed) before the transaction starts.
        Duplicates, within the batch or of stored images, are reported with ``added=False``.
        The bytes of images with ``keep_file`` are kept as their file (:meth:`kept_file`)
        before the transaction commits. ``job``: the outcomes of a bulk job's items, recorded in
        the same transaction (one per image, whose status and image id this call fills in, and
        the job's other outcomes).
        """
        prepared = [self._prepare(image) for image in images]
        if job is not None and len(job.images) != len(prepared):
            raise ValueError(f"{len(prepared)} images, but job outcomes for {len(job.images)}")
        kept = {image.sha256: image.kept_bytes for image in prepared if image.kept_bytes}
        for sha256, data in kept.items():  # the slow, durable writes: outside the lock
            self._files.save(sha256, data)
        with self._write_lock:
            for sha256, data in kept.items():  # a removal of the same bytes may have run since
                self._files.save(sha256, data)
            connection = self._db()
            connection.execute("BEGIN IMMEDIATE")
            try:
                results, person_ids, vectors = _insert_images(connection, prepared)
                if job is not None:
                    record_outcomes(connection, job.job_id, job.outcomes(results))
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                for sha256 in set(kept) - self._referenced_hashes(list(kept)):
                    self._files.remove(sha256)  # kept for images that were not stored
                raise
            # Only now, after the commit, do the new persons become searchable.
            if person_ids:
                with self._index_lock:
                    self._index.add(np.array(person_ids, dtype=np.int64), np.concatenate(vectors))
                self._dirty = True
        return results

    def _prepare(self, image: NewImage) -> _PreparedImage:
        if isinstance(image.data, bytes | bytearray | memoryview):
            content, uri = bytes(image.data), image.uri
        else:
            content = Path(image.data).read_bytes()
            uri = image.uri if image.uri is not None else str(image.data)
        for name in ("width", "height"):
            value = getattr(image, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if image.timestamp is not None and not math.isfinite(image.timestamp):
            raise ValueError(f"timestamp must be finite POSIX seconds, got {image.timestamp!r}")
        boxes, scores, embeddings = check_detections(
            image.boxes, image.scores, image.embeddings, self.dim
        )
        return _PreparedImage(
            sha256=hashlib.sha256(content).hexdigest(),
            uri=uri,
            camera=check_camera(image.camera),
            timestamp=None if image.timestamp is None else float(image.timestamp),
            width=int(image.width),
            height=int(image.height),
            boxes=boxes,
            scores=scores,
            embeddings=embeddings,
            kept_bytes=content if image.keep_file else None,
        )

    def remove_image(self, image_id: int) -> int:
        """Remove an image, its persons (from SQLite and the index) and its kept file; returns
        the number of persons removed. Raises :class:`ImageNotFound` when there is no such
        image."""
        with self._write_lock:
            connection = self._db()
            connection.execute("BEGIN IMMEDIATE")
            try:
                found = connection.execute(
                    "SELECT sha256 FROM images WHERE id = ?", (image_id,)
                ).fetchone()
                if found is None:
                    raise ImageNotFound(f"no image with id {image_id}")
                person_ids = [
                    row[0]
                    for row in connection.execute(
                        "SELECT id FROM persons WHERE image_id = ?", (image_id,)
                    )
                ]
                # The snapshot on disk still holds these persons: remember to drop them on open.
                connection.executemany(
                    "INSERT OR IGNORE INTO removed_persons (person_id) VALUES (?)",
                    [(person_id,) for person_id in person_ids],
                )
                connection.execute("DELETE FROM images WHERE id = ?", (image_id,))  # cascades
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            # After the commit, before the lock is released: no add of these bytes in between.
            self._files.remove(found[0])
            with self._index_lock:
                self._index.remove(np.array(person_ids, dtype=np.int64))
            self._dirty = True
        return len(person_ids)

    # -- reading ---------------------------------------------------------------------------

    def get_image(self, image_id: int) -> ImageInfo:
        """The stored image with this id and its persons; :class:`ImageNotFound` if none."""
        found = self._images_where("id = ?", image_id)
        if not found:
            raise ImageNotFound(f"no image with id {image_id}")
        return found[0]

    def image_by_sha256(self, sha256: str) -> ImageInfo | None:
        """The stored image whose bytes have this SHA-256 (hex digest), or None: images are
        keyed by content, so there is at most one."""
        found = self._images_where("sha256 = ?", sha256)
        return found[0] if found else None

    def kept_file(self, sha256: str) -> Path | None:
        """The file kept for the image with these bytes (it was added with ``keep_file``), or
        None."""
        return self._files.find(sha256)

    def images_by_uri(self, uri: str) -> list[ImageInfo]:
        """The stored images recorded under ``uri`` (the path they were indexed from, or an
        upload's file name), oldest first. A uri may name several images: a file that changed
        and was indexed again, two uploads of one name."""
        return self._images_where("uri = ?", uri)

    def _images_where(self, condition: str, value: Any) -> list[ImageInfo]:
        """The images matching one SQL ``condition`` on ``images`` with its persons, read in one
        snapshot (an image is never seen without the persons it was stored with)."""
        connection = self._db()
        connection.execute("BEGIN")
        try:
            images = connection.execute(
                "SELECT id, uri, sha256, camera, timestamp, width, height, added_at "
                f"FROM images WHERE {condition} ORDER BY id",
                (value,),
            ).fetchall()
            persons = connection.execute(
                "SELECT image_id, id, x1, y1, x2, y2, det_score FROM persons "
                "WHERE image_id IN (SELECT value FROM json_each(?)) ORDER BY id",
                (json.dumps([row[0] for row in images]),),
            ).fetchall()
        finally:
            connection.execute("COMMIT")
        by_image: dict[int, list[Person]] = {}
        for row in persons:
            by_image.setdefault(row[0], []).append(Person(row[1], tuple(row[2:6]), row[6]))
        return [ImageInfo(*row, persons=tuple(by_image.get(row[0], ()))) for row in images]

    def search(
        self,
        query: Any,
        top_k: int = 10,
        *,
        cameras: Sequence[str] | str | None = None,
        time_range: tuple[float | None, float | None] | None = None,
        exclude_images: Iterable[int] | None = None,
        min_similarity: float | None = None,
    ) -> list[Hit]:
        """The ``top_k`` persons most similar to ``query`` (D,) (L2-normalised), best first.

        Filters: ``cameras`` (the image's camera is one of these; a name that no image can
        have, see :func:`~indexer.validation.check_camera`, is a ValueError), ``time_range``
        ``(start, end)`` POSIX seconds, inclusive, either end None for open (images without
        camera or timestamp fail these filters), ``exclude_images`` (image ids),
        ``min_similarity``.
        Similarities are cosines computed from the stored embeddings; IVF-PQ ranks
        ``rerank * top_k`` candidates by them. With IVF indexes a very selective filter can
        return fewer hits than exist, as only ``nprobe`` lists are visited; HNSW widens its
        search for a filter, and scans a very selective one exactly (``indexer/index.py``).
        """
        vector = check_query(query, self.dim)  # (1, D)
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        allowed, excluded = self._filter_person_ids(cameras, time_range, exclude_images)
        if allowed is not None and not len(allowed):
            return []  # the camera/time filters leave nobody
        selector = _selector(allowed, excluded)
        candidates = top_k * self._index.spec.params.get("rerank", 1)
        selected = None if allowed is None else len(allowed)
        with self._index_lock:
            _, ids = self._index.search(vector, candidates, selector, selected=selected)
        hits = self._hits(ids[0][ids[0] >= 0], vector[0])
        if min_similarity is not None:
            hits = [hit for hit in hits if hit.similarity >= min_similarity]
        return hits[:top_k]

    def _filter_person_ids(
        self,
        cameras: Sequence[str] | str | None,
        time_range: tuple[float | None, float | None] | None,
        exclude_images: Iterable[int] | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(ids of the persons the camera/time filters allow (None: all), ids of the persons of
        the excluded images (None: none))."""
        conditions, parameters = [], []
        if cameras is not None:
            given = [cameras] if isinstance(cameras, str) else cameras
            names = [check_camera(name) for name in given]
            conditions.append("i.camera IN (SELECT value FROM json_each(?))")
            parameters.append(json.dumps(names))
        if time_range is not None:
            start, end = time_range
            if start is not None:
                conditions.append("i.timestamp >= ?")
                parameters.append(float(start))
            if end is not None:
                conditions.append("i.timestamp <= ?")
                parameters.append(float(end))
        connection = self._db()
        allowed = excluded = None
        if conditions:
            allowed = _ids(
                connection.execute(
                    "SELECT p.id FROM persons p JOIN images i ON i.id = p.image_id WHERE "
                    + " AND ".join(conditions),
                    parameters,
                )
            )
        if exclude_images is not None:
            image_ids = json.dumps([int(image_id) for image_id in exclude_images])
            excluded = _ids(
                connection.execute(
                    "SELECT id FROM persons WHERE image_id IN (SELECT value FROM json_each(?))",
                    (image_ids,),
                )
            )
        return allowed, excluded

    def _hits(self, person_ids: np.ndarray, query: np.ndarray) -> list[Hit]:
        """Hits for these persons, similarity recomputed from the stored embeddings, best first.
        Persons removed since the index was searched are left out."""
        rows = (
            self._db()
            .execute(
                "SELECT p.id, p.image_id, i.uri, i.camera, i.timestamp, p.x1, p.y1, p.x2, p.y2, "
                "p.det_score, p.embedding FROM persons p JOIN images i ON i.id = p.image_id "
                "WHERE p.id IN (SELECT value FROM json_each(?))",
                (json.dumps(person_ids.tolist()),),
            )
            .fetchall()
        )
        if not rows:
            return []
        similarities = _as_vectors([row[10] for row in rows], self.dim) @ query
        hits = [
            Hit(
                person_id=row[0],
                image_id=row[1],
                uri=row[2],
                camera=row[3],
                timestamp=row[4],
                box=tuple(row[5:9]),
                similarity=float(similarity),
                det_score=row[9],
            )
            for row, similarity in zip(rows, similarities, strict=True)
        ]
        return sorted(hits, key=lambda hit: (-hit.similarity, hit.person_id))

    def stats(self) -> GalleryStats:
        """Counts and settings of the gallery."""
        connection = self._db()
        pending = connection.execute(
            "SELECT count(*) FROM persons WHERE id > ?", (self._watermark,)
        ).fetchone()[0]
        return GalleryStats(
            path=str(self.path),
            fingerprint=self.fingerprint,
            dim=self.dim,
            metric=METRIC,
            index_type=self._index.spec.type,
            index_params=dict(self._index.spec.params),
            num_images=self._count("images"),
            num_persons=self._count("persons"),
            indexed=self._index.ntotal,
            watermark=self._watermark,
            pending=pending,
        )

    # -- snapshots and rebuilds ------------------------------------------------------------

    def snapshot(self) -> None:
        """Write the index durably to ``vectors.faiss``, then the manifest with the new
        watermark. An HNSW index holding many removed persons is rebuilt without them first
        (``indexer/index.py``). Adds wait meanwhile; searches go on."""
        with self._write_lock:
            self._snapshot_locked()

    def _snapshot_locked(self) -> None:
        if self._index.needs_compaction:  # HNSW tombstones (indexer/index.py)
            logger.info("%s: rebuilding the index without the persons removed", self.path)
            index = self._build_index(self._spec)
            with self._index_lock:
                self._index = index
        connection = self._db()
        # Writers are excluded, so the index holds exactly the committed persons: all ids up
        # to the last one ever assigned, less the removed ones.
        watermark = schema.last_person_id(connection)
        self._index.write(self.path / INDEX_FILE)
        manifest = SnapshotManifest(
            fingerprint=self.fingerprint,
            dim=self.dim,
            metric=METRIC,
            index_type=self._index.spec.type,
            index_params=self._index.spec.params,
            watermark=watermark,
            ntotal=self._index.ntotal,
        )
        write_snapshot_manifest(self.path / SNAPSHOT_MANIFEST_FILE, manifest)
        connection.execute("DELETE FROM removed_persons")  # the snapshot reflects them now
        self._watermark = watermark
        self._dirty = False

    def rebuild(self, index_type: str = "flat", **params: Any) -> None:
        """Rebuild the index as ``index_type`` from the embeddings in SQLite, and snapshot it.

        "flat" is exact; "ivf_flat" and "ivf_pq" are trained on a sample of the stored
        embeddings (params: ``nlist``, ``nprobe``, ``train_size``; IVF-PQ also ``m``,
        ``nbits``, ``rerank``); "hnsw" is a graph (params: ``links``, ``ef_construction``,
        ``ef_search``); ``gpu=True`` searches on GPU where FAISS has GPU support (not HNSW).
        Raises ValueError for too few stored embeddings to train. Adds wait meanwhile; searches
        use the old index until the new one is complete.
        """
        with self._write_lock:
            spec = resolve_spec(index_type, self.dim, self._count("persons"), **params)
            self._rebuild_locked(spec, fall_back_to_flat=False)

    def _rebuild_locked(self, spec: IndexSpec, fall_back_to_flat: bool) -> None:
        try:
            index = self._build_index(spec)
        except IndexTrainingError as error:
            if not fall_back_to_flat:
                raise
            logger.warning("%s: %s; falling back to a flat index", self.path, error)
            spec = IndexSpec("flat", {"gpu": spec.params["gpu"]})
            index = self._build_index(spec)
        # Record the new spec first: if we crash before the snapshot, opening rebuilds to it.
        connection = self._db()
        schema.write_meta(connection, "index_type", spec.type)
        schema.write_meta(connection, "index_params", json.dumps(spec.params, sort_keys=True))
        self._spec = spec
        with self._index_lock:
            self._index = index
        self._snapshot_locked()

    def _build_index(self, spec: IndexSpec) -> VectorIndex:
        training = (
            self._sample_embeddings(spec.params["train_size"]) if spec.needs_training else None
        )
        index = VectorIndex.new(spec, self.dim, training)
        for ids, vectors in self._stored_embeddings(after_id=0):
            index.add(ids, vectors)
        return index

    def _sample_embeddings(self, count: int) -> np.ndarray:
        """(min(count, persons), D) embeddings of persons drawn at random without replacement."""
        connection = self._db()
        person_ids = _ids(connection.execute("SELECT id FROM persons"))
        if count < len(person_ids):
            generator = np.random.default_rng(_SAMPLE_SEED)
            person_ids = np.sort(generator.choice(person_ids, size=count, replace=False))
        blobs = []
        for start in range(0, len(person_ids), _CHUNK):
            chunk = json.dumps(person_ids[start : start + _CHUNK].tolist())
            blobs += [
                row[0]
                for row in connection.execute(
                    "SELECT embedding FROM persons WHERE id IN (SELECT value FROM json_each(?))",
                    (chunk,),
                )
            ]
        return _as_vectors(blobs, self.dim)

    def _stored_embeddings(self, after_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (n,), embeddings (n, D)) chunks of the persons with id > ``after_id``."""
        cursor = self._db().execute(
            "SELECT id, embedding FROM persons WHERE id > ? ORDER BY id", (after_id,)
        )
        while rows := cursor.fetchmany(_CHUNK):
            ids = np.array([row[0] for row in rows], dtype=np.int64)
            yield ids, _as_vectors([row[1] for row in rows], self.dim)

    # -- helpers ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This thread's SQLite connection. Making one closes those of threads that have ended,
        so that a long-lived gallery read from many short-lived threads holds few."""
        if self._lock_descriptor is None:
            raise GalleryError(f"the gallery at {self.path} is closed")
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = schema.connect(self.path / SQLITE_FILE)
            self._local.connection = connection
            with self._connections_lock:
                for thread in [thread for thread in self._connections if not thread.is_alive()]:
                    self._connections.pop(thread).close()
                self._connections[threading.current_thread()] = connection
        return connection

    def _count(self, table: str) -> int:
        return self._db().execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def open_gallery_for(
    path: str | PathLike, fingerprint: str, dim: int, *, create: bool = True
) -> Gallery:
    """The gallery at ``path`` for the model with this ``fingerprint`` and embedding ``dim``:
    what every route that indexes (``psearch-index add``, the service, Ray) opens.

    A folder without a gallery gets a new (flat) one, unless ``create`` is False (then
    :class:`GalleryNotFound`). Raises :class:`GalleryMismatch` naming both models when the
    gallery holds another model's embeddings.
    """
    try:
        gallery = Gallery.open(path, fingerprint)
    except GalleryNotFound:
        if not create:
            raise
        return Gallery.create(path, fingerprint, dim)
    try:
        gallery.check_model(fingerprint, dim)
    except GalleryMismatch:
        gallery.close(snapshot=False)
        raise
    return gallery


def _lock(root: Path) -> int:
    """Take the gallery's exclusive lock (released when the descriptor closes, also when the
    process dies): two processes writing one gallery would each snapshot an index that lacks
    the other's persons."""
    descriptor = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise GalleryBusy(
            f"the gallery at {root} is open elsewhere (another process or Gallery object); "
            "a gallery is opened by one at a time"
        ) from None
    return descriptor


def _insert_images(
    connection: sqlite3.Connection, images: list[_PreparedImage]
) -> tuple[list[AddResult], list[int], list[np.ndarray]]:
    """Insert inside the caller's transaction: (results, new person ids, their embeddings)."""
    results: list[AddResult] = []
    person_ids: list[int] = []
    vectors: list[np.ndarray] = []
    seen: dict[str, AddResult] = {}  # duplicates within this batch
    added_at = time.time()
    for image in images:
        existing = seen.get(image.sha256) or _stored_image(connection, image.sha256)
        if existing is not None:
            results.append(existing)
            continue
        image_id = connection.execute(
            "INSERT INTO images (uri, sha256, camera, timestamp, width, height, added_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                image.uri,
                image.sha256,
                image.camera,
                image.timestamp,
                image.width,
                image.height,
                added_at,
            ),
        ).lastrowid
        for box, score, embedding in zip(image.boxes, image.scores, image.embeddings, strict=True):
            person_ids.append(
                connection.execute(
                    "INSERT INTO persons (image_id, x1, y1, x2, y2, det_score, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (image_id, *box.tolist(), float(score), embedding.astype("<f4").tobytes()),
                ).lastrowid
            )
        vectors.append(image.embeddings)
        seen[image.sha256] = AddResult(image_id, image.sha256, False, len(image.boxes))
        results.append(AddResult(image_id, image.sha256, True, len(image.boxes)))
    return results, person_ids, vectors


def _stored_image(connection: sqlite3.Connection, sha256: str) -> AddResult | None:
    row = connection.execute(
        "SELECT id, (SELECT count(*) FROM persons WHERE image_id = images.id) "
        "FROM images WHERE sha256 = ?",
        (sha256,),
    ).fetchone()
    return None if row is None else AddResult(row[0], sha256, False, row[1])


def _selector(allowed: np.ndarray | None, excluded: np.ndarray | None) -> faiss.IDSelector | None:
    """A FAISS selector of the person ids in ``allowed`` (None: all) and not in ``excluded``.

    Allowed ids become a bitmap over person ids (one bit per id up to the largest: 125 kB per
    million persons, and a constant-time test); excluded ones, usually few, a hash set.
    """
    selectors = []
    if allowed is not None:
        bitmap = np.zeros(int(allowed.max()) // 8 + 1, dtype=np.uint8)
        np.bitwise_or.at(bitmap, allowed >> 3, (1 << (allowed & 7)).astype(np.uint8))
        selectors.append(faiss.IDSelectorBitmap(bitmap))
    if excluded is not None and len(excluded):
        selectors.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)))
    if not selectors:
        return None
    if len(selectors) == 1:
        return selectors[0]
    return faiss.IDSelectorAnd(*selectors)


def _ids(cursor: sqlite3.Cursor) -> np.ndarray:
    return np.array([row[0] for row in cursor], dtype=np.int64)


def _as_vectors(blobs: list[bytes], dim: int) -> np.ndarray:
    """(n, dim) float32 from embedding BLOBs as stored in SQLite."""
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)


def _mark_open(lock_descriptor: int) -> bool:
    """Mark the gallery open in its lock file (emptied by a clean close); whether the last
    process to open it did not close it (it crashed, or was killed)."""
    crashed = os.fstat(lock_descriptor).st_size > 0
    os.ftruncate(lock_descriptor, 0)
    os.pwrite(lock_descriptor, b"open\n", 0)
    return crashed
