"""benchmarks/index.py: recall against exact search, and one tiny run of every index type's
sweep (it proves the plumbing, not the speed)."""

import numpy as np
import pytest

from benchmarks import index


def test_recall_at_10_is_the_share_of_the_exact_top_10_found():
    exact = np.arange(20).reshape(2, 10)
    found = np.array([list(range(10)), [10, 11, 12, 13, 14, 99, 98, 97, 96, 95]])
    assert index.recall_at_10(found, exact) == pytest.approx((10 + 5) / 20)


def test_the_generated_gallery_clusters_views_of_each_identity():
    gallery, queries = index.reid_like_gallery(2000, 64, 20, seed=0)
    assert gallery.shape == (2000, 64) and queries.shape == (20, 64)
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-5)
    best = (queries @ gallery.T).max(axis=1)
    assert np.median(best) > 0.5  # a query has views of its identity in the gallery


def test_a_tiny_run_sweeps_each_type_and_says_whether_it_meets_the_targets(capsys):
    index.main(["--num", "3000", "--dim", "64", "--queries", "64", "--types", "ivf_flat", "hnsw"])

    output = capsys.readouterr().out
    rows = [line.split() for line in output.splitlines()]
    assert ["flat", "-"] in [row[:2] for row in rows]
    assert any(row[:2] == ["ivf_flat", "nprobe=1"] for row in rows)
    assert any(row[:2] == ["hnsw", "ef_search=16"] for row in rows)
    types = ("flat", "ivf_flat", "hnsw")
    memory_rows = [row[0] for row in rows if len(row) == 3 and row[0] in types]
    assert memory_rows == list(types)  # the bytes per person and build time table
    chosen = output.split("chosen (")[1]
    assert "ivf_flat:" in chosen and "hnsw:" in chosen


def test_a_dimension_below_the_identities_space_is_refused():
    with pytest.raises(SystemExit):
        index.main(["--dim", "32"])
