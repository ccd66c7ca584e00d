"""Norm-aware embedding: the angle is the embedding, the norm is the person score."""

import pytest
import torch

from models.heads.nae import NormAwareEmbedding, split_dimension


def test_the_embedding_is_split_between_the_inputs():
    assert split_dimension(256, 2) == [128, 128]
    assert split_dimension(7, 3) == [2, 2, 3]  # the remainder goes to the last parts
    nae = NormAwareEmbedding((16, 32), dim=10)
    assert [p[0].out_features for p in nae.projectors] == [5, 5]


def test_embeddings_are_unit_vectors_along_the_projected_features():
    torch.manual_seed(0)
    nae = NormAwareEmbedding((6, 4), dim=8).train()
    features = [torch.randn(5, 6), torch.randn(5, 4)]
    embeddings, _ = nae(features)
    projected = torch.cat([nae.projectors[0](features[0]), nae.projectors[1](features[1])], 1)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(embeddings, projected / projected.norm(dim=1, keepdim=True))


def test_the_person_score_is_the_norm_through_batchnorm():
    """In eval mode the rescaler is an affine map of the norm with its running statistics:
    logit = (norm - mean) / sqrt(var + eps) * weight + bias, so a larger norm scores higher
    when the weight is positive."""
    torch.manual_seed(0)
    nae = NormAwareEmbedding((6, 4), dim=8).eval()
    rescaler = nae.rescaler
    with torch.no_grad():
        rescaler.running_mean.fill_(2.0)
        rescaler.running_var.fill_(4.0)
        rescaler.weight.fill_(3.0)
        rescaler.bias.fill_(-1.0)
    features = [torch.randn(5, 6), torch.randn(5, 4)]
    _, logits = nae(features)
    projected = torch.cat([nae.projectors[0](features[0]), nae.projectors[1](features[1])], 1)
    norms = projected.norm(dim=1)
    expected = (norms - 2.0) / torch.sqrt(torch.tensor(4.0 + rescaler.eps)) * 3.0 - 1.0
    torch.testing.assert_close(logits, expected)
    order = norms.argsort()
    assert (logits[order].diff() > 0).all()


def test_initialisation_follows_the_released_code():
    nae = NormAwareEmbedding((64, 64), dim=8)
    for projector in nae.projectors:
        for layer in projector:
            assert layer.bias.abs().max() == 0
            assert layer.weight.std() < 0.05  # N(0, 0.01), BatchNorm weights included


def test_the_number_of_inputs_is_checked():
    with pytest.raises(ValueError, match="expected 2 features"):
        NormAwareEmbedding((4, 4), dim=8)([torch.randn(2, 4)])
