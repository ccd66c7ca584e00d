"""The FCOS head: outputs per level, location order, decoding, losses by hand, ignore regions,
fixed-size inference.

Most hand-computed cases use a head without tower convs (num_convs=0) so that its outputs are
plain functions of the input: zero features give exactly the conv biases at every location.
"""

import math

import pytest
import torch
from torch import nn
from torch.export import Dim

from models.heads import (
    IGNORED,
    NEGATIVE,
    FCOSHead,
    FCOSHeadConfig,
    FCOSInferenceConfig,
    anchor_points,
    centerness_targets,
    flatten_levels,
)
from models.ops.boxes import elementwise_generalized_box_iou
from models.ops.deform_conv import DeformConvPack

FCOS_STRIDES = [8, 16, 32, 64, 128]


def _small_head(**options) -> FCOSHead:
    settings = dict(in_channels=16, feat_channels=16, num_convs=2, gn_groups=8)
    return FCOSHead(FCOSHeadConfig(**(settings | options)))


def _pyramid(batch: int = 2, height: int = 64, width: int = 80, channels: int = 16):
    return [torch.randn(batch, channels, -(-height // s), -(-width // s)) for s in FCOS_STRIDES]


def _bare_head(quality: str = "iou", assigner=None, ltrb: float = 1.0, **options) -> FCOSHead:
    """One level, no towers, constant outputs on zero input: person logit = the prior bias,
    ltrb = `ltrb` strides (bias of bbox_pred), quality logit 0."""
    config = dict(in_channels=1, num_convs=0, num_levels=1, quality=quality) | options
    config["assigner"] = assigner or {"name": "center_sampling"}
    head = FCOSHead(FCOSHeadConfig(**config))
    torch.nn.init.constant_(head.bbox_pred.bias, ltrb)
    return head


def _inference(**options) -> FCOSInferenceConfig:
    settings = dict(max_detections=5, score_thresh=0.05, nms_thresh=0.6, pre_nms_top_k=20)
    return FCOSInferenceConfig(**(settings | options))


def test_forward_gives_one_map_per_level_with_the_input_resolution():
    features = _pyramid()
    outputs = _small_head()(features)
    for name, maps, channels in (("cls", outputs.cls_logits, 1), ("ltrb", outputs.ltrb, 4)):
        assert len(maps) == 5, name
        for feature, out in zip(features, maps, strict=True):
            assert out.shape == (2, channels, *feature.shape[-2:]), name
    assert [q.shape[1] for q in outputs.quality] == [1] * 5
    assert all((d >= 0).all() for d in outputs.ltrb)  # ReLU distances


def test_head_without_quality_branch_returns_none():
    outputs = _small_head(quality="none")(_pyramid())
    assert outputs.quality is None


def test_single_level_head_for_alignps():
    head = _small_head(num_levels=1, assigner={"name": "center_sampling"})
    outputs = head([torch.randn(1, 16, 12, 10)])
    assert outputs.cls_logits[0].shape == (1, 1, 12, 10)
    with pytest.raises(ValueError, match="1 levels, got 2"):
        head([torch.randn(1, 16, 12, 10)] * 2)


def test_locations_are_flattened_level_by_level_in_row_major_order():
    maps = [torch.zeros(1, 3, 2, 3), torch.zeros(1, 3, 1, 2)]
    anchors = anchor_points(maps, [8, 16])
    # Stride 8: centres at 4, 12, 20 (x) and 4, 12 (y); stride 16: centres at 8, 24 (x), 8 (y).
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert anchors.points.tolist() == expected
    assert anchors.strides.tolist() == [8] * 6 + [16] * 2
    assert anchors.level_ids.tolist() == [0] * 6 + [1] * 2
    # flatten_levels puts channel vectors in the same order.
    values = [torch.arange(6.0).reshape(1, 1, 2, 3), torch.tensor([[[[6.0, 7.0]]]])]
    assert flatten_levels(values)[0, :, 0].tolist() == list(range(8))


def test_person_probability_starts_at_the_prior():
    head = _bare_head()
    outputs = head([torch.zeros(1, 1, 4, 4)])
    torch.testing.assert_close(outputs.cls_logits[0].sigmoid(), torch.full((1, 1, 4, 4), 0.01))


@pytest.mark.parametrize("norm_reg_targets", [True, False])
def test_decoded_boxes_extend_from_the_location_by_the_predicted_distances(norm_reg_targets):
    head = FCOSHead(
        FCOSHeadConfig(
            in_channels=1,
            num_convs=0,
            num_levels=1,
            norm_reg_targets=norm_reg_targets,
            assigner={"name": "center_sampling"},
        )
    )
    # Distances (l, t, r, b) = (8, 16, 24, 32) pixels = (1, 2, 3, 4) strides of 8.
    pixels = torch.tensor([8.0, 16.0, 24.0, 32.0])
    with torch.no_grad():
        head.bbox_pred.bias.copy_(pixels / 8 if norm_reg_targets else pixels.log())
    _, boxes = head.decode(head([torch.zeros(1, 1, 1, 1)]), [8])
    # The only location is (4, 4): box (4 - 8, 4 - 16, 4 + 24, 4 + 32).
    torch.testing.assert_close(boxes, torch.tensor([[[-4.0, -12.0, 28.0, 36.0]]]))


def test_centerness_targets():
    points = torch.tensor([[12.0, 20.0], [16.0, 24.0], [40.0, 20.0]])
    boxes = torch.tensor([[0.0, 0.0, 32.0, 48.0]]).expand(3, 4)
    # (12, 20): l 12, r 20, t 20, b 28 -> sqrt(12/20 * 20/28); the centre -> 1; outside -> 0.
    expected = torch.tensor([math.sqrt(12 / 20 * 20 / 28), 1.0, 0.0])
    torch.testing.assert_close(centerness_targets(points, boxes), expected)


# An 8 x 8 stride-8 map (64 x 64 image) and GT (0, 0, 32, 48): centre (16, 24), center square
# half-size 1.5 x 8 = 12, i.e. x in (4, 28) -> {12, 20}, y in (12, 36) -> {20, 28}: 4 positives.
# Every location predicts ltrb = 1 stride, a 16 x 16 box inside the GT: IoU = GIoU = 256 / 1536.
GT = torch.tensor([[0.0, 0.0, 32.0, 48.0]])
PRIOR_LOGIT = -math.log(99.0)


def _focal(logit: float, positive: bool) -> float:
    p = 1 / (1 + math.exp(-logit))
    return 0.25 * (1 - p) ** 2 * -math.log(p) if positive else 0.75 * p**2 * -math.log(1 - p)


def test_center_sampling_losses_by_hand():
    head = _bare_head(quality="iou")
    outputs = head([torch.zeros(1, 1, 8, 8)])
    losses, assigned = head.loss(outputs, [{"boxes": GT, "pids": torch.tensor([3])}], [8])
    positives = (assigned[0] == 0).nonzero().flatten().tolist()
    assert positives == [2 * 8 + 1, 2 * 8 + 2, 3 * 8 + 1, 3 * 8 + 2]  # (x 12|20, y 20|28)
    expected_cls = (4 * _focal(PRIOR_LOGIT, True) + 60 * _focal(PRIOR_LOGIT, False)) / 4
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(1 - 1 / 6, rel=1e-5)
    # Quality logit 0: binary cross entropy ln 2 whatever the IoU target.
    assert losses["loss_quality"].item() == pytest.approx(math.log(2.0), rel=1e-5)


def test_loss_weights_scale_the_named_losses():
    plain = _bare_head()
    weighted = _bare_head()
    weighted.config = weighted.config.model_copy(
        update=dict(cls_loss_weight=2.0, box_loss_weight=3.0, quality_loss_weight=0.5)
    )
    targets = [{"boxes": GT}]
    base, _ = plain.loss(plain([torch.zeros(1, 1, 8, 8)]), targets, [8])
    scaled, _ = weighted.loss(weighted([torch.zeros(1, 1, 8, 8)]), targets, [8])
    for name, factor in (("loss_cls", 2.0), ("loss_box", 3.0), ("loss_quality", 0.5)):
        assert scaled[name].item() == pytest.approx(factor * base[name].item(), rel=1e-6)


def test_lla_gives_each_person_k_positives():
    head = _bare_head(assigner={"name": "lla", "top_k": 7})
    outputs = head([torch.zeros(1, 1, 8, 8)])
    _, assigned = head.loss(outputs, [{"boxes": GT}], [8])
    assert (assigned[0] == 0).sum() == 7 and (assigned[0] >= -1).all()


# --- ignore regions (CrowdHuman's crowds, reflections): neither person nor background ---------


def test_locations_an_ignore_region_claims_are_in_no_loss():
    # No person, one ignore region: center sampling gives it the same 4 locations it would give
    # a person with that box. They are left out: the classification loss sees 60 negatives.
    head = _bare_head()
    outputs = head([torch.zeros(1, 1, 8, 8)])
    targets = [{"boxes": torch.zeros(0, 4), "ignore_boxes": GT}]
    losses, assigned = head.loss(outputs, targets, [8])
    assert (assigned[0] == IGNORED).nonzero().flatten().tolist() == [17, 18, 25, 26]
    assert (assigned[0] == NEGATIVE).sum() == 60
    assert losses["loss_cls"].item() == pytest.approx(60 * _focal(PRIOR_LOGIT, False), rel=1e-5)
    assert losses["loss_box"].item() == 0 and losses["loss_quality"].item() == 0


def test_an_ignore_region_wins_the_person_locations_it_claims_first():
    # A smaller ignore region (8, 16, 24, 32) centred on the person (0, 0, 32, 48): its centre
    # square holds the same 4 locations (x 12, 20; y 20, 28) as the person's, and FCOS's
    # smallest-area rule, which the released code applies to ignore regions too, gives them to
    # the region.
    head = _bare_head()
    outputs = head([torch.zeros(1, 1, 8, 8)])
    region = torch.tensor([[8.0, 16.0, 24.0, 32.0]])
    with_region, assigned = head.loss(outputs, [{"boxes": GT, "ignore_boxes": region}], [8])
    assert (assigned[0] >= 0).sum() == 0 and (assigned[0] == IGNORED).sum() == 4
    # Nothing positive is left: no box or quality loss, and 60 negatives.
    assert with_region["loss_box"].item() == 0
    assert with_region["loss_cls"].item() == pytest.approx(60 * _focal(PRIOR_LOGIT, False), 1e-5)


def test_lla_ignore_region_takes_its_k_cheapest_anchors_out_of_every_loss():
    # A person on the left, an ignore region on the right: LLA gives each its K = 3 cheapest
    # anchors; the region's 3 are ignored, the person's 3 are positives, the other 58 negatives.
    head = _bare_head(assigner={"name": "lla", "top_k": 3})
    outputs = head([torch.zeros(1, 1, 8, 8)])
    person = torch.tensor([[0.0, 0.0, 24.0, 40.0]])
    region = torch.tensor([[40.0, 8.0, 64.0, 48.0]])
    losses, assigned = head.loss(outputs, [{"boxes": person, "ignore_boxes": region}], [8])
    assert (assigned[0] == 0).sum() == 3 and (assigned[0] == IGNORED).sum() == 3
    points = anchor_points([torch.zeros(1, 1, 8, 8)], [8]).points
    ignored_x = points[assigned[0] == IGNORED, 0]
    assert (ignored_x > 40).all()  # the region's anchors, inside it
    expected_cls = (3 * _focal(PRIOR_LOGIT, True) + 58 * _focal(PRIOR_LOGIT, False)) / 3
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    alone, _ = head.loss(outputs, [{"boxes": person}], [8])
    for name in ("loss_box", "loss_quality"):
        assert losses[name].item() == pytest.approx(alone[name].item(), rel=1e-6), name


def test_malformed_ignore_boxes_are_a_clear_error():
    head = _bare_head()
    outputs = head([torch.zeros(1, 1, 8, 8)])
    with pytest.raises(ValueError, match=r"ignore_boxes.*\(n, 4\)"):
        head.loss(outputs, [{"boxes": GT, "ignore_boxes": torch.zeros(4)}], [8])


# --- box loss weighting -----------------------------------------------------------------------


def _distance_head(**options) -> FCOSHead:
    """One level, no towers: person logit = the prior, ltrb = the input feature (in strides),
    so that each location predicts a box of its own size."""
    head = _bare_head(ltrb=0.0, **options)
    with torch.no_grad():
        head.bbox_pred.weight.zero_()
        head.bbox_pred.weight[:, 0, 1, 1] = 1.0
        head.cls_logits.weight.zero_()
    return head


def _box_losses(box_loss_weights: str, box_loss_normalizer: str) -> tuple[float, float]:
    """(the head's loss_box, the same by hand) on GT (0, 0, 40, 48): centre (20, 24), centre
    square x in (8, 32) -> 12, 20, 28; y in (12, 36) -> 20, 28: 6 positives whose centerness
    and predicted boxes differ."""
    head = _distance_head(
        box_loss_weights=box_loss_weights, box_loss_normalizer=box_loss_normalizer
    )
    features = (1.0 + 0.25 * torch.arange(64.0)).reshape(1, 1, 8, 8) / 8
    gt = torch.tensor([[0.0, 0.0, 40.0, 48.0]])
    outputs = head([features])
    losses, assigned = head.loss(outputs, [{"boxes": gt}], [8])
    positive = assigned[0] == 0
    points = anchor_points([features], [8]).points[positive]
    _, boxes = head.decode(outputs, [8])
    gts = gt.expand(len(points), 4)
    giou_losses = 1 - elementwise_generalized_box_iou(boxes[0, positive], gts)
    weights = centerness_targets(points, gts)
    if box_loss_weights == "uniform":
        weights = torch.ones_like(weights)
    denominator = weights.sum() if box_loss_normalizer == "weights" else len(points)
    assert len(points) == 6
    return losses["loss_box"].item(), ((weights * giou_losses).sum() / denominator).item()


@pytest.mark.parametrize(
    ("weights", "normalizer"),
    [("uniform", "positives"), ("centerness", "positives"), ("centerness", "weights")],
    ids=["LLA: plain mean", "cvpods FCOS: centerness-weighted sum / positives", "mmdet FCOS"],
)
def test_box_loss_is_weighted_and_normalised_as_configured(weights, normalizer):
    loss, expected = _box_losses(weights, normalizer)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_the_three_box_loss_weightings_differ():
    values = {
        _box_losses(*case)[0]
        for case in (
            ("uniform", "positives"),
            ("centerness", "positives"),
            ("centerness", "weights"),
        )
    }
    assert len(values) == 3


# --- deformable last tower conv (AlignPS) -----------------------------------------------------


def test_dcn_on_last_conv_makes_each_towers_last_conv_a_modulated_deformable_one():
    head = _small_head(dcn_on_last_conv=True)
    for tower in (head.cls_tower, head.reg_tower):
        convs = [m for m in tower if isinstance(m, nn.Conv2d | DeformConvPack)]
        assert [type(c) for c in convs] == [nn.Conv2d, DeformConvPack]
        last = convs[-1]
        assert last.modulated
        # It starts undeformed: zero offsets (and a mask of 0.5), zero bias.
        assert (last.conv_offset.weight == 0).all() and (last.conv_offset.bias == 0).all()
        assert (last.bias == 0).all()
    outputs = head(_pyramid())
    assert outputs.cls_logits[0].shape == (2, 1, 8, 10)


def test_batch_with_labeled_unlabeled_and_no_persons():
    head = _small_head()
    features = _pyramid(batch=2)
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 60.0], [40, 2, 76, 62]]),
            "pids": torch.tensor([5, -1]),
        },
        {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)},
    ]
    losses, assigned = head.loss(head(features), targets, FCOS_STRIDES)
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    num_locations = sum(f.shape[-2] * f.shape[-1] for f in features)
    assert [a.shape for a in assigned] == [(num_locations,)] * 2
    assert set(assigned[0].unique().tolist()) == {-1, 0, 1}  # both persons get positives
    assert (assigned[1] == -1).all()


@pytest.mark.parametrize("dcn_on_last_conv", [False, True])
def test_losses_reach_every_learnable_parameter(dcn_on_last_conv):
    # Seeded: with some random features a ReLU can cut a parameter off by chance.
    torch.manual_seed(0)
    head = _small_head(quality="centerness", dcn_on_last_conv=dcn_on_last_conv)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 60.0]])}, {"boxes": torch.zeros(0, 4)}]
    losses, _ = head.loss(head(_pyramid()), targets, FCOS_STRIDES)
    sum(losses.values()).backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_images_without_persons_still_give_connected_zero_box_losses():
    head = _small_head()
    losses, _ = head.loss(head(_pyramid()), [{"boxes": torch.zeros(0, 4)}] * 2, FCOS_STRIDES)
    assert losses["loss_box"].item() == 0 and losses["loss_quality"].item() == 0
    assert losses["loss_box"].requires_grad  # every loss stays in the graph (DDP)


def test_malformed_targets_are_clear_errors():
    head = _small_head()
    outputs = head(_pyramid(batch=1))
    with pytest.raises(ValueError, match="boxes"):
        head.loss(outputs, [{"pids": torch.zeros(0)}], FCOS_STRIDES)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        head.loss(outputs, [{"boxes": torch.zeros(3)}], FCOS_STRIDES)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        head.loss(outputs, [{"boxes": torch.zeros(0, 4)}] * 2, FCOS_STRIDES)


def _scored_head(ltrb: float) -> FCOSHead:
    """One level, no towers, no quality: the person logit is the input feature itself."""
    head = _bare_head(quality="none", ltrb=ltrb)
    with torch.no_grad():
        head.cls_logits.weight.zero_()
        head.cls_logits.weight[0, 0, 1, 1] = 1.0  # centre tap
        head.cls_logits.bias.zero_()
        head.bbox_pred.weight.zero_()
    return head


def _logit_map(values: dict[tuple[int, int], float]) -> torch.Tensor:
    logits = torch.full((1, 1, 8, 8), -10.0)  # sigmoid(-10) = 4.5e-5: below any threshold
    for (row, col), value in values.items():
        logits[0, 0, row, col] = value
    return logits


def test_predict_suppresses_overlapping_boxes_and_pads_to_k():
    # ltrb = 3 strides: 48 x 48 boxes. Locations (3, 3) and (3, 4) are 8 pixels apart: IoU
    # 40 * 48 / (2 * 48 * 48 - 40 * 48) = 0.714 > 0.6, so the weaker one goes. Location (0, 7)
    # has box (36, -20, 84, 28), clipped to the 64 x 64 image: (36, 0, 64, 28); it overlaps the
    # box (4, 4, 52, 52) of (3, 3) by 16 x 24: IoU 384 / (2304 + 784 - 384) = 0.14: kept.
    head = _scored_head(ltrb=3.0)
    outputs = head([_logit_map({(3, 3): 3.0, (3, 4): 2.0, (0, 7): 1.0})])
    boxes, scores, locations = head.predict(
        outputs, [8], torch.tensor([[64, 64]]), _inference(max_detections=5, pre_nms_top_k=20)
    )
    sigmoid = torch.sigmoid(torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(scores, torch.cat([sigmoid, torch.zeros(3)])[None])
    assert locations.tolist() == [[3 * 8 + 3, 7, 0, 0, 0]]
    expected_boxes = torch.zeros(1, 5, 4)
    expected_boxes[0, 0] = torch.tensor([4.0, 4.0, 52.0, 52.0])
    expected_boxes[0, 1] = torch.tensor([36.0, 0.0, 64.0, 28.0])
    torch.testing.assert_close(boxes, expected_boxes)


def test_predict_detects_nothing_in_an_images_padding_and_clips_boxes_to_the_image():
    """A 40 x 48 image (height x width) padded to 64 x 64. Location (3, 3), centre (28, 28), is
    in the image: its box (4, 4, 52, 52) is clipped to (4, 4, 48, 40). Locations (0, 7) (centre
    x 60) and (6, 1) (centre y 52) are in the padding: they score 0 however sure the head is."""
    head = _scored_head(ltrb=3.0)
    outputs = head([_logit_map({(3, 3): 1.0, (0, 7): 3.0, (6, 1): 2.0})])
    boxes, scores, locations = head.predict(
        outputs, [8], torch.tensor([[40, 48]]), _inference(max_detections=3, nms_thresh=1.0)
    )
    torch.testing.assert_close(scores, torch.tensor([[torch.sigmoid(torch.tensor(1.0)), 0, 0]]))
    assert locations[0, 0] == 3 * 8 + 3
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4.0, 4.0, 48.0, 40.0]))


def test_predict_without_suppression_keeps_the_neighbour():
    head = _scored_head(ltrb=3.0)
    outputs = head([_logit_map({(3, 3): 3.0, (3, 4): 2.0, (0, 7): 1.0})])
    _, scores, locations = head.predict(
        outputs, [8], torch.tensor([[64, 64]]), _inference(max_detections=3, nms_thresh=1.0)
    )
    assert locations.tolist() == [[27, 28, 7]]
    assert (scores[0, :-1] >= scores[0, 1:]).all()


def _quality_head(ltrb: float = 1.0, num_levels: int = 1) -> FCOSHead:
    """No towers, two input channels: the person logit is channel 0, the quality logit channel
    1, at the same location; boxes are ltrb strides wide on every side."""
    config = dict(in_channels=2, num_convs=0, num_levels=num_levels, quality="iou")
    head = FCOSHead(FCOSHeadConfig(**config, assigner={"name": "lla"}))
    with torch.no_grad():
        for conv, channel in ((head.cls_logits, 0), (head.quality, 1)):
            conv.weight.zero_()
            conv.weight[0, channel, 1, 1] = 1.0
            conv.bias.zero_()
        head.bbox_pred.weight.zero_()
        head.bbox_pred.bias.fill_(ltrb)
    return head


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _maps(*cells: tuple[int, int, float, float], size=(4, 4)) -> torch.Tensor:
    """(1, 2, h, w) person and quality logits: everywhere p = 0.001, q = 0.5; at (row, col) the
    given probabilities p and q."""
    maps = torch.zeros(1, 2, *size)
    maps[0, 0] = _logit(0.001)
    for row, col, p, q in cells:
        maps[0, :, row, col] = torch.tensor([_logit(p), _logit(q)])
    return maps


def test_the_threshold_applies_to_the_person_probability_not_to_the_score():
    # p = 0.5, q = 0.01: the score 0.005 is below 0.05 but the person probability is above it,
    # so it is detected (both released codes); p = 0.04 with q = 1 scores 0.04 and is not.
    head = _quality_head()
    outputs = head([_maps((0, 0, 0.5, 0.01), (3, 3, 0.04, 0.999))])
    _, scores, locations = head.predict(
        outputs, [8], torch.tensor([[32, 32]]), _inference(score_thresh=0.05, nms_thresh=1.0)
    )
    assert locations[0, 0] == 0 and scores[0, 0].item() == pytest.approx(0.005, rel=1e-4)
    assert (scores[0, 1:] == 0).all()


@pytest.mark.parametrize(("combine", "expected"), [("product", 0.72), ("sqrt_product", 0.8485)])
def test_detection_score_combines_person_and_quality_probabilities(combine, expected):
    head = _quality_head()
    outputs = head([_maps((1, 2, 0.9, 0.8))])
    _, scores, _ = head.predict(
        outputs, [8], torch.tensor([[32, 32]]), _inference(score=combine, nms_thresh=1.0)
    )
    assert scores[0, 0].item() == pytest.approx(expected, rel=1e-4)


def test_rank_by_picks_which_locations_reach_nms():
    # One candidate per level (pre_nms_top_k 1): A has p 0.9 and q 0.1 (score 0.09), B p 0.6
    # and q 0.9 (score 0.54). By person probability A goes on; by score B does.
    head = _quality_head()
    outputs = head([_maps((0, 0, 0.9, 0.1), (3, 3, 0.6, 0.9))])
    for rank_by, location in (("class", 0), ("score", 15)):
        config = _inference(rank_by=rank_by, pre_nms_top_k=1, max_detections=1)
        _, _, locations = head.predict(outputs, [8], torch.tensor([[32, 32]]), config)
        assert locations.tolist() == [[location]], rank_by


def test_pre_nms_top_k_is_taken_per_level():
    # 64 x 64 image, levels of stride 8 (8 x 8) and 16 (4 x 4), boxes 3 strides on each side.
    # Level 0's two candidates (0, 0) and (0, 1) overlap (IoU 0.78), so NMS keeps only the
    # first; level 1's (3, 3), far away and weaker, reaches NMS because every level sends its
    # own 2 best: the second detection. (The 2 best of the whole image would both be level 0's.)
    head = _quality_head(ltrb=3.0, num_levels=2)
    level0 = _maps((0, 0, 0.9, 0.5), (0, 1, 0.8, 0.5), size=(8, 8))
    level1 = _maps((3, 3, 0.3, 0.5), size=(4, 4))
    config = _inference(pre_nms_top_k=2, max_detections=2, nms_thresh=0.6)
    _, scores, locations = head.predict(
        head([level0, level1]), [8, 16], torch.tensor([[64, 64]]), config
    )
    assert locations.tolist() == [[0, 64 + 15]]
    torch.testing.assert_close(scores, torch.tensor([[0.45, 0.15]]))


def test_predict_is_fixed_size_when_there_are_fewer_locations_than_k():
    head = _small_head(num_levels=1, assigner={"name": "lla"})
    outputs = head([torch.randn(2, 16, 2, 2)])
    boxes, scores, locations = head.predict(
        outputs,
        [8],
        torch.tensor([[16, 16], [16, 16]]),
        _inference(max_detections=10, score_thresh=0.0, pre_nms_top_k=10),
    )
    assert boxes.shape == (2, 10, 4) and scores.shape == (2, 10) and locations.shape == (2, 10)
    assert ((scores > 0).sum(dim=1) <= 4).all()
    assert ((boxes >= 0) & (boxes <= 16)).all()
    assert (locations < 4).all()


def test_predict_exports_with_dynamic_batch_and_size():
    head = _small_head(num_levels=1, assigner={"name": "lla"}).eval()

    class Predictor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, features, image_sizes):
            return self.head.predict(
                self.head([features]),
                [8],
                image_sizes,
                _inference(max_detections=6, score_thresh=0.0, pre_nms_top_k=30),
            )

    batch = Dim("batch", min=1, max=8)
    dims = {0: batch, 2: Dim("h", min=2, max=256), 3: Dim("w", min=2, max=256)}
    program = torch.export.export(
        Predictor(),
        (torch.randn(2, 16, 6, 5), torch.tensor([[48.0, 40.0], [30.0, 20.0]])),
        dynamic_shapes=(dims, {0: batch}),
    )
    features, image_sizes = torch.randn(3, 16, 4, 7), torch.tensor([[32.0, 56.0], [20, 50], [9, 9]])
    exported_outputs = program.module()(features, image_sizes)
    for exported, eager in zip(exported_outputs, Predictor()(features, image_sizes), strict=True):
        assert exported.shape == eager.shape
        torch.testing.assert_close(exported, eager)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="size_ranges"):
        FCOSHeadConfig(num_levels=1)  # FCOS's 4 size boundaries need 5 levels
    with pytest.raises(ValueError, match="gn_groups"):
        FCOSHeadConfig(feat_channels=48, gn_groups=32)
    with pytest.raises(ValueError, match="pre_nms_top_k"):
        FCOSInferenceConfig(max_detections=100, pre_nms_top_k=50)
