"""Shapes and behaviour of LEAPS' modules: the dynamic conv, a detection stage, the flexible re-id
head with its PRM and HIRM branches."""

import pytest
import torch
import torch.nn.functional as F

from models.leaps.config import DetectionConfig, ReidHeadConfig
from models.leaps.detection_head import DetectionStage, boxes_to_rois
from models.leaps.dynamic_conv import DynamicConv
from models.leaps.matcher import ReidSamples
from models.leaps.reid_head import (
    FlexibleReidHead,
    HierarchicalInteractionReidModule,
    PlainReidModule,
    ReidOutput,
)
from models.ops.roi_align import roi_align

C, N, B = 16, 5, 2


def _boxes(batch: int = B, num: int = N) -> torch.Tensor:
    """Valid boxes inside a 64x96 image."""
    generator = torch.Generator().manual_seed(1)
    corner = torch.rand(batch, num, 2, generator=generator) * torch.tensor([50.0, 30.0])
    size = 8 + torch.rand(batch, num, 2, generator=generator) * 30
    return torch.cat([corner, corner + size], dim=2)


def _reid_config(**fields) -> ReidHeadConfig:
    return ReidHeadConfig(feature_dim=8, num_heads=2, dynamic_dim=4, roi_size=3, **fields)


def test_boxes_to_rois_prefixes_each_box_with_its_image_index():
    boxes = _boxes()
    rois = boxes_to_rois(boxes)
    assert rois.shape == (B * N, 5)
    assert rois[:, 0].tolist() == [0.0] * N + [1.0] * N
    assert torch.equal(rois[N:, 1:], boxes[1])


def test_dynamic_conv_maps_each_proposal_with_its_own_weights():
    conv = DynamicConv(C, dynamic_dim=4, num_bins=9, out_dim=12)
    proposals, rois = torch.randn(3, C), torch.randn(3, C, 3, 3)
    out = conv(proposals, rois)
    assert out.shape == (3, 12)
    # Changing proposal 0's feature changes its weights, hence its output only.
    changed = proposals.clone()
    changed[0] += 1.0
    out2 = conv(changed, rois)
    assert not torch.allclose(out2[0], out[0])
    assert torch.allclose(out2[1:], out[1:])


def test_detection_stage_shapes():
    stage = DetectionStage(
        DetectionConfig(hidden_dim=C, feedforward_dim=32, num_heads=2, dynamic_dim=4)
    )
    out = stage(torch.randn(B, C, 4, 6), _boxes(), torch.randn(B, N, C))
    assert out.logits.shape == (B, N)
    assert out.boxes.shape == (B, N, 4)
    assert out.features.shape == (B, N, C)


def test_detection_stage_with_zero_deltas_returns_its_input_boxes():
    stage = DetectionStage(
        DetectionConfig(hidden_dim=C, feedforward_dim=32, num_heads=2, dynamic_dim=4)
    )
    torch.nn.init.zeros_(stage.box_deltas.weight)
    torch.nn.init.zeros_(stage.box_deltas.bias)
    boxes = _boxes()
    out = stage(torch.randn(B, C, 4, 6), boxes, torch.randn(B, N, C))
    assert torch.allclose(out.boxes, boxes, atol=1e-4)


def test_proposals_of_one_image_attend_to_each_other_not_to_other_images():
    stage = DetectionStage(
        DetectionConfig(hidden_dim=C, feedforward_dim=32, num_heads=2, dynamic_dim=4)
    ).eval()
    features, boxes, proposals = torch.randn(B, C, 4, 6), _boxes(), torch.randn(B, N, C)
    out = stage(features, boxes, proposals)
    changed = proposals.clone()
    changed[0, 0] += 1.0  # another proposal of image 0
    out2 = stage(features, boxes, changed)
    assert not torch.allclose(out2.logits[0, 1:], out.logits[0, 1:])
    assert torch.allclose(out2.logits[1], out.logits[1])


def test_prm_returns_the_first_fc_output_as_its_intermediate_feature():
    prm = PlainReidModule(C, num_bins=9, feature_dim=8)
    rois = torch.randn(B * N, C, 3, 3)
    out = prm(torch.randn(B, N, C), rois)
    assert out.feature.shape == out.intermediate.shape == (B, N, 8)
    expected = F.relu(prm.fc1(rois.flatten(1))).reshape(B, N, 8)
    assert torch.allclose(out.intermediate, expected)


@pytest.mark.parametrize("inter_instance", [True, False])
def test_hirm_mixes_proposals_only_through_its_inter_instance_attention(inter_instance):
    hirm = HierarchicalInteractionReidModule(
        C, num_bins=9, cfg=_reid_config(inter_instance=inter_instance)
    )
    proposals, rois = torch.randn(B, N, C), torch.randn(B * N, C, 3, 3)
    out = hirm(proposals, rois)
    assert out.feature.shape == out.intermediate.shape == (B, N, 8)
    changed = rois.clone()
    changed[0] += 1.0  # the RoI of proposal 0 in image 0
    out2 = hirm(proposals, changed)
    # Intra-instance features stay per proposal; F_rh of proposal 1 sees proposal 0 only
    # through the attention.
    assert torch.allclose(out2.intermediate[0, 1:], out.intermediate[0, 1:])
    assert torch.allclose(out2.feature[0, 1:], out.feature[0, 1:]) is not inter_instance
    assert torch.allclose(out2.feature[1], out.feature[1])


def test_hirm_intra_instance_weights_come_from_the_proposal_features():
    with_intra = HierarchicalInteractionReidModule(C, 9, _reid_config())
    without = HierarchicalInteractionReidModule(C, 9, _reid_config(intra_instance=False))
    assert isinstance(with_intra.intra_instance, DynamicConv)
    assert not isinstance(without.intra_instance, DynamicConv)
    rois = torch.randn(B * N, C, 3, 3)
    proposals = torch.randn(B, N, C)
    for hirm, depends in ((with_intra, True), (without, False)):
        changed = hirm(proposals + 1.0, rois).intermediate
        assert torch.allclose(changed, hirm(proposals, rois).intermediate) is not depends


def test_dynamic_roi_align_starts_as_plain_roi_align():
    head = FlexibleReidHead(_reid_config(), C)
    features, boxes = torch.randn(B, C, 8, 12), _boxes()
    pooled = head.roi_features(features, boxes, torch.randn(B, N, C))
    expected = roi_align(features, boxes_to_rois(boxes), 3, 1 / 8, 2)
    assert torch.allclose(pooled, expected, atol=1e-6)


def test_dynamic_roi_align_moves_bins_with_offsets_predicted_from_proposal_features():
    head = FlexibleReidHead(_reid_config(), C)
    assert head.offset_predictor is not None
    torch.nn.init.normal_(head.offset_predictor.weight, std=0.1)
    features, boxes, proposals = torch.randn(B, C, 8, 12), _boxes(), torch.randn(B, N, C)
    pooled = head.roi_features(features, boxes, proposals)
    assert not torch.allclose(pooled, roi_align(features, boxes_to_rois(boxes), 3, 1 / 8, 2))
    pooled.sum().backward()
    assert head.offset_predictor.weight.grad.abs().sum() > 0


def test_plain_roi_align_switch_has_no_offset_predictor():
    head = FlexibleReidHead(_reid_config(roi_align="plain"), C)
    assert head.offset_predictor is None


@pytest.mark.parametrize(
    ("branches", "kinds"),
    [
        (("prm", "hirm"), [PlainReidModule, HierarchicalInteractionReidModule]),
        (("prm",), [PlainReidModule]),
        (("hirm",), [HierarchicalInteractionReidModule]),
        (("prm", "prm"), [PlainReidModule, PlainReidModule]),
        (("hirm", "hirm"), [HierarchicalInteractionReidModule] * 2),
    ],
)
def test_reid_head_builds_the_configured_branches(branches, kinds):
    head = FlexibleReidHead(_reid_config(branches=branches), C)
    assert [type(branch) for branch in head.branches] == kinds
    out = head(torch.randn(B, C, 8, 12), _boxes(), torch.randn(B, N, C))
    assert len(out.features) == len(out.intermediates) == len(branches)
    assert out.embedding().shape == (B, N, 8 * len(branches))


def test_embedding_is_the_normalised_concatenation_of_normalised_branches():
    prm, hirm = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    embedding = ReidOutput((prm, hirm), (prm, hirm)).embedding()
    # Each normalised branch has norm 1, so the concatenation has norm sqrt(2).
    expected = torch.cat([F.normalize(prm, dim=-1), F.normalize(hirm, dim=-1)], -1) / 2**0.5
    assert torch.allclose(embedding, expected, atol=1e-6)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(1, 2))


def test_embedding_norm_standardises_each_branch_feature_over_the_proposals():
    head = FlexibleReidHead(_reid_config(), C).train()
    out = head(torch.randn(B, C, 8, 12), _boxes(), torch.randn(B, N, C))
    for feature in out.features:
        flat = feature.flatten(0, 1)  # (B*N, D): batch statistics of the B*N proposals
        assert torch.allclose(flat.mean(0), torch.zeros(8), atol=1e-5)
        # Unit variance up to BatchNorm's eps: var / (var + eps).
        assert torch.allclose(flat.var(0, unbiased=False), torch.ones(8), atol=1e-2)


def test_embedding_norm_over_the_samples_leaves_the_proposals_and_standardises_the_samples():
    head = FlexibleReidHead(_reid_config(embedding_norm="samples"), C).train()
    out = head(torch.randn(B, C, 8, 12), _boxes(), torch.randn(B, N, C))
    raw = out.features[0].flatten(0, 1)
    assert not torch.allclose(raw.mean(0), torch.zeros(8), atol=1e-3)  # not normalised here
    samples = [
        ReidSamples(torch.tensor(p), torch.zeros(len(p), dtype=torch.long), torch.ones(len(p)))
        for p in ([0, 2, 3], [1, 4])
    ]
    sampled = head.sample_features(out, samples)
    assert sampled.features[0].shape == (5, 8) and sampled.intermediates[0].shape == (5, 8)
    assert torch.allclose(sampled.features[0].mean(0), torch.zeros(8), atol=1e-5)
    # The running statistics, which serve every proposal at inference, are the samples' (the
    # first update moves them from 0 by BatchNorm's momentum, 0.1).
    raw_samples = torch.cat([out.features[0][0, [0, 2, 3]], out.features[0][1, [1, 4]]])
    running = head.embedding_norms[0].running_mean
    assert torch.allclose(running, 0.1 * raw_samples.mean(0).detach(), atol=1e-6)


def test_embedding_norm_switch_removes_the_batch_norms():
    assert FlexibleReidHead(_reid_config(embedding_norm="none"), C).embedding_norms is None
