"""The triplet term of the triplet-aided OIM loss (AlignPS, Sec. 3.3, eq. 3).

The candidate set of one identity m is X_m = {x_m,1, ..., x_m,S, v_m}: the features sampled from
that person in the batch together with the person's centre v_m in the OIM lookup table. Positive
pairs are drawn within a set, negative pairs across sets, and eq. 3 sums the hinge
[M + D_pos - D_neg]_+ over them, with D the Euclidean distance and M the margin.

AlignPS's released code mines instead: it appends the LUT row of every labeled feature (one row
per feature, so an identity's centre appears as often as its features) and averages, over all
these anchors, the hinge of the farthest positive and the closest negative (batch-hard mining,
Hermans et al.). ``mining="hardest"`` is that loss; ``"all"`` is eq. 3.
"""

from typing import Literal

import torch
from torch import Tensor

TripletMining = Literal["all", "hardest"]
TRIPLET_MINING_MODES: tuple[TripletMining, ...] = ("all", "hardest")


def lut_triplet_loss(
    features: Tensor,
    pids: Tensor,
    lut: Tensor,
    margin: float,
    mining: TripletMining = "all",
    weights: Tensor | None = None,
) -> Tensor:
    """Triplet loss over labeled batch features and the LUT centres of their identities.

    Args:
        features: (N, D) labeled features of the batch (unlabeled ones must be left out).
        pids: (N,) identity of each feature, indices into ``lut``.
        lut: (L, D) lookup table of identity centres; used as constants (no gradient).
        margin: the distance margin M of eq. 3.
        mining: ``"all"``: the candidates are the features and one centre per identity, and the
            hinge is averaged over every valid (anchor, positive, negative) triplet, which is
            the sum of eq. 3 divided by the number of triplets so that its scale does not depend
            on the batch size (memory grows as (N + I)^3 for I identities). ``"hardest"``: the
            candidates are the features and the centre of each feature (N centres, as the
            released code), and each anchor keeps only its farthest positive and its closest
            negative (batch-hard mining); the hinge is averaged over the anchors.
        weights: optional (N,) per-feature weights (LEAPS' DRSM weights). A triplet is weighted
            by its anchor's weight; a centre weighs as its feature ("hardest") or as the mean
            weight of its identity's features ("all"), so that scaling all weights scales the
            loss.

    Returns:
        A scalar. It is zero, still connected to ``features``, when no valid triplet exists
        (fewer than two identities in the batch).
    """
    if mining not in TRIPLET_MINING_MODES:
        raise ValueError(f"mining must be one of {TRIPLET_MINING_MODES}, got {mining!r}")
    if weights is None:
        weights = features.new_ones(features.shape[0])

    # Distances of nearby unit vectors lose most of their digits in half precision.
    dtype = torch.promote_types(features.dtype, lut.dtype)
    weights = weights.to(dtype)
    if mining == "all":
        centre_pids, identity_index = pids.unique(return_inverse=True)
        centre_weights = _mean_per_identity(weights, identity_index, len(centre_pids))
    else:
        centre_pids, centre_weights = pids, weights
    candidates = torch.cat([features.to(dtype), lut[centre_pids].to(dtype)])  # (N + C, D)
    labels = torch.cat([pids, centre_pids])  # (N + C,)
    anchor_weights = torch.cat([weights, centre_weights])  # (N + C,)

    with torch.autocast(device_type=features.device.type, enabled=False):
        distances = _pairwise_euclidean(candidates)  # (N + C, N + C)
    same = labels[:, None] == labels[None, :]
    is_positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    is_negative = ~same

    if mining == "all":
        return _all_triplets_loss(distances, is_positive, is_negative, anchor_weights, margin)
    return _hardest_triplets_loss(distances, is_positive, is_negative, anchor_weights, margin)


def _mean_per_identity(values: Tensor, identity_index: Tensor, num_identities: int) -> Tensor:
    sums = values.new_zeros(num_identities).index_add_(0, identity_index, values)
    return sums / torch.bincount(identity_index, minlength=num_identities)


def _pairwise_euclidean(x: Tensor) -> Tensor:
    squared = x.pow(2).sum(dim=1)
    gram = x @ x.T
    # Rounding can make the squared distance of identical rows slightly negative; clamping also
    # keeps sqrt's gradient finite at zero (the clamp passes no gradient there).
    return (squared[:, None] + squared[None, :] - 2 * gram).clamp_min(1e-12).sqrt()


def _all_triplets_loss(
    distances: Tensor,
    is_positive: Tensor,
    is_negative: Tensor,
    anchor_weights: Tensor,
    margin: float,
) -> Tensor:
    # hinge[a, p, n] = M + D(a, p) - D(a, n), valid where p is a positive and n a negative of a.
    hinge = (margin + distances[:, :, None] - distances[:, None, :]).clamp_min(0)
    valid = is_positive[:, :, None] & is_negative[:, None, :]
    if not valid.any():
        return distances.sum() * 0
    weighted = hinge * anchor_weights[:, None, None]
    return weighted[valid].mean()


def _hardest_triplets_loss(
    distances: Tensor,
    is_positive: Tensor,
    is_negative: Tensor,
    anchor_weights: Tensor,
    margin: float,
) -> Tensor:
    usable = is_positive.any(dim=1) & is_negative.any(dim=1)
    if not usable.any():
        return distances.sum() * 0
    distances = distances[usable]
    farthest_positive = distances.masked_fill(~is_positive[usable], float("-inf")).amax(dim=1)
    closest_negative = distances.masked_fill(~is_negative[usable], float("inf")).amin(dim=1)
    hinge = (margin + farthest_positive - closest_negative).clamp_min(0)
    return (hinge * anchor_weights[usable]).mean()
