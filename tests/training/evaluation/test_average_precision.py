"""Step-wise average precision, scikit-learn's ``average_precision_score`` semantics."""

import numpy as np
import pytest

from training.evaluation.average_precision import average_precision


def test_ap_is_the_mean_precision_at_the_positives():
    # Ranked: + - + - ; precision at the two positives is 1/1 and 2/3.
    ap = average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_ap_matches_the_scikit_learn_documentation_example():
    # sklearn's docstring example: y_true [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] -> 0.83.
    # Positives at 0.8 (precision 1/1) and 0.35 (0.8, 0.4, 0.35 ranked: precision 2/3).
    ap = average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert ap == pytest.approx(5 / 6)


def test_ap_is_not_interpolated():
    # Ranked: - + + ; step-wise AP = (1/2 + 2/3) / 2 = 7/12. VOC-style interpolation would take
    # the best precision at or beyond each recall and give 2/3.
    ap = average_precision(np.array([0, 1, 1]), np.array([0.9, 0.8, 0.7]))
    assert ap == pytest.approx(7 / 12)


def test_tied_scores_share_one_threshold_whatever_their_order():
    # A positive and a negative with equal scores enter the curve together: precision 1/2.
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert average_precision(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    # - at 0.9, then two positives tied at 0.5: one step to recall 1 at precision 2/3.
    ap = average_precision(np.array([0, 1, 1]), np.array([0.9, 0.5, 0.5]))
    assert ap == pytest.approx(2 / 3)


def test_ap_does_not_depend_on_input_order():
    labels = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.3, 0.9, 0.8, 0.1, 0.5, 0.95])
    order = np.array([5, 2, 0, 4, 1, 3])
    assert average_precision(labels[order], scores[order]) == pytest.approx(
        average_precision(labels, scores)
    )


def test_ap_without_positives_is_zero():
    assert average_precision(np.array([0, 0]), np.array([0.4, 0.2])) == 0.0
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0


def test_perfect_ranking_has_ap_one():
    assert average_precision(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == 1.0


def test_mismatched_or_nan_inputs_are_errors():
    with pytest.raises(ValueError, match="same length"):
        average_precision(np.array([1, 0]), np.array([0.5]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([1, 0]), np.array([0.5, np.nan]))
