"""Context bipartite graph matching, piece by piece (the whole re-scoring is in test_search)."""

import numpy as np
import pytest

from training.evaluation.cbgm import (
    cbgm_parameters,
    images_to_rescore,
    match_context,
    query_context,
)


def test_the_matched_query_gets_the_largest_similarity_of_the_matching():
    # Context: query [1, 0], companion [0, 1]. Image detections: t [0.6, 0.8], c [0, 1].
    # Similarities: query-t 0.6, query-c 0, companion-t 0.8, companion-c 1.
    # Best matching: query-t + companion-c = 1.6 (the other one, 0 + 0.8, is worse).
    # SeqNet/COAT give the query's match the largest matched similarity, 1.0 (not the 1.6 sum).
    context = np.array([[1.0, 0.0], [0.0, 1.0]])
    detections = np.array([[0.6, 0.8], [0.0, 1.0]])
    assert match_context(context, detections) == (0, pytest.approx(1.0))


def test_the_query_can_stay_unmatched_when_the_image_has_fewer_people():
    # One detection [0, 1]: the companion (similarity 1) takes it, not the query (0).
    context = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert match_context(context, np.array([[0.0, 1.0]])) is None


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_context_is_the_query_then_confident_people_not_overlapping_the_query_box():
    query_box = np.array([0.0, 0.0, 50.0, 100.0])
    detections = np.array(
        [
            [0, 0, 50, 90, 0.99],  # the query person itself (IoU 0.9): suppressed
            [100, 0, 150, 100, 0.7],  # a companion
            [200, 0, 250, 100, 0.8],  # a more confident companion: comes first
            [300, 0, 350, 100, 0.3],  # below det_thresh
        ]
    )
    embeddings = np.arange(8, dtype=np.float32).reshape(4, 2)
    query = np.array([9.0, 9.0], dtype=np.float32)
    context = query_context(query, query_box, detections, embeddings, det_thresh=0.5, k2=3)
    np.testing.assert_allclose(context, unit([[9, 9], [4, 5], [2, 3]]))
    # k2 = 2 keeps the query and the most confident companion.
    context = query_context(query, query_box, detections, embeddings, det_thresh=0.5, k2=2)
    np.testing.assert_allclose(context, unit([[9, 9], [4, 5]]))
    # In max-IoU mode the detection used as the query is excluded explicitly.
    context = query_context(
        query, query_box, detections, embeddings, det_thresh=0.5, k2=3, exclude=2
    )
    np.testing.assert_allclose(context, unit([[9, 9], [2, 3]]))


def test_the_context_is_unweighted_as_seqnet_builds_it():
    """A confidence-weighted model stores score x unit embedding; SeqNet matches the query's
    context with the unweighted (unit) embeddings, so the weights must not change it."""
    query_box = np.array([0.0, 0.0, 50.0, 100.0])
    detections = np.array([[100, 0, 150, 100, 0.6], [200, 0, 250, 100, 0.8]])
    unit_embeddings = unit([[0.6, 0.8], [1.0, 0.0]])
    weighted = unit_embeddings * detections[:, 4:5].astype(np.float32)
    query = np.array([0.0, 1.0], dtype=np.float32)
    from_weighted = query_context(query, query_box, detections, weighted, 0.5, k2=3)
    from_unit = query_context(query, query_box, detections, unit_embeddings, 0.5, k2=3)
    np.testing.assert_allclose(from_weighted, from_unit, rtol=1e-6)
    np.testing.assert_allclose(from_unit, [[0, 1], [1, 0], [0.6, 0.8]], rtol=1e-6)


def test_rescored_images_are_those_of_the_k1_most_similar_detections():
    # Detections of images 4, 4, 7, 9 with similarities 0.9, 0.8, 0.1, 0.85: the top 3 lie in
    # images 4 and 9 only.
    similarities = np.array([0.9, 0.8, 0.1, 0.85])
    image_ids = np.array([4, 4, 7, 9])
    np.testing.assert_array_equal(images_to_rescore(similarities, image_ids, k1=3), [4, 9])
    np.testing.assert_array_equal(images_to_rescore(similarities, image_ids, k1=10), [4, 7, 9])


def test_parameters_per_dataset_and_overrides():
    assert cbgm_parameters("cuhk_sysu") == (10, 3)
    assert cbgm_parameters("prw") == (30, 4)
    assert cbgm_parameters("prw", k1=5) == (5, 4)
    with pytest.raises(ValueError, match="no CBGM defaults"):
        cbgm_parameters("crowdhuman")
    with pytest.raises(ValueError, match="k1 >= 1"):
        cbgm_parameters("prw", k1=0)
