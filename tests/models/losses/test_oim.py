"""OIM loss: memory updates, logits, the (focal, weighted) matching loss and its gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import OIMLoss


def oim_with_memory(lut, queue=(), **options) -> OIMLoss:
    """An OIMLoss whose LUT rows and queue slots are the given vectors."""
    lut = torch.tensor(lut, dtype=torch.float32)
    queue = torch.tensor(queue, dtype=torch.float32).reshape(-1, lut.shape[1])
    loss = OIMLoss(lut.shape[1], lut.shape[0], queue.shape[0], **options)
    loss.lut.copy_(lut)
    loss.queue.copy_(queue)
    return loss


# --- LUT update -------------------------------------------------------------------------------


def test_lut_row_moves_towards_feature_by_momentum_then_is_renormalised():
    oim = oim_with_memory([[1.0, 0.0], [0.0, 0.0]], momentum=0.75)
    oim(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    # 0.75 * (1, 0) + 0.25 * (0, 1) = (0.75, 0.25), norm sqrt(0.625) -> (3, 1) / sqrt(10)
    expected = torch.tensor([3.0, 1.0]) / math.sqrt(10)
    torch.testing.assert_close(oim.lut[0], expected)
    # The other identity did not appear in the batch: untouched.
    torch.testing.assert_close(oim.lut[1], torch.zeros(2))


def test_first_update_of_an_empty_lut_row_stores_the_normalised_feature():
    oim = oim_with_memory([[0.0, 0.0]], momentum=0.5)
    oim(torch.tensor([[3.0, 4.0]]), torch.tensor([0]))
    # 0.5 * 0 + 0.5 * (3, 4) = (1.5, 2), normalised to (0.6, 0.8)
    torch.testing.assert_close(oim.lut[0], torch.tensor([0.6, 0.8]))


def test_features_of_one_identity_update_its_row_one_after_the_other_in_batch_order():
    oim = oim_with_memory([[1.0, 0.0]], momentum=0.5)
    oim(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.tensor([0, 0]))
    # (1, 0) -> 0.5 (1, 0) + 0.5 (0, 1) = (0.5, 0.5) -> (1, 1) / sqrt(2); then
    # 0.5 (1, 1) / sqrt(2) + 0.5 (-1, 0) = (1 / sqrt(8) - 1 / 2, 1 / sqrt(8)), normalised.
    second = torch.tensor([1 / math.sqrt(8) - 0.5, 1 / math.sqrt(8)])
    torch.testing.assert_close(oim.lut[0], second / second.norm())


def test_without_renormalisation_a_row_is_the_plain_momentum_average():
    oim = oim_with_memory([[0.0, 0.0]], momentum=0.5, lut_renormalize=False)
    oim(torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.tensor([0, 0]))
    # 0.5 (0.6, 0.8) = (0.3, 0.4); then 0.5 (0.3, 0.4) + 0.5 (1, 0) = (0.65, 0.2)
    torch.testing.assert_close(oim.lut[0], torch.tensor([0.65, 0.2]))


def _released_lut_update(lut, features, pids, momentum, renormalize):
    """The released OIM layers' update: a Python loop over the samples in batch order."""
    lut = lut.clone()
    for feature, pid in zip(features, pids.tolist(), strict=True):
        if pid >= 0:
            lut[pid] = momentum * lut[pid] + (1 - momentum) * feature
            if renormalize:
                lut[pid] /= lut[pid].norm()
    return lut


@pytest.mark.parametrize("renormalize", [True, False])
def test_lut_update_is_the_released_per_sample_loop(renormalize):
    generator = torch.Generator().manual_seed(3)
    lut = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    features = F.normalize(torch.randn(40, 8, generator=generator), dim=1)
    pids = torch.randint(-1, 5, (40,), generator=generator)  # repeats, unlabeled, any order
    oim = OIMLoss(8, 5, 4, momentum=0.3, lut_renormalize=renormalize)
    oim.lut.copy_(lut)
    oim(features, pids)
    expected = _released_lut_update(lut, features, pids, 0.3, renormalize)
    torch.testing.assert_close(oim.lut, expected)


def test_unlabeled_features_leave_the_lut_alone():
    oim = oim_with_memory([[1.0, 0.0]], queue=[[0.0, 0.0]])
    oim(torch.tensor([[0.0, 1.0]]), torch.tensor([-1]))
    torch.testing.assert_close(oim.lut[0], torch.tensor([1.0, 0.0]))


def test_memory_is_not_updated_in_eval_mode():
    oim = oim_with_memory([[1.0, 0.0]], queue=[[0.0, 0.0]]).eval()
    oim(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, -1]))
    torch.testing.assert_close(oim.lut, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(oim.queue, torch.zeros(1, 2))


# --- circular queue ---------------------------------------------------------------------------


def unlabeled(*values: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (v, 0) that say which push they came from, all with pid -1."""
    features = torch.tensor([[v, 0.0] for v in values])
    return features, torch.full((len(values),), -1)


def test_queue_is_filled_in_order_and_wraps_around_overwriting_the_oldest():
    oim = OIMLoss(2, 1, 3)
    oim(*unlabeled(1, 2))
    torch.testing.assert_close(oim.queue[:, 0], torch.tensor([1.0, 2.0, 0.0]))
    assert int(oim.queue_ptr) == 2
    # 3 goes to the last slot, 4 wraps around onto the oldest entry, 1.
    oim(*unlabeled(3, 4))
    torch.testing.assert_close(oim.queue[:, 0], torch.tensor([4.0, 2.0, 3.0]))
    assert int(oim.queue_ptr) == 1


def test_pushing_more_than_the_queue_holds_keeps_the_newest_in_circular_order():
    oim = OIMLoss(2, 1, 3)
    oim(*unlabeled(9))  # pointer at slot 1
    oim(*unlabeled(10, 11, 12, 13, 14))
    # From slot 1: 10->1, 11->2, 12->0, 13->1, 14->2; the pointer ends at (1 + 5) % 3 = 0.
    torch.testing.assert_close(oim.queue[:, 0], torch.tensor([12.0, 13.0, 14.0]))
    assert int(oim.queue_ptr) == 0


def test_labeled_features_do_not_enter_the_queue():
    oim = OIMLoss(2, 2, 2)
    oim(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, -1]))
    torch.testing.assert_close(oim.queue, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_queue_keeps_only_the_first_queue_dims_of_each_feature():
    oim = OIMLoss(4, 1, 2, queue_dims=2)
    oim(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([-1]))
    torch.testing.assert_close(oim.queue[0], torch.tensor([0.1, 0.2, 0.0, 0.0]))


def test_zero_queue_size_disables_the_queue():
    oim = OIMLoss(2, 1, 0)
    losses = oim(*unlabeled(1))
    assert oim.queue.shape == (0, 2)
    assert losses["loss_oim"].item() == 0.0


# --- logits and the matching loss -------------------------------------------------------------


def test_logits_are_similarities_to_lut_then_queue_each_times_its_scale():
    oim = oim_with_memory([[1.0, 0.0]], queue=[[0.0, 1.0]], lut_scale=15.0, queue_scale=10.0)
    logits = oim.logits(torch.tensor([[0.6, 0.8]]))
    # (0.6, 0.8) . (1, 0) = 0.6 times 15 and . (0, 1) = 0.8 times 10
    torch.testing.assert_close(logits, torch.tensor([[9.0, 8.0]]))


def test_two_class_loss_is_the_hand_computed_cross_entropy_at_scale():
    oim = oim_with_memory([[1.0, 0.0], [0.0, 1.0]], lut_scale=2.0)
    loss = oim(torch.tensor([[0.6, 0.8]]), torch.tensor([0]))["loss_oim"]
    # logits (1.2, 1.6): -log(e^1.2 / (e^1.2 + e^1.6)) = log(1 + e^0.4)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.4)), rel=1e-6)


def test_queue_entries_are_negatives_in_the_softmax():
    oim = oim_with_memory([[1.0, 0.0]], queue=[[0.0, 1.0]], lut_scale=10.0, queue_scale=10.0)
    loss = oim(torch.tensor([[0.6, 0.8]]), torch.tensor([0]))["loss_oim"]
    # logits (6, 8) with the target the LUT's: log(1 + e^(8 - 6))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)


def test_unlabeled_samples_add_no_loss_but_enter_the_queue():
    lut = [[1.0, 0.0], [0.0, 1.0]]
    labeled_x, unlabeled_x = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6]])
    alone = oim_with_memory(lut, queue=[[0.0, 0.0]])(labeled_x, torch.tensor([1]))
    mixed_oim = oim_with_memory(lut, queue=[[0.0, 0.0]])
    mixed = mixed_oim(torch.cat([labeled_x, unlabeled_x]), torch.tensor([1, -1]))
    # The mean runs over labeled samples only, so the unlabeled one changes nothing...
    torch.testing.assert_close(mixed["loss_oim"], alone["loss_oim"])
    # ...but it is remembered.
    torch.testing.assert_close(mixed_oim.queue, unlabeled_x)


def test_averaged_over_all_samples_unlabeled_ones_count_in_the_denominator():
    lut = [[1.0, 0.0], [0.0, 1.0]]
    labeled_x, unlabeled_x = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    alone = oim_with_memory(lut, queue=[[0.0, 0.0]]).eval()(labeled_x, torch.tensor([1]))
    mixed = oim_with_memory(lut, queue=[[0.0, 0.0]], average_over="all").eval()(
        torch.cat([labeled_x, unlabeled_x]), torch.tensor([1, -1, -1])
    )
    # The released heads' mean: one labeled term over three positive locations.
    torch.testing.assert_close(mixed["loss_oim"], alone["loss_oim"] / 3)


def test_only_unlabeled_samples_give_a_zero_loss_connected_to_the_features():
    features = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = OIMLoss(2, 2, 4)(features, torch.tensor([-1]))["loss_oim"]
    assert loss.item() == 0.0
    loss.backward()
    torch.testing.assert_close(features.grad, torch.zeros(1, 2))


@pytest.mark.parametrize("triplet_weight", [0.0, 1.0])
def test_an_empty_batch_gives_zero_losses_that_backpropagate(triplet_weight):
    features = torch.zeros(0, 4, requires_grad=True)
    losses = OIMLoss(4, 3, 5, triplet_weight=triplet_weight)(
        features, torch.zeros(0, dtype=torch.long)
    )
    total = sum(losses.values())
    assert total.item() == 0.0
    total.backward()
    assert features.grad.shape == (0, 4)


# --- focal modulation and sample weights ------------------------------------------------------


def test_focal_gamma_zero_is_the_plain_cross_entropy_over_lut_and_queue():
    oim = oim_with_memory(
        [[1.0, 0.0], [0.0, 1.0]], queue=[[0.8, 0.6]], lut_scale=5.0, queue_scale=5.0
    )
    features = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    pids = torch.tensor([0, 0])
    loss = oim.eval()(features, pids)["loss_oim"]
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    torch.testing.assert_close(loss, F.cross_entropy(features @ memory.T / 0.2, pids))


def test_focal_modulation_multiplies_the_cross_entropy_by_one_minus_p_to_the_gamma():
    oim = oim_with_memory([[1.0, 0.0], [0.0, 1.0]], lut_scale=2.0, focal_gamma=2.0)
    loss = oim(torch.tensor([[0.6, 0.8]]), torch.tensor([0]))["loss_oim"]
    # As in the two-class case above, p = 1 / (1 + e^0.4); loss = (1 - p)^2 * (-log p).
    p = 1 / (1 + math.exp(0.4))
    assert loss.item() == pytest.approx((1 - p) ** 2 * -math.log(p), rel=1e-6)


def test_focal_modulation_down_weights_easy_samples_more_than_hard_ones():
    lut = [[1.0, 0.0], [0.0, 1.0]]
    # At scale 2 (tau = 0.5) the logits are (2, 0) for the easy sample, on its own centre, so
    # p = e^2 / (1 + e^2) = 0.88, and (0, 2) for the hard one, on the other centre: p = 0.12.
    easy = torch.tensor([[1.0, 0.0]])
    hard = torch.tensor([[0.0, 1.0]])
    pid = torch.tensor([0])

    def focal_over_plain(features: torch.Tensor) -> float:
        focal = oim_with_memory(lut, lut_scale=2.0, focal_gamma=2.0)(features, pid)
        plain = oim_with_memory(lut, lut_scale=2.0)(features, pid)
        return (focal["loss_oim"] / plain["loss_oim"]).item()

    # The ratio is (1 - p)^2: 0.12^2 for the easy sample, 0.88^2 for the hard one.
    p_easy = math.exp(2) / (1 + math.exp(2))
    assert focal_over_plain(easy) == pytest.approx((1 - p_easy) ** 2, rel=1e-5)
    assert focal_over_plain(hard) == pytest.approx(p_easy**2, rel=1e-5)
    assert focal_over_plain(easy) < focal_over_plain(hard) < 1.0


def test_sample_weights_scale_each_samples_loss():
    lut = [[1.0, 0.0], [0.0, 1.0]]
    features = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    pids = torch.tensor([0, 1])
    options = {"triplet_weight": 1.0, "triplet_mining": "hardest"}
    unweighted = oim_with_memory(lut, **options).eval()(features, pids)
    doubled = oim_with_memory(lut, **options).eval()(features, pids, torch.tensor([2.0, 2.0]))
    for name in ("loss_oim", "loss_triplet"):
        torch.testing.assert_close(doubled[name], 2 * unweighted[name])

    # A zero weight removes a sample; the mean still divides by the number of samples.
    first_only = oim_with_memory(lut).eval()(features, pids, torch.tensor([3.0, 0.0]))
    first_alone = oim_with_memory(lut).eval()(features[:1], pids[:1])
    torch.testing.assert_close(first_only["loss_oim"], 3.0 * first_alone["loss_oim"] / 2)


# --- gradients, state and training ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"focal_gamma": 2.0},
        {"triplet_weight": 0.5, "triplet_mining": "all"},
        {"triplet_weight": 0.5, "triplet_mining": "hardest", "focal_gamma": 1.0},
        {"average_over": "all", "queue_dims": 2},
    ],
    ids=["plain", "focal", "triplet-all", "triplet-hardest-focal", "all-positives"],
)
def test_gradient_with_respect_to_features_matches_finite_differences(options):
    generator = torch.Generator().manual_seed(1)
    oim = OIMLoss(4, 3, 2, lut_scale=4.0, queue_scale=3.0, **options).double().eval()
    oim.lut.copy_(F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.double), dim=1))
    oim.queue.copy_(F.normalize(torch.randn(2, 4, generator=generator, dtype=torch.double), dim=1))
    features = torch.randn(5, 4, generator=generator, dtype=torch.double, requires_grad=True)
    pids = torch.tensor([0, 0, 2, -1, 1])
    weights = torch.tensor([1.0, 0.5, 1.5, 1.0, 0.7], dtype=torch.double)

    def total_loss(x: torch.Tensor) -> torch.Tensor:
        return sum(oim(x, pids, weights).values())

    assert torch.autograd.gradcheck(total_loss, (features,))


def test_losses_are_computed_in_full_precision_under_mixed_precision_autocast():
    generator = torch.Generator().manual_seed(2)
    oim = OIMLoss(8, 3, 2, triplet_weight=1.0).eval()
    oim.lut.copy_(F.normalize(torch.randn(3, 8, generator=generator), dim=1))
    features = F.normalize(torch.randn(4, 8, generator=generator), dim=1).bfloat16()
    pids = torch.tensor([0, 0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = oim(features, pids)
    # The same bfloat16 inputs, upcast by hand, outside autocast.
    reference = oim(features.float(), pids)
    for name, loss in mixed.items():
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, reference[name])


def test_lut_and_queue_are_buffers_without_gradient():
    oim = OIMLoss(2, 2, 2, triplet_weight=1.0)
    assert list(oim.parameters()) == []
    features = torch.tensor([[0.6, 0.8], [0.8, 0.6]], requires_grad=True)
    sum(oim(features, torch.tensor([0, 1])).values()).backward()
    assert features.grad is not None
    assert not oim.lut.requires_grad and oim.lut.grad is None
    assert not oim.queue.requires_grad and oim.queue.grad is None


def test_state_dict_carries_lut_queue_and_queue_pointer():
    trained = OIMLoss(2, 2, 3)
    trained(torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.tensor([1, -1]))
    state = trained.state_dict()
    assert set(state) == {"lut", "queue", "queue_ptr"}

    restored = OIMLoss(2, 2, 3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.lut, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))
    torch.testing.assert_close(restored.queue, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert int(restored.queue_ptr) == 1


def train_toy_embedding(learning_rate: float, triplet_weight: float) -> list[float]:
    """Losses of 30 SGD steps of a linear 8-D -> 4-D embedding of four separable identities."""
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 8, generator=generator)
    pids = torch.arange(4).repeat_interleave(3)
    inputs = centres[pids] + 0.1 * torch.randn(len(pids), 8, generator=generator)
    inputs = torch.cat([inputs, torch.randn(4, 8, generator=generator)])  # 4 unlabeled persons
    pids = torch.cat([pids, torch.full((4,), -1)])

    torch.manual_seed(0)
    embed = torch.nn.Linear(8, 4)
    oim = OIMLoss(4, 4, 8, triplet_weight=triplet_weight)
    optimiser = torch.optim.SGD(embed.parameters(), lr=learning_rate)
    history = []
    for _ in range(30):
        loss = sum(oim(F.normalize(embed(inputs), dim=1), pids).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    return history


@pytest.mark.parametrize("triplet_weight", [0.0, 1.0])
def test_loss_decreases_over_sgd_steps_on_separable_toy_features(triplet_weight):
    trained = train_toy_embedding(0.1, triplet_weight)
    # Filling the LUT alone lowers the loss too; a frozen embedding (learning rate 0) goes
    # through the same memory updates and shows how far that gets.
    frozen = train_toy_embedding(0.0, triplet_weight)
    assert trained[-1] < 0.5 * trained[0]
    assert trained[-1] < 0.1 * frozen[-1]


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "pids", "weights", "error", "message"),
    [
        (torch.zeros(2, 3), torch.tensor([0, 1]), None, ValueError, r"shape \(N, 4\)"),
        (torch.zeros(2, 4), torch.tensor([0]), None, ValueError, r"pids must have shape \(2,\)"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), None, TypeError, "integer"),
        (torch.zeros(2, 4), torch.tensor([0, 3]), None, ValueError, r"\[0, 3\)"),
        (torch.zeros(2, 4), torch.tensor([0, -2]), None, ValueError, "-1"),
        (torch.zeros(2, 4), torch.tensor([0, 1]), torch.ones(3), ValueError, "weights"),
        (
            torch.zeros(2, 4),
            torch.tensor([0, 1]),
            torch.ones(2, dtype=torch.long),
            TypeError,
            "floating",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(features, pids, weights, error, message):
    with pytest.raises(error, match=message):
        OIMLoss(4, 3, 2)(features, pids, weights)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"momentum": 1.5}, "momentum"),
        ({"lut_scale": 0.0}, "lut_scale"),
        ({"queue_scale": -1.0}, "queue_scale"),
        ({"queue_dims": 0}, "queue_dims"),
        ({"queue_dims": 5}, "queue_dims"),
        ({"average_over": "unlabeled"}, "average_over"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"triplet_weight": -1.0}, "triplet_weight"),
        ({"triplet_margin": -0.1}, "triplet_margin"),
        ({"triplet_mining": "semi-hard"}, "triplet_mining"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        OIMLoss(4, 3, 2, **options)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [((0, 3, 2), "embedding_dim"), ((4, 0, 2), "num_labeled"), ((4, 3, -1), "queue_size")],
)
def test_bad_sizes_raise_clear_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        OIMLoss(*sizes)
