"""Average precision with the semantics of scikit-learn's ``average_precision_score``.

Every person search number in the literature is computed with that function (detection AP and
the per-query AP of the search protocol), so we reproduce its definition exactly instead of
depending on scikit-learn: the step-wise (not interpolated) area under the precision-recall curve,

    AP = sum over thresholds t, in decreasing order, of (R(t) - R(t_previous)) * P(t),

where the thresholds are the distinct scores, P(t) and R(t) count every item scored >= t (items
with equal scores enter together), and R starts at 0. Recall only grows at the scores of positive
items, so the sum is the mean, over positive items, of the precision at that item's score:

    AP = mean over positives p of  #(positives scored >= s_p) / #(items scored >= s_p).
"""

from __future__ import annotations

import numpy as np


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Step-wise average precision of binary labels ``(n,)`` ranked by scores ``(n,)``.

    Returns 0.0 when there is no positive item (scikit-learn's value too), including n == 0.
    """
    labels = np.asarray(y_true, dtype=bool)
    scores = np.asarray(y_score)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(
            f"y_true and y_score must be 1-D of the same length, got {labels.shape} and "
            f"{scores.shape}"
        )
    if np.isnan(scores).any():
        raise ValueError("y_score contains NaN; scores must be comparable")
    positive_scores = scores[labels]
    if positive_scores.size == 0:
        return 0.0
    ranked_at_or_above = _count_at_or_above(scores, positive_scores)
    positives_at_or_above = _count_at_or_above(positive_scores, positive_scores)
    return float(np.mean(positives_at_or_above / ranked_at_or_above))


def _count_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many ``values`` are >= it."""
    return values.size - np.searchsorted(np.sort(values), thresholds, side="left")
