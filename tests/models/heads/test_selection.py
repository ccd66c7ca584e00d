"""Fixed-size selection: NMS per image, the best survivors, empty slots, small inputs."""

import torch

from models.heads.selection import at_least, nms_top_k

# Image 0: boxes 0 and 1 overlap with IoU 0.81 (box 1 is box 0 shifted by 1 of its 10 pixels);
# box 2 is apart; box 3 is an empty candidate (score 0).
BOXES = torch.tensor(
    [
        [[0.0, 0.0, 10.0, 10.0], [0.0, 1.0, 10.0, 11.0], [20.0, 20.0, 30.0, 30.0], [0, 0, 5, 5]],
    ]
)
SCORES = torch.tensor([[0.6, 0.9, 0.3, 0.0]])


def test_nms_keeps_the_better_of_two_overlapping_boxes_and_pads_with_empty_slots():
    """IoU(box 0, box 1) = 90 / 110 = 0.82 > 0.5: box 0 (0.6) goes, box 1 (0.9) stays."""
    selected = nms_top_k(BOXES, SCORES, iou_threshold=0.5, k=3)
    torch.testing.assert_close(selected.scores, torch.tensor([[0.9, 0.3, 0.0]]))
    assert selected.indices.tolist() == [[1, 2, 0]]
    assert selected.boxes[0, 0].tolist() == BOXES[0, 1].tolist()
    assert selected.boxes[0, 2].tolist() == [0, 0, 0, 0]


def test_a_looser_threshold_keeps_both():
    selected = nms_top_k(BOXES, SCORES, iou_threshold=0.9, k=3)
    assert selected.indices.tolist() == [[1, 0, 2]]


def test_images_do_not_suppress_each_other():
    """The same two overlapping boxes in two images: each image keeps its better one."""
    boxes = BOXES[:, :2].expand(2, -1, -1)
    scores = torch.tensor([[0.6, 0.9], [0.8, 0.7]])
    selected = nms_top_k(boxes, scores, iou_threshold=0.5, k=2)
    assert selected.indices.tolist() == [[1, 0], [0, 0]]
    torch.testing.assert_close(selected.scores, torch.tensor([[0.9, 0.0], [0.8, 0.0]]))


def test_only_the_pre_nms_best_enter_nms():
    """With pre_nms_top_k 1, only box 1 is a candidate: box 2 is not selected."""
    selected = nms_top_k(BOXES, SCORES, iou_threshold=0.5, k=1, pre_nms_top_k=1)
    assert selected.indices.tolist() == [[1]]


def test_more_slots_than_candidates():
    selected = nms_top_k(BOXES, SCORES, iou_threshold=0.5, k=10)
    assert selected.scores.shape == (1, 10) and (selected.scores > 0).sum() == 2


def test_small_boxes_are_recognised():
    boxes = torch.tensor([[0.0, 0.0, 0.005, 10.0], [0.0, 0.0, 1.0, 1.0]])
    assert at_least(boxes, 0.01).tolist() == [False, True]
