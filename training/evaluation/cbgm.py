"""Context bipartite graph matching (CBGM): an optional re-scoring of search results.

Introduced by SeqNet and reused by COAT, PS-ARM and PSTR ("+" rows of their tables). A person is
easier to recognise together with the people around them: for the gallery images holding the
k1 detections most similar to the query, the query's context (the query itself first, then the
k2 - 1 most confident other persons of the query image) is matched to the image's detections with
the Hungarian (Kuhn-Munkres) algorithm, maximising the summed similarity. The detection matched to
the query then gets a new similarity.

Two details follow the public code that produced the published numbers rather than a plain
reading of the method (``docs/evaluation.md``, "Where psearch differs from the public scripts"):

- the new similarity is the *largest* similarity among the matched pairs (SeqNet's and COAT's
  ``get_max_value_result`` returns a max, its summing variant is commented out), not the total;
- "the top-k1 gallery images" are the images of the k1 most similar detections, so there may be
  fewer than k1 of them.

The context (the query and its persons) is matched with unit-norm embeddings, and the gallery
side with the stored ones: SeqNet's context comes from embeddings computed without its
confidence weighting (its code turns the weighting off for the query image), while its gallery
embeddings carry it. A model whose stored embeddings are weighted (``training/inference.py``
weights them for a model with ``confidence_weighted_similarity``) thus gets SeqNet's CBGM exactly.

The context persons are the query image's detections above the score threshold that the query
box does not suppress: SeqNet inserts the query box into the query image's detections with score 1
and runs NMS at IoU 0.5, which removes every detection overlapping it by more than that.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from common.boxes import iou_matrix

CBGM_PARAMETERS: dict[str, tuple[int, int]] = {"cuhk_sysu": (10, 3), "prw": (30, 4)}
"""(k1, k2) per dataset, as SeqNet, COAT and PS-ARM use them."""

QUERY_BOX_NMS_IOU = 0.5
"""Context persons overlapping the query box by more than this are the query itself."""


def cbgm_parameters(dataset: str, k1: int | None = None, k2: int | None = None) -> tuple[int, int]:
    """(k1, k2) for ``dataset``; explicit values override the dataset's defaults."""
    default = CBGM_PARAMETERS.get(dataset)
    if default is None and (k1 is None or k2 is None):
        known = ", ".join(CBGM_PARAMETERS)
        raise ValueError(f"no CBGM defaults for dataset {dataset!r} (known: {known}); give k1, k2")
    k1 = default[0] if k1 is None else k1
    k2 = default[1] if k2 is None else k2
    if k1 < 1 or k2 < 1:
        raise ValueError(f"CBGM needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    return k1, k2


def query_context(
    query_embedding: np.ndarray,
    query_box: np.ndarray,
    detections: np.ndarray,
    embeddings: np.ndarray,
    det_thresh: float,
    k2: int,
    exclude: int | None = None,
) -> np.ndarray:
    """The persons of the query image to match, ``(k, D)`` with k <= k2, the query first.

    ``detections`` ``(n, 5)`` and ``embeddings`` ``(n, D)`` are the query image's detections.
    The others are the most confident detections scored >= ``det_thresh`` that overlap the query
    box by IoU <= 0.5; ``exclude`` removes one more (the detection that is the query in max-IoU
    mode). Every row is L2-normalised: SeqNet builds the context from unweighted embeddings
    while its stored gallery and query-image embeddings are weighted by their detection scores
    (confidence-weighted similarity); for models with unit embeddings this changes nothing.
    """
    overlaps = iou_matrix(detections[:, :4], query_box)[:, 0]
    keep = (detections[:, 4] >= det_thresh) & (overlaps <= QUERY_BOX_NMS_IOU)
    if exclude is not None:
        keep[exclude] = False
    candidates = np.flatnonzero(keep)
    by_confidence = candidates[np.argsort(-detections[candidates, 4], kind="stable")]
    others = embeddings[by_confidence[: k2 - 1]]
    context = np.concatenate([query_embedding[None, :], others]).astype(embeddings.dtype)
    norms = np.linalg.norm(context, axis=1, keepdims=True)
    return context / np.maximum(norms, np.finfo(context.dtype).tiny)


def images_to_rescore(similarities: np.ndarray, image_ids: np.ndarray, k1: int) -> np.ndarray:
    """The distinct images (ascending ids) holding the ``k1`` detections most similar to the query.

    ``similarities`` and ``image_ids`` are ``(K,)``, one entry per ranked gallery detection.
    """
    if similarities.size > k1:
        top = np.argpartition(-similarities, k1 - 1)[:k1]
    else:
        top = np.arange(similarities.size)
    return np.unique(image_ids[top])


def match_context(
    context: np.ndarray, detection_embeddings: np.ndarray
) -> tuple[int, float] | None:
    """Match the query's context ``(k, D)`` to one image's detections ``(n, D)``.

    Returns the index of the detection matched to the query (row 0 of ``context``) and its new
    similarity, the largest similarity of the matching; None if the query stays unmatched (the
    image has fewer detections than the context has persons and the others took them).
    """
    similarities = context @ detection_embeddings.T  # (k, n)
    rows, columns = linear_sum_assignment(similarities, maximize=True)
    if rows.size == 0 or rows[0] != 0:
        return None
    return int(columns[0]), float(similarities[rows, columns].max())
