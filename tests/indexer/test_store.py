"""The gallery store: creating and opening, adding, removing, searching, snapshots, recovery."""

import hashlib
import json
import sqlite3
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from indexer.store import (
    INDEX_FILE,
    SNAPSHOT_MANIFEST_FILE,
    SQLITE_FILE,
    Gallery,
    open_gallery_for,
)
from indexer.types import (
    GalleryBusy,
    GalleryError,
    GalleryExists,
    GalleryMismatch,
    GalleryNotFound,
    ImageNotFound,
    NewImage,
)
from tests.indexer.conftest import EVERY_CREATABLE_INDEX

FINGERPRINT = "model-a"  # the gallery fixture's model
DIM = 8


# -- create / open ---------------------------------------------------------------------------


def test_create_writes_the_three_files_and_records_the_model(gallery, gallery_path):
    assert {path.name for path in gallery_path.iterdir()} >= {
        SQLITE_FILE,
        INDEX_FILE,
        SNAPSHOT_MANIFEST_FILE,
    }
    manifest = json.loads((gallery_path / SNAPSHOT_MANIFEST_FILE).read_text())
    assert manifest["fingerprint"] == FINGERPRINT
    assert (manifest["dim"], manifest["metric"], manifest["index_type"]) == (
        8,
        "inner_product",
        "flat",
    )
    assert manifest["watermark"] == 0
    journal = sqlite3.connect(gallery_path / SQLITE_FILE).execute("PRAGMA journal_mode").fetchone()
    assert journal == ("wal",)


def test_create_refuses_an_existing_gallery(gallery, gallery_path):
    gallery.close()
    with pytest.raises(GalleryExists, match="already exists"):
        Gallery.create(gallery_path, FINGERPRINT, DIM)


def test_create_refuses_ivf_because_an_empty_gallery_has_nothing_to_train_on(tmp_path):
    with pytest.raises(ValueError, match="trained on stored embeddings"):
        Gallery.create(tmp_path / "g", FINGERPRINT, DIM, index_type="ivf_flat")


def test_open_with_the_same_model_works_and_another_model_is_refused_naming_both(
    gallery, gallery_path
):
    gallery.close()
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert (reopened.fingerprint, reopened.dim) == (FINGERPRINT, DIM)
    with pytest.raises(GalleryMismatch) as error:
        Gallery.open(gallery_path, "model-b")
    message = str(error.value)
    assert "model-a" in message and "model-b" in message and "not comparable" in message


def test_open_of_a_folder_without_gallery_says_so(tmp_path):
    with pytest.raises(GalleryNotFound, match="no gallery"):
        Gallery.open(tmp_path, FINGERPRINT)


def test_an_interrupted_creation_is_reported_and_leaves_the_gallery_unlocked(tmp_path):
    sqlite3.connect(tmp_path / SQLITE_FILE).close()  # created, but no tables were committed
    for _ in range(2):  # the second attempt is not refused as busy: the lock was released
        with pytest.raises(GalleryError, match="not a complete gallery"):
            Gallery.open(tmp_path, FINGERPRINT)


def test_a_gallery_is_open_once_at_a_time(gallery, gallery_path):
    with pytest.raises(GalleryBusy, match="open elsewhere"):
        Gallery.open(gallery_path, FINGERPRINT)
    gallery.close()
    Gallery.open(gallery_path, FINGERPRINT).close()  # released by close


def test_open_gallery_for_creates_a_missing_gallery_unless_told_not_to(tmp_path):
    with pytest.raises(GalleryNotFound):
        open_gallery_for(tmp_path / "g", FINGERPRINT, DIM, create=False)
    with open_gallery_for(tmp_path / "g", FINGERPRINT, DIM) as created:
        assert (created.fingerprint, created.dim) == (FINGERPRINT, DIM)
    open_gallery_for(tmp_path / "g", FINGERPRINT, DIM, create=False).close()


def test_open_gallery_for_refuses_another_model_or_dimension_and_releases_the_gallery(
    gallery, gallery_path
):
    gallery.close()
    with pytest.raises(GalleryMismatch, match="model-b"):
        open_gallery_for(gallery_path, "model-b", DIM)
    with pytest.raises(GalleryMismatch, match="8-dimensional embeddings, the model gives 16"):
        open_gallery_for(gallery_path, FINGERPRINT, 16)
    Gallery.open(gallery_path, FINGERPRINT).close()  # not left locked


# -- add / duplicate / remove ----------------------------------------------------------------


def test_add_stores_the_image_and_its_persons(gallery, image, person):
    new = image(person(0.5), person(0.7), camera="gate", timestamp=100.0)
    result = gallery.add_image(
        new.data,
        (new.boxes, new.scores, new.embeddings),
        width=640,
        height=480,
        camera="gate",
        timestamp=100.0,
        uri="s3://bucket/frame.jpg",
    )
    assert result.added and result.num_persons == 2
    stored = gallery.get_image(result.image_id)
    assert (stored.camera, stored.timestamp, stored.uri) == ("gate", 100.0, "s3://bucket/frame.jpg")
    assert (stored.width, stored.height) == (640, 480)
    assert [p.box for p in stored.persons] == [(0, 0, 5, 20), (10, 0, 15, 20)]
    assert [p.det_score for p in stored.persons] == [0.9, 0.9]


def test_adding_the_same_bytes_twice_does_nothing_and_says_so(gallery, image, person):
    first = gallery.add_images([image(person(0.5))])[0]
    again = replace(image(person(0.9)), data=b"image 0")  # other detections, same bytes
    second = gallery.add_images([again])[0]
    assert not second.added
    assert (second.image_id, second.sha256, second.num_persons) == (first.image_id, first.sha256, 1)
    assert gallery.stats().num_images == 1 and gallery.stats().num_persons == 1


def test_a_file_path_is_hashed_by_its_bytes_and_becomes_the_uri(gallery, tmp_path, person):
    path = tmp_path / "frame.jpg"
    path.write_bytes(b"jpeg bytes")
    result = gallery.add_image(path, ([[0, 0, 1, 1]], [0.8], [person(0.1)]), width=4, height=4)
    assert gallery.get_image(result.image_id).uri == str(path)
    duplicate = gallery.add_image(b"jpeg bytes", ([], [], []), width=4, height=4)
    assert not duplicate.added and duplicate.image_id == result.image_id


def test_an_image_is_found_by_its_content_hash(gallery, image, person):
    stored = gallery.add_images([image(person(0.5), person(0.7))])[0]
    found = gallery.image_by_sha256(hashlib.sha256(b"image 0").hexdigest())
    assert found == gallery.get_image(stored.image_id) and len(found.persons) == 2
    assert gallery.image_by_sha256(hashlib.sha256(b"never added").hexdigest()) is None


def test_images_are_found_by_uri_oldest_first(gallery, image, person):
    first, other, second = gallery.add_images(
        [
            replace(image(person(0.5)), uri="/frames/a.jpg"),
            replace(image(person(0.6)), uri="/frames/b.jpg"),
            replace(image(), uri="/frames/a.jpg"),  # the file changed and was indexed again
        ]
    )
    found = gallery.images_by_uri("/frames/a.jpg")
    assert [info.id for info in found] == [first.image_id, second.image_id]
    assert [len(info.persons) for info in found] == [1, 0]
    assert [info.id for info in gallery.images_by_uri("/frames/b.jpg")] == [other.image_id]
    assert gallery.images_by_uri("/frames/c.jpg") == []


def test_a_gallery_made_before_the_uri_index_gets_it_on_open(gallery, gallery_path):
    gallery.close()
    with sqlite3.connect(gallery_path / SQLITE_FILE) as connection:
        connection.execute("DROP INDEX images_uri")
    Gallery.open(gallery_path, FINGERPRINT).close()
    with sqlite3.connect(gallery_path / SQLITE_FILE) as connection:
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM images WHERE uri = 'x'"
        ).fetchall()
    assert "images_uri" in str(plan)


def test_the_connections_of_ended_threads_are_closed(gallery):
    def read() -> None:
        gallery.stats()

    for _ in range(5):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    gallery.stats()  # a new thread's first read closes the connections of the ended ones
    assert len(gallery._connections) <= 2


def test_detections_become_the_persons_scoring_at_least_the_threshold(person):
    detections = SimpleNamespace(
        boxes=np.array([[0, 0, 5, 10], [5, 0, 9, 10], [0, 0, 0, 0]], np.float32),
        scores=np.array([0.9, 0.3, 0.0], np.float32),
        embeddings=np.array([person(0.1), person(0.2), np.zeros(DIM)], np.float32),
    )
    kept = NewImage.from_detections(b"x", detections, width=9, height=10, min_score=0.3)
    np.testing.assert_array_equal(kept.scores, np.float32([0.9, 0.3]))
    assert kept.boxes.shape == (2, 4) and kept.embeddings.shape == (2, DIM)
    # A score of 0 is an unused slot of the model's output, never a person, whatever the floor.
    everything = NewImage.from_detections(b"x", detections, width=9, height=10, min_score=0.0)
    assert len(everything.scores) == 2
    none = NewImage.from_detections(b"x", detections, width=9, height=10, min_score=0.95)
    assert none.boxes.shape == (0, 4) and none.embeddings.shape == (0, DIM)


def test_a_batch_is_one_transaction_and_reports_duplicates_within_it(gallery, image, person):
    first, second = image(person(0.5)), image(person(0.6), person(0.7))
    results = gallery.add_images([first, second, first])
    assert [r.added for r in results] == [True, True, False]
    assert results[2].image_id == results[0].image_id
    assert gallery.stats().num_persons == 3


def test_a_batch_with_one_bad_image_stores_nothing(gallery, image, person):
    good = image(person(0.5))
    bad = replace(image(person(0.5)), width=0)
    with pytest.raises(ValueError, match="width"):
        gallery.add_images([good, bad])
    assert gallery.stats().num_images == 0


def test_an_image_without_persons_is_recorded_so_that_it_is_not_ingested_again(gallery):
    result = gallery.add_image(b"empty scene", ([], [], []), width=10, height=10)
    assert result.added and result.num_persons == 0
    assert not gallery.add_image(b"empty scene", ([], [], []), width=10, height=10).added


@EVERY_CREATABLE_INDEX
def test_remove_deletes_the_image_and_its_persons_from_sqlite_and_index(
    gallery, image, person, query
):
    kept = gallery.add_images([image(person(0.5))])[0]
    removed = gallery.add_images([image(person(0.9), person(0.8))])[0]
    assert gallery.remove_image(removed.image_id) == 2
    assert [hit.image_id for hit in gallery.search(query, 10)] == [kept.image_id]
    stats = gallery.stats()
    assert (stats.num_images, stats.num_persons, stats.indexed) == (1, 1, 1)
    with pytest.raises(ImageNotFound, match=f"no image with id {removed.image_id}"):
        gallery.get_image(removed.image_id)
    with pytest.raises(ImageNotFound):
        gallery.remove_image(removed.image_id)


# -- input validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "scores", "embeddings", "message"),
    [
        (np.zeros((1, 3)), [0.9], np.eye(DIM)[:1], r"boxes must have shape \(n, 4\)"),
        (np.zeros((1, 4)), [0.9, 0.8], np.eye(DIM)[:1], r"scores must have shape \(1,\)"),
        (np.zeros((1, 4)), [0.9], np.eye(DIM + 1)[:1], r"embeddings must have shape \(1, 8\)"),
        ([[0, 0, np.nan, 1]], [0.9], np.eye(DIM)[:1], "boxes contain NaN or infinity"),
        (np.zeros((1, 4)), [np.inf], np.eye(DIM)[:1], "scores contain NaN or infinity"),
        (np.zeros((1, 4)), [0.9], np.full((1, DIM), np.nan), "embeddings contain NaN"),
        ([[5, 0, 1, 1]], [0.9], np.eye(DIM)[:1], "x2 >= x1"),
        # norm 2: not an L2-normalised embedding, refused rather than silently normalised
        (np.zeros((1, 4)), [0.9], 2 * np.eye(DIM)[:1], "row 0 has L2 norm 2"),
        # the zero vector of an unused detection slot
        (np.zeros((1, 4)), [0.0], np.zeros((1, DIM)), "row 0 has L2 norm 0"),
    ],
)
def test_bad_detections_are_refused_with_what_is_wrong(gallery, boxes, scores, embeddings, message):
    with pytest.raises(ValueError, match=message):
        gallery.add_image(b"x", (boxes, scores, embeddings), width=10, height=10)
    assert gallery.stats().num_images == 0


def test_an_embedding_off_unit_norm_by_rounding_is_renormalised(gallery, query):
    nearly_unit = np.eye(DIM, dtype=np.float32)[:1] * 1.0004  # a half-precision engine's norm
    gallery.add_image(b"x", ([[0, 0, 1, 1]], [0.9], nearly_unit), width=10, height=10)
    assert gallery.search(query, 1)[0].similarity == pytest.approx(1.0, abs=1e-6)


def test_a_query_of_the_wrong_shape_or_norm_is_refused(gallery, query):
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        gallery.search(np.ones(DIM + 1) / 3, 5)
    with pytest.raises(ValueError, match="L2 norm 3"):
        gallery.search(3 * query, 5)
    with pytest.raises(ValueError, match="top_k"):
        gallery.search(query, 0)


# -- search ----------------------------------------------------------------------------------


@pytest.fixture
def scenes(gallery, image, person):
    """Four images: (camera, timestamp, similarities of their persons to the query).

    gate/100: 0.9 and 0.2;  gate/200: 0.8;  hall/150: 0.7;  no camera or time: 0.95.
    """
    results = gallery.add_images(
        [
            image(person(0.9), person(0.2, axis=2), camera="gate", timestamp=100.0),
            image(person(0.8), camera="gate", timestamp=200.0),
            image(person(0.7), camera="hall", timestamp=150.0),
            image(person(0.95)),
        ]
    )
    return [result.image_id for result in results]


def ranked(hits):
    return [(hit.image_id, round(hit.similarity, 5)) for hit in hits]


@EVERY_CREATABLE_INDEX
def test_search_ranks_persons_by_cosine_similarity(gallery, scenes, query):
    gate_100, gate_200, _, unknown = scenes
    hits = gallery.search(query, 3)
    assert ranked(hits) == [(unknown, 0.95), (gate_100, 0.9), (gate_200, 0.8)]
    best = hits[1]
    assert (best.camera, best.timestamp, best.box, best.det_score) == (
        "gate",
        100.0,
        (0, 0, 5, 20),
        0.9,
    )


@EVERY_CREATABLE_INDEX
def test_search_filtered_by_camera(gallery, scenes, query):
    gate_100, gate_200, hall, _ = scenes
    assert ranked(gallery.search(query, 10, cameras=["gate"])) == [
        (gate_100, 0.9),
        (gate_200, 0.8),
        (gate_100, 0.2),
    ]
    assert ranked(gallery.search(query, 10, cameras="hall")) == [(hall, 0.7)]
    assert gallery.search(query, 10, cameras=["roof"]) == []


def test_a_camera_name_no_image_can_have_is_refused_rather_than_cut_short(gallery, scenes, query):
    """SQLite compares the JSON text of a filter, where a NUL ends the name: "gate\\x00" used
    to find gate's images. No image can have such a camera (the gallery refuses to store one),
    so such a filter is refused."""
    for name in ("gate\x00", "gate\n", "g" * 257, ""):
        with pytest.raises(ValueError, match="a camera name"):
            gallery.search(query, 10, cameras=[name])


@pytest.mark.parametrize(
    ("camera", "message"),
    [
        ("c" * 257, "a camera name has 1 to 256 characters, got 257"),
        ("", "a camera name has 1 to 256 characters, got 0"),
        ("c1\x00", "cannot contain the character U\\+0000"),
        ("c1\ud800", "cannot contain the character U\\+D800"),
        (3, "a camera name must be text"),
    ],
)
def test_a_camera_name_is_short_printable_text(gallery, image, person, camera, message):
    with pytest.raises(ValueError, match=message):
        gallery.add_images([image(person(0.5), camera=camera)])
    assert gallery.stats().num_images == 0
    stored = gallery.add_images([image(person(0.5), camera="c" * 256)])[0]
    assert gallery.get_image(stored.image_id).camera == "c" * 256


@EVERY_CREATABLE_INDEX
def test_search_filtered_by_time_range_inclusive_and_open_ended(gallery, scenes, query):
    gate_100, gate_200, hall, _ = scenes
    assert ranked(gallery.search(query, 10, time_range=(150.0, 200.0))) == [
        (gate_200, 0.8),
        (hall, 0.7),
    ]
    assert [h.image_id for h in gallery.search(query, 10, time_range=(None, 120.0))] == [
        gate_100,
        gate_100,
    ]


@EVERY_CREATABLE_INDEX
def test_search_excluding_images(gallery, scenes, query):
    gate_100, gate_200, hall, unknown = scenes
    hits = gallery.search(query, 10, exclude_images=[unknown, gate_100])
    assert ranked(hits) == [(gate_200, 0.8), (hall, 0.7)]


@EVERY_CREATABLE_INDEX
def test_search_with_combined_filters_and_a_similarity_floor(gallery, scenes, query):
    gate_100, gate_200, hall, _ = scenes
    hits = gallery.search(
        query, 10, cameras=["gate", "hall"], exclude_images=[gate_200], min_similarity=0.5
    )
    assert ranked(hits) == [(gate_100, 0.9), (hall, 0.7)]


# -- snapshots and recovery ------------------------------------------------------------------


@EVERY_CREATABLE_INDEX
def test_persons_added_after_the_snapshot_are_replayed_on_open(
    gallery, gallery_path, image, person, query
):
    before = gallery.add_images([image(person(0.5))])[0]
    gallery.snapshot()
    after = gallery.add_images([image(person(0.9))])[0]
    gallery.close(snapshot=False)
    assert json.loads((gallery_path / SNAPSHOT_MANIFEST_FILE).read_text())["watermark"] == 1
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert [hit.image_id for hit in reopened.search(query, 2)] == [
            after.image_id,
            before.image_id,
        ]
        assert reopened.stats().indexed == 2


@EVERY_CREATABLE_INDEX
def test_persons_removed_after_the_snapshot_stay_removed_on_open(
    gallery, gallery_path, image, person, query
):
    kept = gallery.add_images([image(person(0.5))])[0]
    removed = gallery.add_images([image(person(0.9))])[0]
    gallery.snapshot()
    gallery.remove_image(removed.image_id)
    gallery.close(snapshot=False)  # the snapshot on disk still holds the removed person
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert [hit.image_id for hit in reopened.search(query, 2)] == [kept.image_id]
        assert reopened.stats().indexed == 1


@EVERY_CREATABLE_INDEX
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_a_corrupt_or_missing_snapshot_is_rebuilt_from_sqlite(
    gallery, gallery_path, image, person, query, damage
):
    added = gallery.add_images([image(person(0.9)), image(person(0.5))])
    gallery.close()
    snapshot = gallery_path / INDEX_FILE
    if damage == "truncate":
        snapshot.write_bytes(snapshot.read_bytes()[:50])
    elif damage == "garbage":
        snapshot.write_bytes(b"not a faiss index")
    else:
        snapshot.unlink()
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert [hit.image_id for hit in reopened.search(query, 2)] == [r.image_id for r in added]
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert reopened.stats().watermark == 2  # the rebuilt index was saved


def test_a_corrupt_manifest_makes_open_rebuild_the_index(
    gallery, gallery_path, image, person, query
):
    added = gallery.add_images([image(person(0.9))])[0]
    gallery.close()
    (gallery_path / SNAPSHOT_MANIFEST_FILE).write_text("{ not json")
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert reopened.search(query, 1)[0].image_id == added.image_id


@EVERY_CREATABLE_INDEX
def test_a_crash_between_writing_index_and_manifest_duplicates_nothing(
    gallery, gallery_path, image, person, query
):
    """The index file of a later snapshot next to the manifest of an earlier one: persons above
    the old watermark are in the file AND replayed from SQLite, unless open drops them first."""
    first = gallery.add_images([image(person(0.5))])[0]
    gallery.snapshot()
    old_manifest = (gallery_path / SNAPSHOT_MANIFEST_FILE).read_text()
    latest = gallery.add_images([image(person(0.9))])[0]
    gallery.snapshot()
    gallery.close()
    (gallery_path / SNAPSHOT_MANIFEST_FILE).write_text(old_manifest)
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert reopened.stats().indexed == 2
        assert [hit.image_id for hit in reopened.search(query, 3)] == [
            latest.image_id,
            first.image_id,
        ]


def test_temporary_files_of_a_snapshot_cut_short_are_removed_on_open(gallery, gallery_path):
    gallery.close()
    leftovers = [gallery_path / f".{name}.0123abcd.tmp" for name in (INDEX_FILE, "manifest.json")]
    for leftover in leftovers:
        leftover.write_bytes(b"half written when the machine went down")
    with Gallery.open(gallery_path, FINGERPRINT):
        assert not any(leftover.exists() for leftover in leftovers)


def test_stats_count_what_the_snapshot_lacks(gallery, image, person):
    gallery.add_images([image(person(0.1), person(0.2))])
    gallery.snapshot()
    gallery.add_images([image(person(0.3))])
    stats = gallery.stats()
    assert (stats.num_images, stats.num_persons, stats.indexed) == (2, 3, 3)
    assert (stats.watermark, stats.pending) == (2, 1)


# -- kept files --------------------------------------------------------------------------------


def kept_image(image, person, number: int = 0) -> NewImage:
    """An uploaded image: its bytes are kept as its file."""
    return replace(image(person(0.5)), data=f"upload {number}".encode(), keep_file=True)


def test_the_file_of_an_uploaded_image_lives_and_dies_with_its_image(gallery, image, person):
    upload = kept_image(image, person)
    [added] = gallery.add_images([upload])
    path = gallery.kept_file(added.sha256)
    assert path is not None and path.read_bytes() == upload.data
    assert gallery.kept_file(gallery.add_images([image(person(0.4))])[0].sha256) is None

    gallery.remove_image(added.image_id)

    assert gallery.kept_file(added.sha256) is None and not path.exists()


def test_a_remove_that_runs_between_an_uploads_file_write_and_its_transaction_loses_nothing(
    gallery, image, person
):
    """The race of a delete with a re-upload of the same bytes, driven step by step: the
    re-upload's file is written (it exists already, as the first upload kept it), then the
    image is removed with its file, then the re-upload's transaction runs. Its image must have
    its file (it used to be stored without one)."""
    [first] = gallery.add_images([kept_image(image, person)])
    files = gallery._files
    save = files.save
    removed = []

    def save_then_let_the_remove_run(sha256, data):
        path = save(sha256, data)
        if not removed:  # the re-upload's write, outside the lock: the remove runs now
            removed.append(gallery.remove_image(first.image_id))
        return path

    files.save = save_then_let_the_remove_run
    [again] = gallery.add_images([kept_image(image, person)])

    assert removed == [1] and again.added and again.image_id != first.image_id
    assert gallery.kept_file(again.sha256) is not None


def test_a_failed_add_keeps_no_file(gallery, image, person):
    bad = replace(kept_image(image, person), width=0)
    upload = kept_image(image, person, number=1)
    with pytest.raises(ValueError):
        gallery.add_images([upload, bad])
    assert gallery.kept_file(hashlib.sha256(upload.data).hexdigest()) is None


def crash_leftovers(gallery_path, gallery, image, person):
    """What a process killed while serving leaves: a kept file whose transaction never
    committed (or whose image's removal did), a temporary of a file write cut short, and the
    lock file still marked open. Returns (kept, orphan, temporary) paths."""
    [stored] = gallery.add_images([kept_image(image, person)])
    gallery.close()
    orphan_bytes = b"an upload whose transaction never committed"
    orphan_hash = hashlib.sha256(orphan_bytes).hexdigest()
    orphan = gallery_path / "files" / orphan_hash[:2] / orphan_hash
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(orphan_bytes)
    kept = gallery_path / "files" / stored.sha256[:2] / stored.sha256
    temporary = kept.with_name(f".{'b' * 64}.0123abcd.tmp")
    temporary.write_bytes(b"half")
    (gallery_path / "gallery.lock").write_text("open\n")
    return kept, orphan, temporary


def test_after_a_crash_opening_removes_the_files_no_image_references_and_half_written_ones(
    gallery, gallery_path, image, person
):
    kept, orphan, temporary = crash_leftovers(gallery_path, gallery, image, person)

    with Gallery.open(gallery_path, FINGERPRINT):
        assert kept.exists()
        assert not orphan.exists() and not temporary.exists()
    assert (gallery_path / "gallery.lock").read_text() == ""  # closed cleanly this time


def test_a_closed_gallery_is_not_swept_again(gallery, gallery_path, monkeypatch):
    """The sweep lists every kept file: it runs only after a crash, which the lock file tells."""
    gallery.close()
    assert (gallery_path / "gallery.lock").read_text() == ""
    swept = []
    monkeypatch.setattr(Gallery, "_sweep_files", lambda self: swept.append(self))
    Gallery.open(gallery_path, FINGERPRINT).close()
    assert swept == []
