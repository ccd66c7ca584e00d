"""The res5 RoI head: RoIAlign of each RoI on its own image, the module before res5, global
pooling; the Fast R-CNN predictor and its losses."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.roi_head import (
    FastRCNNPredictor,
    Res5RoIHead,
    RoIPoolConfig,
    fast_rcnn_losses,
    rois_of,
)
from models.ops.roi_align import roi_align


class Doubling(nn.Module):
    def forward(self, x):
        return 2 * x


def _head(pooling="max", before_res5=None) -> Res5RoIHead:
    config = RoIPoolConfig(output_size=(4, 2), sampling_ratio=2, pooling=pooling)
    res5 = nn.Conv2d(3, 5, 3, stride=2, padding=1)  # stands in for res5: halves the bins
    return Res5RoIHead(res5, config, stride=8, before_res5=before_res5)


def test_each_roi_is_pooled_from_its_own_image_then_through_res5():
    torch.manual_seed(0)
    head = _head()
    features = torch.randn(2, 3, 10, 12)
    rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 72.0], [1.0, 8.0, 8.0, 40.0, 72.0]])
    pooled = head(features, rois)
    maps = roi_align(features, rois, (4, 2), 1 / 8, 2, aligned=False)  # (2, 3, 4, 2)
    torch.testing.assert_close(pooled.before_res5, maps.amax(dim=(2, 3)))
    torch.testing.assert_close(pooled.res5, head.res5(maps).amax(dim=(2, 3)))
    assert not torch.allclose(pooled.res5[0], pooled.res5[1])  # two images, two answers


def test_the_module_before_res5_feeds_both_pooled_features():
    torch.manual_seed(0)
    plain, doubled = _head(), _head(before_res5=Doubling())
    doubled.res5.load_state_dict(plain.res5.state_dict())
    features = torch.randn(1, 3, 10, 12)
    rois = torch.tensor([[0.0, 0.0, 0.0, 30.0, 60.0]])
    a, b = plain(features, rois), doubled(features, rois)
    torch.testing.assert_close(b.before_res5, 2 * a.before_res5)
    maps = 2 * roi_align(features, rois, (4, 2), 1 / 8, 2, aligned=False)
    torch.testing.assert_close(b.res5, doubled.res5(maps).amax(dim=(2, 3)))


def test_average_pooling_is_an_option():
    torch.manual_seed(0)
    head = _head(pooling="avg")
    features = torch.randn(1, 3, 10, 12)
    rois = torch.tensor([[0.0, 0.0, 0.0, 30.0, 60.0]])
    maps = roi_align(features, rois, (4, 2), 1 / 8, 2, aligned=False)
    torch.testing.assert_close(head(features, rois).before_res5, maps.mean(dim=(2, 3)))


def test_fixed_size_boxes_become_rois_image_by_image():
    boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    rois = rois_of(boxes)
    assert rois.shape == (6, 5)
    assert rois[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert rois[4, 1:].tolist() == boxes[1, 1].tolist()


def test_the_predictor_scores_persons_with_a_two_class_softmax():
    predictor = FastRCNNPredictor(6)
    logits, deltas = predictor(torch.randn(5, 6))
    assert logits.shape == (5, 2) and deltas.shape == (5, 4)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # person 3 times as likely: p = 0.75
    torch.testing.assert_close(FastRCNNPredictor.person_scores(logits), torch.tensor([0.75]))


def test_fast_rcnn_losses_on_a_hand_worked_case():
    """Three RoIs, one positive. Classification: mean cross-entropy. Box: the positive's dx is
    off by 2 (> beta 1: |x| - beta / 2 = 1.5), its other deltas exact; summed, divided by the 3
    RoIs: 0.5."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 0])
    deltas = torch.tensor([[9.0, 9, 9, 9], [2.0, 0, 0, 0], [9.0, 9, 9, 9]])
    targets = torch.zeros(1, 4)
    classification, box = fast_rcnn_losses(logits, deltas, labels, targets, smooth_l1_beta=1.0)
    torch.testing.assert_close(classification, F.cross_entropy(logits, labels))
    torch.testing.assert_close(box, torch.tensor(1.5 / 3))
