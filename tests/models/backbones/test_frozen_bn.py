"""FrozenBatchNorm2d: BatchNorm2d's eval-mode affine map, held constant."""

import torch
from torch import nn

from models.backbones import FrozenBatchNorm2d


def _batch_norm_with_random_statistics(channels: int) -> nn.BatchNorm2d:
    batch_norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        batch_norm.weight.normal_()
        batch_norm.bias.normal_()
        batch_norm.running_mean.normal_()
        batch_norm.running_var.uniform_(0.1, 3.0)
    batch_norm.num_batches_tracked.fill_(12)
    return batch_norm.eval()


def test_normalises_with_the_stored_statistics_computed_by_hand():
    frozen = FrozenBatchNorm2d(1)
    frozen.running_mean.fill_(1.0)
    frozen.running_var.fill_(4.0 - frozen.eps)  # sqrt(var + eps) = 2
    frozen.weight.fill_(3.0)
    frozen.bias.fill_(0.5)

    # (5 - 1) / 2 * 3 + 0.5 = 6.5 and (-1 - 1) / 2 * 3 + 0.5 = -2.5
    out = frozen(torch.tensor([5.0, -1.0]).view(1, 1, 1, 2))

    torch.testing.assert_close(out, torch.tensor([6.5, -2.5]).view(1, 1, 1, 2))


def test_starts_as_the_identity():
    x = torch.randn(2, 3, 4, 5)
    # With mean 0, var 1: x / sqrt(1 + 1e-5), one part in 200,000 below x.
    torch.testing.assert_close(FrozenBatchNorm2d(3)(x), x, rtol=1e-5, atol=0)


def test_equals_batch_norm_in_eval_mode_after_loading_its_state_dict():
    batch_norm = _batch_norm_with_random_statistics(6)
    frozen = FrozenBatchNorm2d(6)

    # strict: num_batches_tracked is dropped, everything else has a place.
    frozen.load_state_dict(batch_norm.state_dict(), strict=True)

    x = torch.randn(3, 6, 5, 7)
    torch.testing.assert_close(frozen(x), batch_norm(x))


def test_is_the_same_in_train_mode_and_has_nothing_to_train():
    batch_norm = _batch_norm_with_random_statistics(4)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(batch_norm.state_dict())
    x = torch.randn(2, 4, 3, 3)

    eval_out = frozen.eval()(x)
    train_out = frozen.train()(x)

    assert torch.equal(train_out, eval_out)
    assert list(frozen.parameters()) == []
    assert sorted(dict(frozen.named_buffers())) == ["bias", "running_mean", "running_var", "weight"]


def test_keeps_the_input_dtype():
    x = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)
    assert FrozenBatchNorm2d(2)(x).dtype == torch.bfloat16


def test_repr_names_channels_and_eps():
    assert repr(FrozenBatchNorm2d(16)) == "FrozenBatchNorm2d(16, eps=1e-05)"
