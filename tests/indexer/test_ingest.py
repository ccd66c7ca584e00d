"""The ingest pipeline and ``psearch-index add``, with a real (tiny, randomly initialised)
AlignPS model run by the runtime's PyTorch backend.

Why PyTorch and not ONNX Runtime: exporting even the tiny model to ONNX takes about 45 s on a
two-core machine, more than all of these tests; the runtime's own tests show that its backends
agree, and the pipeline only sees the Engine interface.
"""

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from export.parity import synthetic_images
from export.runtime import load_engine
from indexer.cli import main
from indexer.ingest import ItemResult, LoadedImage, SizeBatcher, WorkItem, detect_batch, ingest
from indexer.jobs import JobStore
from indexer.sources import ImageSource
from indexer.store import Gallery, open_gallery_for
from indexer.types import GalleryMismatch
from tests.hostile_files import fifo, sparse_file

LANDSCAPE, PORTRAIT = (64, 96), (96, 64)  # (height, width)


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir, "torch", "cpu", batch_size=4)


class CountingEngine:
    """The engine, counting the images it is given; ``interrupt_on_call`` raises
    KeyboardInterrupt at that call (1-based), as Ctrl-C would."""

    def __init__(self, engine, interrupt_on_call=None):
        self.engine, self.info = engine, engine.info
        self.interrupt_on_call = interrupt_on_call
        self.calls = self.images = 0

    def detect(self, images):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.images += len(images)
        return self.engine.detect(images)


def write_images(folder, sizes, seed=0, prefix="img"):
    """PNG files (lossless: decoding gives back the arrays) of smooth random images; returns
    (paths, arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = synthetic_images(sizes, seed)
    paths = []
    for index, pixels in enumerate(arrays):
        path = folder / f"{prefix}{index:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths, arrays


def sources_of(paths, camera=None):
    return [ImageSource(str(path), camera) for path in paths]


def stored_persons(gallery_path, image_id):
    """(boxes (n, 4), scores (n,), embeddings (n, D)) of an image, read from the SQLite file."""
    with sqlite3.connect(gallery_path / "gallery.sqlite") as connection:
        rows = connection.execute(
            "SELECT x1, y1, x2, y2, det_score, embedding FROM persons WHERE image_id = ? "
            "ORDER BY id",
            (image_id,),
        ).fetchall()
    boxes = np.array([row[:4] for row in rows]).reshape(-1, 4)
    scores = np.array([row[4] for row in rows])
    embeddings = np.array([np.frombuffer(row[5], dtype="<f4") for row in rows])
    return boxes, scores, embeddings


@pytest.fixture
def new_gallery(tmp_path, engine):
    with open_gallery_for(tmp_path / "gallery", engine.info.fingerprint, engine.info.dim) as g:
        yield g


def test_every_image_is_stored_in_input_order_with_what_the_engine_finds(
    tmp_path, engine, new_gallery
):
    sizes = [LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT, LANDSCAPE]
    paths, arrays = write_images(tmp_path / "images", sizes)
    summary = ingest(
        new_gallery, engine, sources_of(paths, "gate"), batch_size=2, workers=2, progress=False,
        min_score=0.0,
    )  # fmt: skip
    assert (summary.total, summary.added, summary.duplicates, summary.failed) == (5, 5, 0, 0)
    # Batches group the landscape images apart from the portrait ones; the ids still follow
    # the input order (ids count from 1).
    for image_id, (path, pixels) in enumerate(zip(paths, arrays, strict=True), start=1):
        info = new_gallery.get_image(image_id)
        assert (info.uri, info.camera, info.width, info.height) == (
            str(path),
            "gate",
            *sizes[image_id - 1][::-1],
        )
        expected = engine.detect([pixels])[0]  # alone: what the engine finds in this image
        boxes, scores, embeddings = stored_persons(new_gallery.path, image_id)
        assert len(scores) == len(expected.scores) == 6
        np.testing.assert_allclose(boxes, expected.boxes, atol=1e-3)
        np.testing.assert_allclose(scores, expected.scores, atol=1e-5)
        np.testing.assert_allclose(embeddings, expected.embeddings, atol=1e-5)
    assert summary.persons == new_gallery.stats().num_persons == 30


def test_only_persons_scoring_at_least_min_score_are_stored(tmp_path, engine, new_gallery):
    paths, arrays = write_images(tmp_path / "images", [LANDSCAPE] * 3, seed=1)
    found = engine.detect(arrays)
    threshold = float(np.median(np.concatenate([d.scores for d in found])))
    ingest(new_gallery, engine, sources_of(paths), progress=False, min_score=threshold)
    for image_id, detections in enumerate(found, start=1):
        _, scores, _ = stored_persons(new_gallery.path, image_id)
        assert len(scores) == np.count_nonzero(detections.scores >= threshold)
        assert (scores >= threshold).all()


def truncated_png(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(synthetic_images([LANDSCAPE])[0]).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_unreadable_files_are_reported_with_their_reason_and_the_rest_is_added(
    tmp_path, engine, new_gallery
):
    (first, last), _ = write_images(tmp_path / "images", [LANDSCAPE, LANDSCAPE], seed=2)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    files = [first, text, truncated_png(tmp_path), empty, tmp_path / "gone.jpg", last]
    summary = ingest(new_gallery, engine, sources_of(files), progress=False, min_score=0.0)
    assert (summary.added, summary.failed) == (2, 4)
    reasons = {os.path.basename(failure.path): failure.reason for failure in summary.failures}
    assert reasons.keys() == {"notes.jpg", "truncated.png", "empty.jpg", "gone.jpg"}
    # The reasons of the one decoder every route uses (indexer/images.py).
    assert (
        reasons["notes.jpg"] == "the file is not an image (or one in a format Pillow cannot read)"
    )
    assert reasons["truncated.png"].startswith("the file is corrupt or truncated")
    assert reasons["empty.jpg"] == "the file is empty (0 bytes)"
    assert reasons["gone.jpg"] == "No such file or directory"
    assert [new_gallery.get_image(i).uri for i in (1, 2)] == [str(first), str(last)]


def test_images_already_stored_are_duplicates_and_are_not_decoded(tmp_path, engine, new_gallery):
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE] * 3, seed=3)
    copy = tmp_path / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    first = ingest(new_gallery, engine, sources_of([*paths, copy]), progress=False, min_score=0)
    # The copy's bytes equal the first image's: one image stored, the copy a duplicate of it.
    assert (first.added, first.duplicates) == (3, 1)
    counting = CountingEngine(engine)
    again = ingest(new_gallery, counting, sources_of(paths), progress=False, min_score=0.0)
    assert (again.added, again.duplicates, counting.images) == (0, 3, 0)
    assert new_gallery.stats().num_images == 3


def test_an_interrupted_job_resumes_where_it_stopped(tmp_path, engine, new_gallery):
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE] * 6, seed=4)
    sources = sources_of(paths)
    # Batches of 2: the first batch is detected, Ctrl-C arrives during the second; the first
    # batch's images are written before the ingest stops.
    interrupted = CountingEngine(engine, interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        ingest(new_gallery, interrupted, sources, batch_size=2, workers=1, job="nightly",
               progress=False, min_score=0.0)  # fmt: skip
    with JobStore(new_gallery) as jobs:
        job = jobs.find("nightly")
        assert (job.status, job.done, job.total) == ("cancelled", 2, 6)
    assert new_gallery.stats().num_images == 2

    resumed = CountingEngine(engine)
    summary = ingest(new_gallery, resumed, sources, batch_size=2, job="nightly",
                     progress=False, min_score=0.0)  # fmt: skip
    assert (summary.skipped, summary.added, resumed.images) == (2, 4, 4)
    assert [new_gallery.get_image(i).uri for i in range(1, 7)] == [str(p) for p in paths]
    with JobStore(new_gallery) as jobs:
        job = jobs.find("nightly")
        assert (job.status, job.done, job.total) == ("done", 6, 6)


def test_a_finished_job_skips_unchanged_files_unread_and_reads_changed_ones(
    tmp_path, engine, new_gallery
):
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE] * 3, seed=5)
    ingest(new_gallery, engine, sources_of(paths), job="daily", progress=False, min_score=0)
    other_paths, _ = write_images(tmp_path / "other", [LANDSCAPE] * 2, seed=6)
    # paths[0] becomes zeros of the same size, with the same modification time: the job takes
    # it as unchanged and does not read it (read, it would fail as "not an image").
    stat = paths[0].stat()
    paths[0].write_bytes(b"\0" * stat.st_size)
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # paths[1] is replaced by another image (new size and time): read again, added.
    paths[1].write_bytes(other_paths[0].read_bytes())
    counting = CountingEngine(engine)
    summary = ingest(new_gallery, counting, [], job="daily", progress=False, min_score=0.0)
    assert (summary.skipped, summary.added, summary.failed, counting.images) == (2, 1, 0, 1)
    assert new_gallery.stats().num_images == 4


class Crash(BaseException):
    """A kill of the process at an injected point: nothing after it runs (no handler of
    ordinary errors catches it)."""


def test_a_crash_right_after_a_batch_is_stored_leaves_its_job_knowing_it_added_the_batch(
    tmp_path, engine, new_gallery, monkeypatch
):
    """The job's outcomes are written in the transaction that stores the images: a crash right
    after the commit cannot leave images stored that the job does not know it added (a resumed
    job used to count them as duplicates of themselves)."""
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE] * 3, seed=10)
    store = new_gallery.add_images

    def store_then_crash(images, **job):
        store(images, **job)
        raise Crash

    monkeypatch.setattr(new_gallery, "add_images", store_then_crash)
    with pytest.raises(Crash):
        ingest(new_gallery, engine, sources_of(paths), job="j", progress=False, min_score=0.0)
    monkeypatch.undo()
    assert new_gallery.stats().num_images == 3  # the batch was committed before the crash

    resumed = CountingEngine(engine)
    summary = ingest(new_gallery, resumed, [], job="j", progress=False, min_score=0.0)

    assert (summary.skipped, summary.added, summary.duplicates, resumed.images) == (3, 0, 0, 0)
    with JobStore(new_gallery) as jobs:
        job = jobs.find("j")
        counts = jobs.counts(job.id)
    assert (job.status, job.done, counts["added"], counts["duplicate"]) == ("done", 3, 3, 0)


def test_files_that_are_not_regular_or_too_large_fail_alone_unread(tmp_path, engine, new_gallery):
    """A FIFO used to block the ingest forever (opening it waits for a writer); a 1 GiB file was
    read whole before failing to decode."""
    (first, last), _ = write_images(tmp_path / "images", [LANDSCAPE, LANDSCAPE], seed=11)
    huge = sparse_file(tmp_path / "huge.jpg", 1 << 30)
    with fifo(tmp_path / "pipe.jpg") as pipe:
        summary = ingest(
            new_gallery, engine, sources_of([first, pipe, huge, tmp_path, last]),
            progress=False, min_score=0.0, max_bytes=1 << 20,
        )  # fmt: skip
    assert (summary.added, summary.failed) == (2, 3)
    assert {failure.path: failure.reason for failure in summary.failures} == {
        str(pipe): f"{pipe} is a FIFO (named pipe), not a regular file",
        str(huge): f"{huge} is 1073741824 bytes; the limit is 1048576",
        str(tmp_path): f"{tmp_path} is a folder, not a regular file",
    }


def test_within_folders_a_link_swapped_in_while_the_ingest_runs_is_not_followed(
    tmp_path, engine, new_gallery
):
    """The sources are checked to lie in the allowed folder; then, while the first image is
    detected, its folder is replaced by a link to a folder outside holding other images of
    the same names. Those are read after the swap and must be refused, not indexed."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    paths, _ = write_images(allowed / "cam", [LANDSCAPE] * 8, seed=12)
    secrets, _ = write_images(outside, [LANDSCAPE] * 8, seed=13)

    class SwapsOnFirstDetect(CountingEngine):
        def detect(self, images):
            if self.calls == 0:
                (allowed / "cam").rename(allowed / "cam.before")
                (allowed / "cam").symlink_to(outside, target_is_directory=True)
            return super().detect(images)

    # One image per batch and one decoding thread: at most 2 * 1 + 1 = 3 files are read ahead
    # of the first detection; the other 5 are read after the swap.
    summary = ingest(
        new_gallery, SwapsOnFirstDetect(engine), sources_of(paths), batch_size=1, workers=1,
        progress=False, min_score=0.0, within=[str(allowed.resolve())],
    )  # fmt: skip

    secret_hashes = {hashlib.sha256(path.read_bytes()).hexdigest() for path in secrets}
    assert not any(new_gallery.image_by_sha256(sha256) for sha256 in secret_hashes)
    assert summary.added + summary.failed == 8 and summary.failed >= 5
    assert all("is outside the allowed roots" in f.reason for f in summary.failures)


def test_without_min_score_the_model_folders_threshold_is_used_and_a_setting_overrides_it(
    tmp_path, engine, new_gallery
):
    """The tiny random model scores its detections about 0.01: recommending 0 keeps all 6 of
    each image, the fallback of a folder recommending none (0.5) keeps none."""
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE] * 3, seed=14)
    recommends_zero = RecommendingEngine(engine, 0.0)
    assert ingest(new_gallery, recommends_zero, sources_of(paths[:1]), progress=False).persons == 6
    assert ingest(new_gallery, engine, sources_of(paths[1:2]), progress=False).persons == 0
    overridden = ingest(
        new_gallery, RecommendingEngine(engine, 0.9), sources_of(paths[2:]), progress=False,
        min_score=0.0,
    )  # fmt: skip
    assert overridden.persons == 6


class RecommendingEngine:
    """The engine, its model folder recommending ``threshold``."""

    def __init__(self, engine, threshold):
        self.engine = engine
        self.info = dataclasses.replace(engine.info, detection_threshold=threshold)

    def detect(self, images):
        return self.engine.detect(images)


def test_a_job_name_to_resume_must_exist_when_no_images_are_given(engine, new_gallery):
    with pytest.raises(ValueError, match="no job named 'typo' to resume"):
        ingest(new_gallery, engine, [], job="typo", progress=False)


def test_a_gallery_of_another_model_is_refused_naming_both(tmp_path, engine):
    path = tmp_path / "gallery"
    Gallery.create(path, "sha256:other-model", engine.info.dim).close()
    with pytest.raises(GalleryMismatch) as error:
        open_gallery_for(path, engine.info.fingerprint, engine.info.dim)
    assert "sha256:other-model" in str(error.value)
    assert engine.info.fingerprint in str(error.value)
    with Gallery.open(path, None) as gallery, pytest.raises(GalleryMismatch, match="other-model"):
        ingest(gallery, engine, [], progress=False)


# -- pieces of the pipeline --------------------------------------------------------------


def loaded(position, height, width):
    work = WorkItem(position, ImageSource(f"/{position}.png"))
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    return LoadedImage(work, ItemResult(work, "detected"), b"x", pixels)


def test_batches_group_similar_aspect_ratios():
    batcher = SizeBatcher(batch_size=2, max_wait=10)
    # 64 x 96 and 60 x 90 have the same aspect ratio; 96 x 64 is its inverse.
    assert batcher.add(loaded(0, 64, 96)) == []
    assert batcher.add(loaded(1, 96, 64)) == []
    ready = batcher.add(loaded(2, 60, 90))
    assert [[image.work.position for image in batch] for batch in ready] == [[0, 2]]
    assert [[image.work.position for image in b] for b in batcher.drain()] == [[1]]


def test_an_image_waits_for_companions_at_most_max_wait_images():
    batcher = SizeBatcher(batch_size=4, max_wait=2)
    batcher.add(loaded(0, 96, 64))
    assert batcher.add(loaded(1, 64, 96)) == []
    # Image 2 arrives two images after image 0: image 0's group goes as it is.
    ready = batcher.add(loaded(2, 64, 96))
    assert [[image.work.position for image in batch] for batch in ready] == [[0]]


class FailsOnTallImages:
    """An engine that cannot take images taller than 80 pixels."""

    def __init__(self, engine):
        self.engine, self.info = engine, engine.info

    def detect(self, images):
        if any(image.shape[0] > 80 for image in images):
            raise RuntimeError("out of memory\n  (pretend)")
        return self.engine.detect(images)


def test_when_a_batch_fails_only_the_image_at_fault_fails(engine):
    batch = [loaded(0, 64, 96), loaded(1, 96, 64), loaded(2, 64, 96)]
    results = detect_batch(FailsOnTallImages(engine), batch, min_score=0.0)
    assert [result.status for result in results] == ["detected", "failed", "detected"]
    assert results[1].error == "the model failed: out of memory (pretend)"
    assert all(len(results[i].image.scores) == 6 for i in (0, 2))


# -- the command line --------------------------------------------------------------------


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_add_creates_the_gallery_and_stores_the_images(tmp_path, model_dir, engine, capsys):
    write_images(tmp_path / "images" / "day1", [LANDSCAPE] * 2, seed=7)
    gallery_path = tmp_path / "gallery"
    status, out, err = run(capsys, "add", tmp_path / "images", "--recursive", "--gallery",
                           gallery_path, "--model", model_dir, "--camera", "gate",
                           "--backend", "torch", "--min-score", "0", "--no-progress")  # fmt: skip
    assert (status, err) == (0, "")
    assert out.startswith("added 2 images (12 persons), 0 duplicates")
    with Gallery.open(gallery_path, engine.info.fingerprint) as gallery:
        assert [gallery.get_image(i).camera for i in (1, 2)] == ["gate", "gate"]


def test_add_reads_manifests_and_exits_1_listing_unreadable_files(tmp_path, model_dir, capsys):
    paths, _ = write_images(tmp_path, [LANDSCAPE], seed=8)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(
        f'{{"path": "{paths[0].name}", "camera": "hall", "timestamp": "1970-01-01T00:00:09Z"}}\n'
        '{"path": "missing.png"}\n'
    )
    gallery_path = tmp_path / "gallery"
    status, out, err = run(capsys, "add", "--manifest", manifest, "--gallery", gallery_path,
                           "--model", model_dir, "--backend", "torch", "--no-progress")  # fmt: skip
    assert status == 1
    assert out.startswith("added 1 images")
    assert err == (
        f"psearch-index: unreadable: {tmp_path / 'missing.png'}: No such file or directory\n"
    )
    with Gallery.open(gallery_path, None) as gallery:
        image = gallery.get_image(1)
        assert (image.camera, image.timestamp) == ("hall", 9.0)


def test_add_refuses_a_gallery_of_another_model_in_one_line(tmp_path, model_dir, engine, capsys):
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE], seed=9)
    Gallery.create(tmp_path / "gallery", "sha256:other-model", engine.info.dim).close()
    status, out, err = run(capsys, "add", paths[0], "--gallery", tmp_path / "gallery",
                           "--model", model_dir, "--backend", "torch")  # fmt: skip
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("psearch-index: error: the gallery at")
    assert "'sha256:other-model'" in err and f"{engine.info.fingerprint!r}" in err


def test_add_stores_from_the_threshold_the_model_folder_recommends(tmp_path, model_dir, capsys):
    recommending = tmp_path / "model"
    shutil.copytree(model_dir, recommending)
    manifest = json.loads((recommending / "psearch.json").read_text())
    (recommending / "psearch.json").write_text(json.dumps(manifest | {"detection_threshold": 0}))
    paths, _ = write_images(tmp_path / "images", [LANDSCAPE], seed=15)
    gallery = tmp_path / "gallery"
    status, out, _ = run(capsys, "add", paths[0], "--gallery", gallery, "--model", recommending,
                         "--backend", "torch", "--no-progress")  # fmt: skip
    assert status == 0 and out.startswith("added 1 images (6 persons)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "--gallery", "g", "--model", "m"], "give image files or folders"),
        (["add", "nowhere.jpg", "--gallery", "g", "--model", "m"], "no such file or folder"),
        (["add", ".", "--gallery", "g"], "required: --model"),
    ],
)
def test_add_usage_errors_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, *argv)
    assert status == 2 and message in err
