"""Box overlaps in numpy (continuous coordinates, no "+1" pixel convention)."""

import numpy as np
import pytest

from common.boxes import ioa_matrix, iou_matrix, max_iou_pick, paired_iou


def test_iou_of_hand_computed_pairs():
    # A 10x10 box against itself (1), shifted by 5 (50 / 150), and far away (0).
    box = np.array([[0, 0, 10, 10]])
    others = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou_matrix(box, others), [[1.0, 1 / 3, 0.0]])
    np.testing.assert_allclose(paired_iou(np.repeat(box, 3, axis=0), others), [1.0, 1 / 3, 0.0])


def test_ioa_is_the_share_of_the_first_box_inside_the_second():
    # A 10x10 detection half inside a large region: 0.5 (its IoU would be far smaller).
    detection = np.array([[0, 0, 10, 10]])
    region = np.array([[5, -100, 200, 100]])
    np.testing.assert_allclose(ioa_matrix(detection, region), [[0.5]])


def test_degenerate_boxes_overlap_nothing_instead_of_dividing_by_zero():
    point = np.array([[5, 5, 5, 5]])
    np.testing.assert_array_equal(iou_matrix(point, point), [[0.0]])
    np.testing.assert_array_equal(ioa_matrix(point, np.array([[0, 0, 10, 10]])), [[0.0]])
    assert iou_matrix(np.zeros((0, 4)), point).shape == (0, 1)


def test_the_max_iou_pick_is_the_box_overlapping_the_query_most():
    query = np.array([0, 0, 10, 10])
    boxes = np.array([[20, 20, 30, 30], [5, 0, 15, 10], [1, 0, 11, 10]])
    # IoU 0, 50 / 150 and 90 / 110.
    index, iou = max_iou_pick(boxes, query)
    assert (index, iou) == (2, 90 / 110)


def test_the_max_iou_pick_is_the_first_box_when_nothing_overlaps():
    assert max_iou_pick(np.array([[20, 20, 30, 30], [40, 40, 50, 50]]), (0, 0, 10, 10)) == (0, 0.0)


def test_there_is_no_pick_without_boxes():
    with pytest.raises(ValueError, match="no boxes"):
        max_iou_pick(np.zeros((0, 4)), (0, 0, 10, 10))
