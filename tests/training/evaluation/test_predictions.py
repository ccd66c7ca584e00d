"""The predictions file: round trip, and clear errors for files that cannot be right."""

from pathlib import Path

import numpy as np
import pytest

from training.datasets.base import PersonSearchSplit, Query, SceneAnnotation
from training.evaluation.predictions import (
    Predictions,
    PredictionsError,
    load_predictions,
    save_predictions,
)


def example() -> Predictions:
    return Predictions(
        detections={
            "s1": np.array([[0, 0, 10, 20, 0.9], [5, 5, 15, 25, 0.3]], dtype=np.float32),
            "s2": np.zeros((0, 5), dtype=np.float32),
        },
        embeddings={
            "s1": np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32),
            "s2": np.zeros((0, 3), dtype=np.float32),
        },
        query_embeddings=np.array([[0, 0, 1]], dtype=np.float32),
        query_images=("s1",),
        image_sizes={"s1": (640, 480), "s2": (800, 600)},
    )


def split_of(names: list[str], query_images: list[str]) -> PersonSearchSplit:
    images = [
        SceneAnnotation(name, Path(name), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        for name in names
    ]
    queries = [Query(0, name, np.array([0, 0, 10, 20.0])) for name in query_images]
    return PersonSearchSplit("cuhk_sysu", "test", Path("."), images, queries)


def test_save_then_load_gives_the_same_predictions(tmp_path):
    original = example()
    path = tmp_path / "predictions.npz"
    save_predictions(path, original)
    loaded = load_predictions(path)
    assert list(loaded.detections) == ["s1", "s2"]
    for name in original.detections:
        np.testing.assert_array_equal(loaded.detections[name], original.detections[name])
        np.testing.assert_array_equal(loaded.embeddings[name], original.embeddings[name])
    np.testing.assert_array_equal(loaded.query_embeddings, original.query_embeddings)
    assert loaded.query_images == ("s1",)
    assert loaded.image_sizes == {"s1": (640, 480), "s2": (800, 600)}
    assert (loaded.query_mode, loaded.embedding_dim) == ("gt_box", 3)


def test_a_detector_file_without_embeddings_or_queries_round_trips(tmp_path):
    path = tmp_path / "detector"  # no .npz suffix: written to exactly this path
    save_predictions(path, Predictions({"s1": np.array([[0, 0, 1, 1, 0.5]])}))
    loaded = load_predictions(path)
    assert loaded.embeddings is None and loaded.query_mode == "max_iou"


def test_missing_and_unreadable_files_are_reported(tmp_path):
    with pytest.raises(PredictionsError, match="no such predictions file"):
        load_predictions(tmp_path / "absent.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(PredictionsError, match=r"not a predictions .npz file"):
        load_predictions(garbage)


def test_a_file_with_unknown_or_missing_arrays_is_rejected(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, format_version=np.array(1), image_names=np.array(["s1"]), boxes=np.zeros(3))
    with pytest.raises(PredictionsError, match=r"odd.npz: missing arrays \['offsets', "):
        load_predictions(path)


def test_offsets_must_agree_with_the_detections(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        format_version=np.array(1),
        image_names=np.array(["s1", "s2"]),
        offsets=np.array([0, 2, 3]),
        detections=np.zeros((2, 5)),
    )
    with pytest.raises(PredictionsError, match=r"one row per detection \(3 rows"):
        load_predictions(path)


def test_nan_wrong_dimensions_and_inverted_boxes_are_errors():
    valid = example()
    nan = dict(valid.embeddings, s1=np.array([[1, 0, 0], [0, np.nan, 0]], dtype=np.float32))
    with pytest.raises(PredictionsError, match=r"embeddings of 1 images contain NaN.*'s1'"):
        Predictions(valid.detections, nan)
    wide = dict(valid.embeddings, s2=np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(PredictionsError, match="different dimensions"):
        Predictions(valid.detections, wide)
    with pytest.raises(PredictionsError, match=r"query_embeddings must be \(Q, 3\)"):
        Predictions(valid.detections, valid.embeddings, np.zeros((1, 4)))
    inverted = dict(valid.detections, s1=np.array([[10, 0, 0, 20, 0.9]]))
    with pytest.raises(PredictionsError, match="x2 < x1"):
        Predictions(inverted)
    with pytest.raises(PredictionsError, match="one per detection"):
        Predictions(valid.detections, dict(valid.embeddings, s1=np.zeros((1, 3))))


def test_predictions_are_checked_against_the_split():
    predictions = example()
    predictions.check_split(split_of(["s1", "s2"], ["s1"]), search=True)
    with pytest.raises(PredictionsError, match="no predictions for 1 of the 3 images"):
        predictions.check_split(split_of(["s1", "s2", "s3"], ["s1"]), search=True)
    with pytest.raises(PredictionsError, match=r"not in cuhk_sysu test.*'s2'.*another dataset"):
        predictions.check_split(split_of(["s1"], ["s1"]), search=True)
    with pytest.raises(PredictionsError, match="1 query embeddings for the 2 queries"):
        predictions.check_split(split_of(["s1", "s2"], ["s1", "s2"]), search=True)
    with pytest.raises(PredictionsError, match=r"query 0 is from image 's1'.*'s2'"):
        predictions.check_split(split_of(["s1", "s2"], ["s2"]), search=True)


def test_search_needs_embeddings_and_max_iou_mode_needs_query_images():
    detector = Predictions({"s1": np.zeros((0, 5))})
    detector.check_split(split_of(["s1"], []), search=False)
    with pytest.raises(PredictionsError, match="needs embeddings"):
        detector.check_split(split_of(["s1"], []), search=True)
    max_iou = Predictions({"s1": np.zeros((0, 5))}, {"s1": np.zeros((0, 2))})
    # The query's image "s9" is neither in the split nor in the predictions.
    with pytest.raises(PredictionsError, match=r"max-IoU query mode needs.*'s9'"):
        max_iou.check_split(split_of(["s1"], ["s9"]), search=True)
