"""Online Instance Matching (OIM) loss, with its focal and triplet-aided variants as options.

OIM (Xiao et al., restated in AlignPS Sec. 3.3) classifies each labeled re-id feature x among L
identities whose centres live in a lookup table (LUT) V, with the features of unlabeled persons,
kept in a circular queue (CQ) U, as extra negatives:

    p_i = exp(v_i^T x / tau) / (sum_j exp(v_j^T x / tau) + sum_k exp(u_k^T x / tau))   (eq. 1)
    L_OIM = -E_x[log p_t]                                                            (eq. 2)

Options of the same loss:
- ``focal_gamma > 0`` multiplies each sample's term by (1 - p_t)^gamma (focal OIM, which AlignPS
  adds "following [4]" in Sec. 4.2); 0 gives plain OIM.
- ``triplet_weight > 0`` adds AlignPS' triplet term (eq. 3, see ``triplet.py``), giving the
  triplet-aided OIM  L_TOIM = L_tri + L_OIM  (eq. 4) at weight 1.
- per-sample ``weights`` scale each sample's terms, as LEAPS weights L_toim by its diverse re-id
  sample matching weights W (LEAPS eq. 2).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from models.losses.triplet import TRIPLET_MINING_MODES, TripletMining, lut_triplet_loss


class OIMLoss(nn.Module):
    """OIM loss with a momentum-updated lookup table and a circular queue of unlabeled features.

    The LUT (``lut``, L x D) and the queue (``queue``, Q x D, with its write position
    ``queue_ptr``) are buffers: they travel in ``state_dict`` and receive no gradient. Both start
    at zero, and zero rows stay in the softmax as constant logits until they are written, as in
    the original OIM. In training mode each call, after computing the loss, moves the LUT rows of
    the batch's identities towards their features and pushes the unlabeled features into the
    queue (oldest overwritten). Under ``torch.distributed`` these updates use the features of all
    ranks, gathered in rank order, so that every replica keeps the same memory.

    Features are expected L2-normalised, as the models' embeddings are; the loss does not
    normalise them itself.

    Args:
        embedding_dim: D, the length of a re-id feature.
        num_labeled: L, the number of labeled identities (pids run from 0 to L - 1).
        queue_size: Q, the number of unlabeled features remembered (0 disables the queue).
        momentum: gamma in v <- gamma * v + (1 - gamma) * x, followed by renormalisation.
        temperature: tau; logits are similarities divided by tau (1/30 is common).
        focal_gamma: exponent of the focal modulation; 0 is plain OIM.
        triplet_weight: weight of the triplet term; 0 leaves it out, 1 is AlignPS' TOIM.
        triplet_margin: the margin M of the triplet term.
        triplet_mining: ``"all"`` valid triplets (AlignPS eq. 3) or the ``"hardest"`` per anchor.
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
        temperature: float = 1 / 30,
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
        _require(temperature > 0, f"temperature must be positive, got {temperature}")
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
        self.temperature = temperature
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
            ``triplet_weight``) when the triplet term is on. Each loss is the mean over the
            labeled samples (the triplet term: over triplets or anchors) and is a zero connected
            to ``features`` when there is nothing to average.
        """
        pids = self._checked_pids(features, pids)
        _check_weights(weights, len(pids))
        labeled = pids >= 0
        labeled_weights = None if weights is None else weights[labeled]

        losses = {
            "loss_oim": self._matching_loss(features[labeled], pids[labeled], labeled_weights)
        }
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
        """(N, L + Q) similarities to the LUT rows, then to the queue slots, divided by tau."""
        dtype = torch.promote_types(features.dtype, self.lut.dtype)
        memory = torch.cat([self.lut, self.queue]).to(dtype)  # a copy: the update may follow
        # Under mixed precision the 1/tau scaling would magnify half-precision rounding.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return features.to(dtype) @ memory.T / self.temperature

    @torch.no_grad()
    def update_memory(self, features: Tensor, pids: Tensor) -> None:
        """Momentum-update the LUT with labeled features and enqueue the unlabeled ones.

        Several features of one identity in a batch (all ranks together) update its row once,
        with their mean: v <- normalise(gamma * v + (1 - gamma) * mean(x)).
        """
        features, pids = _gather_from_all_ranks(features.detach(), pids)
        features = features.to(self.lut.dtype)
        labeled = pids >= 0
        self._update_lut(features[labeled], pids[labeled])
        self._enqueue(features[~labeled])

    def _matching_loss(self, features: Tensor, pids: Tensor, weights: Tensor | None) -> Tensor:
        if len(pids) == 0:
            return features.sum() * 0
        log_p = self.logits(features).log_softmax(dim=1)
        log_p_target = log_p.gather(1, pids[:, None]).squeeze(1)  # (N,)
        per_sample = -log_p_target
        if self.focal_gamma > 0:
            per_sample = per_sample * (1 - log_p_target.exp()).pow(self.focal_gamma)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean()

    def _update_lut(self, features: Tensor, pids: Tensor) -> None:
        if len(pids) == 0:
            return
        identities, slot = pids.unique(return_inverse=True)
        sums = features.new_zeros(len(identities), self.embedding_dim).index_add_(0, slot, features)
        means = sums / torch.bincount(slot, minlength=len(identities))[:, None]
        moved = self.momentum * self.lut[identities] + (1 - self.momentum) * means
        self.lut[identities] = F.normalize(moved, dim=1)

    def _enqueue(self, features: Tensor) -> None:
        if self.queue_size == 0 or len(features) == 0:
            return
        pushed = len(features)
        # Of more than Q features only the last Q would survive the wrap-around.
        survivors = features[-self.queue_size :]
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
            f"temperature={self.temperature:.4g}, focal_gamma={self.focal_gamma}, "
            f"triplet_weight={self.triplet_weight}, triplet_margin={self.triplet_margin}, "
            f"triplet_mining={self.triplet_mining!r}"
        )


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
