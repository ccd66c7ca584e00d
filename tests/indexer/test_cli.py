"""``psearch-index``: stats, search, remove, rebuild; errors are one line and exit status 2."""

import json

import numpy as np
import pytest

from indexer.cli import main
from indexer.store import Gallery


@pytest.fixture
def stored(gallery, gallery_path, image, person, query, tmp_path):
    """A closed gallery of two images (similarities 0.9 on camera gate, 0.6 on hall) and the
    query saved as .npy; returns (gallery path, query path, image ids)."""
    results = gallery.add_images(
        [image(person(0.9), camera="gate", timestamp=10.0), image(person(0.6), camera="hall")]
    )
    gallery.close()
    query_path = tmp_path / "query.npy"
    np.save(query_path, query)
    return str(gallery_path), str(query_path), [result.image_id for result in results]


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_stats_prints_counts(stored, capsys):
    gallery_path, _, _ = stored
    status, out, _ = run(capsys, "stats", gallery_path, "--json")
    stats = json.loads(out)
    assert status == 0
    assert (stats["num_images"], stats["num_persons"], stats["indexed"]) == (2, 2, 2)
    status, out, _ = run(capsys, "stats", gallery_path)
    assert status == 0 and "num_persons: 2" in out


def test_search_ranks_the_gallery_against_a_saved_embedding(stored, capsys):
    gallery_path, query_path, (gate, hall) = stored
    status, out, _ = run(capsys, "search", gallery_path, query_path, "--json")
    assert status == 0
    hits = json.loads(out)
    assert [(h["image_id"], round(h["similarity"], 5)) for h in hits] == [(gate, 0.9), (hall, 0.6)]
    status, out, _ = run(capsys, "search", gallery_path, query_path, "--camera", "hall")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2  # header + one hit
    assert lines[1].split()[:3] == ["1", "0.6000", str(hall)]


def test_search_filters_by_time_exclusion_and_similarity(stored, capsys):
    gallery_path, query_path, (gate, _) = stored
    _, out, _ = run(capsys, "search", gallery_path, query_path, "--since", "5", "--json")
    assert [hit["image_id"] for hit in json.loads(out)] == [gate]  # hall has no timestamp
    _, out, _ = run(
        capsys, "search", gallery_path, query_path, "--exclude-image", str(gate), "--json"
    )
    assert gate not in [hit["image_id"] for hit in json.loads(out)]
    _, out, _ = run(
        capsys, "search", gallery_path, query_path, "--min-similarity", "0.95", "--json"
    )
    assert json.loads(out) == []


def test_remove_removes_images(stored, capsys):
    gallery_path, _, (gate, _) = stored
    status, out, _ = run(capsys, "remove", gallery_path, str(gate))
    assert status == 0 and out == f"removed image {gate} (1 persons)\n"
    with Gallery.open(gallery_path, None) as gallery:
        assert gallery.stats().num_images == 1


def test_remove_of_a_missing_image_removes_nothing(stored, capsys):
    gallery_path, _, (gate, _) = stored
    status, _, err = run(capsys, "remove", gallery_path, str(gate), "999")
    assert status == 2 and err == "psearch-index: error: no image with id 999\n"
    with Gallery.open(gallery_path, None) as gallery:
        assert gallery.stats().num_images == 2


def test_rebuild_changes_the_index_type(stored, capsys):
    gallery_path, _, _ = stored
    status, out, _ = run(capsys, "rebuild", gallery_path, "flat")
    assert status == 0 and out.startswith("rebuilt 2 vectors as flat")
    status, _, err = run(capsys, "rebuild", gallery_path, "ivf_flat", "--nlist", "4")
    assert status == 2 and "needs at least 156 embeddings" in err  # 39 x 4 lists
    status, out, _ = run(
        capsys, "rebuild", gallery_path, "hnsw", "--links", "8", "--ef-search", "32"
    )
    assert status == 0 and out.startswith("rebuilt 2 vectors as hnsw")
    assert "'links': 8" in out and "'ef_construction': 80" in out and "'ef_search': 32" in out
    status, _, err = run(capsys, "rebuild", gallery_path, "hnsw", "--gpu")
    assert status == 2 and "FAISS has no GPU HNSW index" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["stats"], "the following arguments are required: gallery"),
        (["stats", "/nonexistent/gallery"], "no gallery at /nonexistent/gallery"),
        (["rebuild", "GALLERY", "annoy"], "invalid choice: 'annoy'"),
        (["search", "GALLERY", "QUERY", "--top-k", "many"], "invalid int value: 'many'"),
        (["search", "GALLERY", "QUERY", "--fingerprint", "model-b"], "not comparable"),
        (["search", "GALLERY", "/nonexistent/query.npy"], "No such file"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(stored, capsys, argv, message):
    gallery_path, query_path, _ = stored
    argv = [{"GALLERY": gallery_path, "QUERY": query_path}.get(arg, arg) for arg in argv]
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith("psearch-index: error: ") and err.count("\n") == 1
    assert message in err


def test_a_query_of_another_dimension_is_an_error(stored, capsys, tmp_path):
    gallery_path, _, _ = stored
    np.save(tmp_path / "wrong.npy", np.ones(3) / np.sqrt(3))
    status, _, err = run(capsys, "search", gallery_path, str(tmp_path / "wrong.npy"))
    assert status == 2 and "shape (8,)" in err
