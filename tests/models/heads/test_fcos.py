"""The FCOS head: outputs per level, location order, decoding, losses by hand, fixed-size inference.

Most hand-computed cases use a head without tower convs (num_convs=0) so that its outputs are
plain functions of the input: zero features give exactly the conv biases at every location.
"""

import math

import pytest
import torch
from torch.export import Dim

from models.heads import (
    FCOSHead,
    FCOSHeadConfig,
    FCOSInferenceConfig,
    anchor_points,
    centerness_targets,
    flatten_levels,
)

FCOS_STRIDES = [8, 16, 32, 64, 128]


def _small_head(**options) -> FCOSHead:
    settings = dict(in_channels=16, feat_channels=16, num_convs=2, gn_groups=8)
    return FCOSHead(FCOSHeadConfig(**(settings | options)))


def _pyramid(batch: int = 2, height: int = 64, width: int = 80, channels: int = 16):
    return [torch.randn(batch, channels, -(-height // s), -(-width // s)) for s in FCOS_STRIDES]


def _bare_head(quality: str = "iou", assigner=None, ltrb: float = 1.0) -> FCOSHead:
    """One level, no towers, constant outputs on zero input: person logit = the prior bias,
    ltrb = `ltrb` strides (bias of bbox_pred), quality logit 0."""
    config = dict(in_channels=1, num_convs=0, num_levels=1, quality=quality)
    config["assigner"] = assigner or {"name": "center_sampling"}
    head = FCOSHead(FCOSHeadConfig(**config))
    torch.nn.init.constant_(head.bbox_pred.bias, ltrb)
    return head


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


def test_losses_reach_every_learnable_parameter():
    head = _small_head(quality="centerness")
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
        outputs, [8], torch.tensor([[64, 64]]), max_detections=5, nms_thresh=0.6, pre_nms_top_k=20
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
        outputs, [8], torch.tensor([[40, 48]]), max_detections=3, nms_thresh=1.0
    )
    torch.testing.assert_close(scores, torch.tensor([[torch.sigmoid(torch.tensor(1.0)), 0, 0]]))
    assert locations[0, 0] == 3 * 8 + 3
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4.0, 4.0, 48.0, 40.0]))


def test_predict_without_suppression_keeps_the_neighbour():
    head = _scored_head(ltrb=3.0)
    outputs = head([_logit_map({(3, 3): 3.0, (3, 4): 2.0, (0, 7): 1.0})])
    _, scores, locations = head.predict(
        outputs, [8], torch.tensor([[64, 64]]), max_detections=3, nms_thresh=1.0
    )
    assert locations.tolist() == [[27, 28, 7]]
    assert (scores[0, :-1] >= scores[0, 1:]).all()


def test_predict_is_fixed_size_when_there_are_fewer_locations_than_k():
    head = _small_head(num_levels=1, assigner={"name": "lla"})
    outputs = head([torch.randn(2, 16, 2, 2)])
    boxes, scores, locations = head.predict(
        outputs,
        [8],
        torch.tensor([[16, 16], [16, 16]]),
        max_detections=10,
        score_thresh=0.0,
        pre_nms_top_k=10,
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
                max_detections=6,
                score_thresh=0.0,
                pre_nms_top_k=30,
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
    with pytest.raises(ValueError, match="pre_nms_top_k"):
        _small_head().predict(
            None, FCOS_STRIDES, torch.tensor([[8, 8]]), max_detections=9, pre_nms_top_k=8
        )
