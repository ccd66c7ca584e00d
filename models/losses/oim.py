"""Online Instance Matching (OIM) loss, with its focal and triplet-aided variants as options.

OIM (Xiao et al., restated in AlignPS Sec. 3.3) classifies each labeled re-id feature x among L
identities whose centres live in a lookup table (LUT) V, with the features of unlabeled persons,
kept in a circular queue (CQ) U, as extra negatives:

    p_i = exp(s_V v_i^T x) / (sum_j exp(s_V v_j^T x) + sum_k exp(s_U u_k^T x))    (eq. 1)
    L_OIM = -E_x[log p_t]                                                          (eq. 2)

The paper writes one temperature, s_V = s_U = 1 / tau; the scales of the LUT's and the queue's
similarities are separate options because AlignPS's released PRW head uses s_V = 15 and
s_U = 10 (its CUHK-SYSU head 10 and 10, tau = 0.1).

Options of the same loss:
- ``focal_gamma > 0`` multiplies each sample's term by (1 - p_t)^gamma (focal OIM, which AlignPS
  adds "following [4]" in Sec. 4.2); 0 gives plain OIM.
- ``average_over`` is the expectation's denominator: the labeled samples (eq. 2), or every
  sample given, unlabeled ones adding zero (AlignPS's released heads average their per-location
  losses over all positive locations).
- ``triplet_weight > 0`` adds AlignPS' triplet term (eq. 3, see ``triplet.py``), giving the
  triplet-aided OIM  L_TOIM = L_tri + L_OIM  (eq. 4) at weight 1.
- per-sample ``weights`` scale each sample's terms, as LEAPS weights L_toim by its diverse re-id
  sample matching weights W (LEAPS eq. 2).

The memory is updated as every released OIM does, one sample at a time in batch order:
v <- gamma * v + (1 - gamma) * x, renormalised after each step unless ``lut_renormalize`` is
off (AlignPS's CUHK-SYSU head leaves its rows unnormalised). ``queue_dims`` keeps only the first
dimensions of each queued feature, as AlignPS's released queue does (64 of 256).
"""

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import StrictModel
from models.losses.triplet import TRIPLET_MINING_MODES, TripletMining, lut_triplet_loss

AverageOver = Literal["labeled", "all"]
AVERAGE_OVER_MODES: tuple[AverageOver, ...] = ("labeled", "all")


class OIMConfig(StrictModel):
    """The OIM loss's settings, as every model family's re-id loss config spells them (a family
    subclasses it with its paper's defaults and its own fields)."""

    num_labeled: int = Field(
        5532, gt=0, description="Labeled training identities: LUT rows (CUHK-SYSU 5532, PRW 483)."
    )
    queue_size: int = Field(
        5000, ge=0, description="Circular queue of unlabeled features (CUHK-SYSU 5000, PRW 500)."
    )
    momentum: float = Field(0.5, ge=0, le=1, description="Lookup table momentum.")
    lut_scale: float = Field(
        30.0, gt=0, description="Factor of the similarities to the LUT rows (1 / tau)."
    )
    queue_scale: float = Field(
        30.0, gt=0, description="Factor of the similarities to the queue slots (1 / tau)."
    )
    lut_renormalize: bool = Field(True, description="Renormalise a LUT row after each update.")
    queue_dims: int | None = Field(
        None, gt=0, description="Leading dimensions of a queued feature kept; null keeps all."
    )
    average_over: AverageOver = Field(
        "labeled",
        description="OIM's mean over the labeled samples (eq. 2) or over every sample given, "
        "unlabeled ones adding zero.",
    )
    focal_gamma: float = Field(0.0, ge=0, description="Focal OIM exponent; 0 = plain OIM.")
    triplet_weight: float = Field(
        0.0, ge=0, description="Weight of the triplet term (TOIM); 0 = OIM alone."
    )
    triplet_margin: float = Field(0.3, ge=0, description="Margin of the triplet term.")
    triplet_mining: TripletMining = Field(
        "all", description="all: every valid triplet (AlignPS eq. 3); hardest: batch-hard."
    )

    def build(self, embedding_dim: int) -> "OIMLoss":
        """The loss these settings describe, for features of ``embedding_dim``."""
        settings = self.model_dump(
            include=set(OIMConfig.model_fields) - {"num_labeled", "queue_size"}
        )
        return OIMLoss(embedding_dim, self.num_labeled, self.queue_size, **settings)


class OIMLoss(nn.Module):
    """OIM loss with a momentum-updated lookup table and a circular queue of unlabeled features.

    The LUT (``lut``, L x D) and the queue (``queue``, Q x D, with its write position
    ``queue_ptr``) are buffers: they travel in ``state_dict`` and receive no gradient. Both start
    at zero, and zero rows stay in the softmax as constant logits until they are written, as in
    the original OIM. In training mode each call, after computing the loss, moves the LUT rows of
    the batch's identities towards their features, one feature at a time in batch order, and
    pushes the unlabeled features into the queue (oldest overwritten). Under ``torch.distributed``
    these updates use the features of all ranks, gathered in rank order, so that every replica
    keeps the same memory.

    Features are expected L2-normalised, as the models' embeddings are; the loss does not
    normalise them itself.

    Args:
        embedding_dim: D, the length of a re-id feature.
        num_labeled: L, the number of labeled identities (pids run from 0 to L - 1).
        queue_size: Q, the number of unlabeled features remembered (0 disables the queue).
        momentum: gamma in v <- gamma * v + (1 - gamma) * x.
        lut_scale: s_V, the factor of the similarities to the LUT rows (1 / tau; 30 is common).
        queue_scale: s_U, the factor of the similarities to the queue slots.
        lut_renormalize: renormalise a LUT row after each update (the original OIM does).
        queue_dims: keep only the first ``queue_dims`` dimensions of each queued feature (the
            rest of its slot stays zero); None keeps all D.
        average_over: ``"labeled"`` divides the summed matching loss by the number of labeled
            samples, ``"all"`` by the number of samples.
        focal_gamma: exponent of the focal modulation; 0 is plain OIM.
        triplet_weight: weight of the triplet term; 0 leaves it out, 1 is AlignPS' TOIM.
        triplet_margin: the margin M of the triplet term.
        triplet_mining: ``"all"`` valid triplets (AlignPS eq. 3) or the ``"hardest"`` per anchor
            (AlignPS's released code); see ``lut_triplet_loss``.
    """

    lut: Tensor
    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_labeled: int,
        queue_size: int,
        *,
        momentum: float = 0.5,
        lut_scale: float = 30.0,
        queue_scale: float = 30.0,
        lut_renormalize: bool = True,
        queue_dims: int | None = None,
        average_over: AverageOver = "labeled",
        focal_gamma: float = 0.0,
        triplet_weight: float = 0.0,
        triplet_margin: float = 0.3,
        triplet_mining: TripletMining = "all",
    ) -> None:
        super().__init__()
        _require(embedding_dim > 0, f"embedding_dim must be positive, got {embedding_dim}")
        _require(num_labeled > 0, f"num_labeled must be positive, got {num_labeled}")
        _require(queue_size >= 0, f"queue_size must be >= 0, got {queue_size}")
        _require(0 <= momentum <= 1, f"momentum must be in [0, 1], got {momentum}")
        _require(lut_scale > 0, f"lut_scale must be positive, got {lut_scale}")
        _require(queue_scale > 0, f"queue_scale must be positive, got {queue_scale}")
        _require(
            queue_dims is None or 0 < queue_dims <= embedding_dim,
            f"queue_dims must be None or in [1, {embedding_dim}], got {queue_dims}",
        )
        _require(
            average_over in AVERAGE_OVER_MODES,
            f"average_over must be one of {AVERAGE_OVER_MODES}, got {average_over!r}",
        )
        _require(focal_gamma >= 0, f"focal_gamma must be >= 0, got {focal_gamma}")
        _require(triplet_weight >= 0, f"triplet_weight must be >= 0, got {triplet_weight}")
        _require(triplet_margin >= 0, f"triplet_margin must be >= 0, got {triplet_margin}")
        _require(
            triplet_mining in TRIPLET_MINING_MODES,
            f"triplet_mining must be one of {TRIPLET_MINING_MODES}, got {triplet_mining!r}",
        )
        self.embedding_dim = embedding_dim
        self.num_labeled = num_labeled
        self.queue_size = queue_size
        self.momentum = momentum
        self.lut_scale = lut_scale
        self.queue_scale = queue_scale
        self.lut_renormalize = lut_renormalize
        self.queue_dims = embedding_dim if queue_dims is None else queue_dims
        self.average_over = average_over
        self.focal_gamma = focal_gamma
        self.triplet_weight = triplet_weight
        self.triplet_margin = triplet_margin
        self.triplet_mining = triplet_mining
        self.register_buffer("lut", torch.zeros(num_labeled, embedding_dim))
        self.register_buffer("queue", torch.zeros(queue_size, embedding_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(
        self, features: Tensor, pids: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Compute the losses, then (in training mode) update the LUT and the queue.

        Args:
            features: (N, D) re-id features; N may be 0.
            pids: (N,) integer identities in [0, L), or -1 for unlabeled persons, which add no
                loss term but enter the queue.
            weights: optional (N,) per-sample weights multiplying each sample's loss terms.

        Returns:
            ``{"loss_oim": scalar}``, plus ``"loss_triplet"`` (already multiplied by
            ``triplet_weight``) when the triplet term is on. ``loss_oim`` is averaged as
            ``average_over`` says, the triplet term over its triplets or anchors; each is a zero
            connected to ``features`` when there is nothing to average.
        """
        pids = self._checked_pids(features, pids)
        _check_weights(weights, len(pids))
        labeled = pids >= 0
        labeled_weights = None if weights is None else weights[labeled]

        matching = self._matching_loss(features[labeled], pids[labeled], labeled_weights)
        denominator = len(pids) if self.average_over == "all" else int(labeled.sum())
        losses = {"loss_oim": matching / max(denominator, 1)}
        if self.triplet_weight > 0:
            triplet = lut_triplet_loss(
                features[labeled],
                pids[labeled],
                self.lut,
                self.triplet_margin,
                self.triplet_mining,
                labeled_weights,
            )
            losses["loss_triplet"] = self.triplet_weight * triplet
        if self.training:
            self.update_memory(features, pids)
        return losses

    def logits(self, features: Tensor) -> Tensor:
        """(N, L + Q) scaled similarities to the LUT rows, then to the queue slots."""
        dtype = torch.promote_types(features.dtype, self.lut.dtype)
        # Copies: the memory update may follow. Under mixed precision the scaling would magnify
        # half-precision rounding, so the products are taken in full precision.
        lut, queue = self.lut.to(dtype, copy=True), self.queue.to(dtype, copy=True)
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.to(dtype)
            return torch.cat(
                [self.lut_scale * features @ lut.T, self.queue_scale * features @ queue.T], dim=1
            )

    @torch.no_grad()
    def update_memory(self, features: Tensor, pids: Tensor) -> None:
        """Momentum-update the LUT with labeled features and enqueue the unlabeled ones.

        Several features of one identity in a batch (all ranks together) update its row one
        after the other, in batch order, as the released OIM layers do.
        """
        features, pids = _gather_from_all_ranks(features.detach(), pids)
        features = features.to(self.lut.dtype)
        labeled = pids >= 0
        self._update_lut(features[labeled], pids[labeled])
        self._enqueue(features[~labeled])

    def _matching_loss(self, features: Tensor, pids: Tensor, weights: Tensor | None) -> Tensor:
        """The summed per-sample terms -(1 - p_t)^gamma log p_t of the labeled samples."""
        if len(pids) == 0:
            return features.sum() * 0
        log_p = self.logits(features).log_softmax(dim=1)
        log_p_target = log_p.gather(1, pids[:, None]).squeeze(1)  # (N,)
        per_sample = -log_p_target
        if self.focal_gamma > 0:
            per_sample = per_sample * (1 - log_p_target.exp()).pow(self.focal_gamma)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.sum()

    def _update_lut(self, features: Tensor, pids: Tensor) -> None:
        """v <- gamma * v + (1 - gamma) * x for each (x, pid) in order, renormalising each step.

        Vectorised over identities: round r applies the r-th feature of every identity at once,
        which is the same sequence of updates for each row.
        """
        for round_index in _occurrence_rounds(pids):
            rows = pids[round_index]
            moved = self.momentum * self.lut[rows] + (1 - self.momentum) * features[round_index]
            self.lut[rows] = F.normalize(moved, dim=1) if self.lut_renormalize else moved

    def _enqueue(self, features: Tensor) -> None:
        if self.queue_size == 0 or len(features) == 0:
            return
        pushed = len(features)
        # Of more than Q features only the last Q would survive the wrap-around.
        survivors = features[-self.queue_size :].clone()
        survivors[:, self.queue_dims :] = 0
        first = (self.queue_ptr + pushed - len(survivors)) % self.queue_size
        slots = (first + torch.arange(len(survivors), device=features.device)) % self.queue_size
        self.queue[slots] = survivors
        self.queue_ptr.copy_((self.queue_ptr + pushed) % self.queue_size)

    def _checked_pids(self, features: Tensor, pids: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.embedding_dim:
            raise ValueError(
                f"features must have shape (N, {self.embedding_dim}), got {tuple(features.shape)}"
            )
        if pids.shape != (features.shape[0],):
            raise ValueError(
                f"pids must have shape ({features.shape[0]},) to match features, "
                f"got {tuple(pids.shape)}"
            )
        if pids.dtype.is_floating_point or pids.dtype.is_complex or pids.dtype == torch.bool:
            raise TypeError(f"pids must be an integer tensor, got {pids.dtype}")
        if len(pids) > 0 and (pids.min() < -1 or pids.max() >= self.num_labeled):
            raise ValueError(
                f"pids must be -1 (unlabeled) or in [0, {self.num_labeled}), "
                f"got values from {int(pids.min())} to {int(pids.max())}"
            )
        return pids.long()

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_labeled={self.num_labeled}, "
            f"queue_size={self.queue_size}, momentum={self.momentum}, "
            f"lut_scale={self.lut_scale:.4g}, queue_scale={self.queue_scale:.4g}, "
            f"lut_renormalize={self.lut_renormalize}, queue_dims={self.queue_dims}, "
            f"average_over={self.average_over!r}, focal_gamma={self.focal_gamma}, "
            f"triplet_weight={self.triplet_weight}, triplet_margin={self.triplet_margin}, "
            f"triplet_mining={self.triplet_mining!r}"
        )


def _occurrence_rounds(pids: Tensor) -> list[Tensor]:
    """Indices of the samples grouped by occurrence: round r holds, in batch order, the r-th
    sample of every identity that has at least r + 1 samples (no identity twice in a round)."""
    if len(pids) == 0:
        return []
    sorted_pids, order = pids.sort(stable=True)
    first_of_identity = torch.searchsorted(sorted_pids, sorted_pids)
    occurrence = torch.empty_like(order)
    occurrence[order] = torch.arange(len(pids), device=pids.device) - first_of_identity
    return [(occurrence == r).nonzero().flatten() for r in range(int(occurrence.max()) + 1)]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_weights(weights: Tensor | None, num_samples: int) -> None:
    if weights is None:
        return
    if weights.shape != (num_samples,):
        raise ValueError(
            f"weights must have shape ({num_samples},) to match features, "
            f"got {tuple(weights.shape)}"
        )
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")


def _gather_from_all_ranks(features: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's (features, pids) in rank order; identity without distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, pids
    world_size = dist.get_world_size()
    count = torch.tensor([len(pids)], device=pids.device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]

    # all_gather needs equal shapes: pad every rank's batch to the largest, then trim.
    longest = max(sizes)
    padded_features = features.new_zeros(longest, features.shape[1])
    padded_features[: len(pids)] = features
    padded_pids = pids.new_full((longest,), -1)
    padded_pids[: len(pids)] = pids
    gathered_features = [torch.empty_like(padded_features) for _ in range(world_size)]
    gathered_pids = [torch.empty_like(padded_pids) for _ in range(world_size)]
    dist.all_gather(gathered_features, padded_features)
    dist.all_gather(gathered_pids, padded_pids)
    return (
        torch.cat([f[:n] for f, n in zip(gathered_features, sizes, strict=True)]),
        torch.cat([p[:n] for p, n in zip(gathered_pids, sizes, strict=True)]),
    )
