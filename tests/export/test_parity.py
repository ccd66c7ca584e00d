"""Parity: ONNX Runtime reproduces PyTorch eager for every model family, and the comparison
itself accepts exactly what it should."""

from __future__ import annotations

import numpy as np
import pytest

from export.artifact import read_model_manifest
from export.parity import (
    ParityReport,
    Tolerances,
    check_parity,
    compare_batch,
    eager_detect,
    eager_embed,
    onnxruntime_detect,
    onnxruntime_embed,
    parity_inputs,
)
from models.preprocess import PreprocessConfig

FAMILIES = ["alignps", "fcos", "leaps", "seqnet", "psarm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_matches_pytorch_eager_for_every_family(exported, family):
    """Two batches: two images of different sizes padded together, then one image."""
    result = exported(family)
    manifest = read_model_manifest(result.model_dir)
    batches, queries = parity_inputs(PreprocessConfig(min_size=160, max_size=224), seed=5)
    assert [tuple(b.images.shape) for b in batches] == [(2, 3, 224, 224), (1, 3, 160, 224)]
    assert batches[0].image_sizes.tolist() == [[160, 224], [224, 160]]
    embeds = manifest.onnx.embed is not None
    report = check_parity(
        eager_detect(result.model),
        onnxruntime_detect(str(result.model_dir / manifest.onnx.detect)),
        batches,
        queries=queries,
        reference_embed=eager_embed(result.model) if embeds else None,
        candidate_embed=(
            onnxruntime_embed(str(result.model_dir / manifest.onnx.embed)) if embeds else None
        ),
    )
    assert report.passed, report.summary()
    assert report.images == 3 and report.batches == 2
    # Every image has detections to compare (the perturbed models score above thresholds).
    assert report.compared >= 3 * 10
    if embeds:  # RoI models: the two query boxes are embedded alike too
        assert report.query_embeddings == 2


def test_psearch_export_prints_a_passing_parity_check(exported):
    result = exported("alignps")
    assert result.exit_code == 0
    assert "parity PASSED" in result.printed
    assert read_model_manifest(result.model_dir).parity.passed


def one_image(boxes, scores, embeddings=None):
    """A batch of one image as the backends return it: (1, K, 4), (1, K), (1, K, D)."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if embeddings is None:
        embeddings = np.zeros((len(scores), 0), np.float32)
    return boxes[None], scores[None], np.asarray(embeddings, np.float32)[None]


BOXES = [[0, 0, 10, 20], [30, 30, 50, 60], [5, 40, 15, 80], [0, 0, 0, 0]]


def compare(reference, candidate) -> ParityReport:
    report = ParityReport(Tolerances())
    compare_batch(report, "batch", reference, candidate, size=100)
    return report


def test_equal_outputs_pass():
    outputs = one_image(BOXES, [0.9, 0.5, 0.3, 0.0])
    report = compare(outputs, outputs)
    assert report.passed and report.compared == 3  # the unused slot is not compared


def test_near_tied_detections_may_swap_slots():
    """Scores 0.50000 and 0.50005 differ by less than twice the score tolerance (2e-4): either
    backend may sort them either way, so they are matched by box, not by slot."""
    reference = one_image(BOXES, [0.9, 0.50005, 0.5, 0.0])
    candidate = one_image([BOXES[0], BOXES[2], BOXES[1], BOXES[3]], [0.9, 0.50004, 0.50001, 0.0])
    report = compare(reference, candidate)
    assert report.passed, report.summary()
    assert report.near_tied == 2
    assert report.max_score_error == pytest.approx(4e-5, abs=1e-6)


def test_swapped_detections_with_distinct_scores_fail():
    reference = one_image(BOXES, [0.9, 0.6, 0.5, 0.0])
    candidate = one_image([BOXES[0], BOXES[2], BOXES[1], BOXES[3]], [0.9, 0.6, 0.5, 0.0])
    report = compare(reference, candidate)
    assert not report.passed
    assert report.max_box_error == pytest.approx(35 / 100)  # x2 of 50 vs 15, image size 100


def test_a_box_off_by_more_than_a_thousandth_of_the_image_fails():
    reference = one_image(BOXES, [0.9, 0.6, 0.5, 0.0])
    shifted = np.asarray(BOXES, np.float32)
    shifted[1, 0] += 0.11  # 0.11 px of a 100 px image: 1.1e-3
    report = compare(reference, one_image(shifted, [0.9, 0.6, 0.5, 0.0]))
    assert not report.passed and "boxes differ" in report.failures[0]


def test_a_different_number_of_detections_fails():
    report = compare(one_image(BOXES, [0.9, 0.6, 0.5, 0.0]), one_image(BOXES, [0.9, 0.6, 0.0, 0.0]))
    assert (
        not report.passed
        and "3 valid detections in PyTorch, 2 in the export" in (report.failures[0])
    )


def test_unsorted_scores_fail():
    report = compare(one_image(BOXES, [0.9, 0.6, 0.5, 0.0]), one_image(BOXES, [0.6, 0.9, 0.5, 0.0]))
    assert not report.passed and "not sorted" in report.failures[0]


def test_embeddings_below_the_cosine_tolerance_fail():
    """Unit vectors at an angle theta have cosine cos(theta); 0.02 rad gives 0.9998."""
    angle = 0.02
    reference = np.asarray([[1.0, 0.0]] * 4)
    candidate = reference.copy()
    candidate[2] = [np.cos(angle), np.sin(angle)]
    report = compare(
        one_image(BOXES, [0.9, 0.6, 0.5, 0.0], reference),
        one_image(BOXES, [0.9, 0.6, 0.5, 0.0], candidate),
    )
    assert not report.passed
    assert report.min_cosine == pytest.approx(np.cos(angle))
