"""PRW loader on a tiny dataset hand-built in the distributed file layout.

Files are written here directly (``scipy.io.savemat``, raw bytes), not with our writers:
frame lists are cell columns of names without extension, ID_train a 1 x K double row,
annotations (n, 5) doubles [id x y w h] under one of three variable names, query_info.txt lines
"pid x y w h frame" with CRLF endings.
"""

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from training.datasets import DatasetError, camera_of, load_dataset, load_prw

TRAIN_FRAMES = {
    # frame: (variable, rows [id, x, y, w, h])
    "c1s1_000001": ("box_new", [[1, 10, 20, 30, 60], [-2, -3, 5, 20, 40]]),
    "c1s1_000002": ("anno_file", [[478, 100, 50, 40, 80], [480, 0, 0, 10, 0]]),
    "c3s2_000010": ("anno_previous", [[932, 5, -4, 25, 50]]),
}
ID_TRAIN = [1, 2, 478, 480, 932]  # the real list has the same shape: 1-478, 480-483, 932
TEST_FRAMES = {
    "c2s1_000100": ("box_new", [[5, 0, 290, 80, 340], [933, 300, 10, 20, 50]]),
    "c6s3_000200": ("box_new", [[933, 40, 40, 20, 50], [2, 400, 40, 20, 50], [-2, 7, 7, 9, 9]]),
}
QUERY_INFO = (
    b"5 -1.7030 295.5756 74.6436 338.2289 c2s1_000100\r\n"
    b"933 40.0000 40.0000 20.0000 50.0000 c6s3_000200\r\n"
)


def cell(values: list) -> np.ndarray:
    array = np.empty((len(values), 1), dtype=object)
    for i, value in enumerate(values):
        array[i, 0] = value
    return array


def write_raw_prw(root: Path) -> Path:
    (root / "frames").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name, (variable, rows) in {**TRAIN_FRAMES, **TEST_FRAMES}.items():
        (root / "frames" / f"{name}.jpg").touch()  # never decoded by the loader
        table = np.array(rows, dtype=np.float64)
        scipy.io.savemat(root / "annotations" / f"{name}.jpg.mat", {variable: table})
    scipy.io.savemat(root / "frame_train.mat", {"img_index_train": cell(list(TRAIN_FRAMES))})
    scipy.io.savemat(root / "frame_test.mat", {"img_index_test": cell(list(TEST_FRAMES))})
    scipy.io.savemat(root / "ID_train.mat", {"ID_train": np.array([ID_TRAIN], dtype=np.float64)})
    (root / "query_info.txt").write_bytes(QUERY_INFO)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_raw_prw(tmp_path / "prw")


def test_training_frames_are_read_from_frame_train_in_order(root: Path) -> None:
    split = load_prw(root, "train")
    assert [image.name for image in split.images] == list(TRAIN_FRAMES)
    assert split.images[0].path == root / "frames" / "c1s1_000001.jpg"
    assert split.queries == []


def test_any_of_the_three_annotation_variables_is_read(root: Path) -> None:
    first, second, third = load_prw(root, "train").images
    assert len(first.boxes) == 2  # box_new
    assert second.boxes.tolist() == [[100, 50, 140, 130]]  # anno_file; [0 0 10 0] is degenerate
    assert third.boxes.tolist() == [[5, 0, 30, 46]]  # anno_previous: [5 -4 25 50] -> y1 clipped


def test_box_new_wins_over_the_older_variables(root: Path) -> None:
    table_new = np.array([[1, 1, 1, 5, 5]], dtype=np.float64)
    table_old = np.array([[1, 2, 2, 5, 5], [1, 3, 3, 5, 5]], dtype=np.float64)
    path = root / "annotations" / "c1s1_000001.jpg.mat"
    scipy.io.savemat(
        path, {"anno_previous": table_old, "box_new": table_new, "anno_file": table_old}
    )
    assert load_prw(root, "train").images[0].boxes.tolist() == [[1, 1, 6, 6]]


def test_boxes_are_converted_then_clipped_at_zero(root: Path) -> None:
    first = load_prw(root, "train").images[0]
    # [10 20 30 60] -> [10 20 40 80]; [-3 5 20 40] -> [-3 5 17 45] -> clipped to [0 5 17 45]
    assert first.boxes.tolist() == [[10, 20, 40, 80], [0, 5, 17, 45]]
    assert first.boxes.dtype == np.float32


def test_training_ids_map_to_contiguous_ids_across_the_gaps(root: Path) -> None:
    images = load_prw(root, "train").images
    # ID_train 1, 2, 478, 480, 932 -> 0, 1, 2, 3, 4; -2 (unlabeled) -> -1.
    assert [image.pids.tolist() for image in images] == [[0, -1], [2], [4]]
    assert images[0].pids.dtype == np.int64


def test_the_training_split_counts_every_identity_of_id_train(root: Path) -> None:
    # 932 is the largest raw id; it must land inside 0..K-1 (here K = 5), not outside a table.
    assert load_prw(root, "train").num_identities == 5


def test_cameras_come_from_the_digit_after_c() -> None:
    assert camera_of("c1s1_000151") == 1
    assert camera_of("c6s3_000200") == 6
    with pytest.raises(DatasetError, match="does not start with c<camera>"):
        camera_of("s1.jpg")


def test_test_ids_are_shared_by_annotations_and_queries(root: Path) -> None:
    split = load_prw(root, "test")
    # Raw test ids in use: 2 (a training id also seen in the test frames), 5, 933 -> 0, 1, 2.
    assert [image.pids.tolist() for image in split.images] == [[1, 2], [2, 0, -1]]
    assert [image.camera for image in split.images] == [2, 6]
    assert [(query.pid, query.image, query.camera) for query in split.queries] == [
        (1, "c2s1_000100", 2),
        (2, "c6s3_000200", 6),
    ]


def test_query_boxes_are_converted_and_clipped_and_crlf_is_stripped(root: Path) -> None:
    first, second = load_prw(root, "test").queries
    # -1.7030 295.5756 74.6436 338.2289 -> x2 = 72.9406, y2 = 633.8045, x1 clipped to 0
    np.testing.assert_allclose(first.box, [0, 295.5756, 72.9406, 633.8045], rtol=1e-6)
    assert second.box.tolist() == [40, 40, 60, 90]
    assert second.image == "c6s3_000200"  # no trailing "\r"
    assert first.gallery is None


def test_blank_lines_and_plain_newlines_are_accepted(root: Path) -> None:
    (root / "query_info.txt").write_bytes(
        b"5 0 290 80 340 c2s1_000100\n\n933 40 40 20 50 c6s3_000200"
    )
    assert len(load_prw(root, "test").queries) == 2


def test_load_dataset_finds_prw(root: Path) -> None:
    assert load_dataset("prw", root, "test").dataset == "prw"


def test_a_training_id_missing_from_id_train_is_an_error(root: Path) -> None:
    scipy.io.savemat(root / "ID_train.mat", {"ID_train": np.array([[1, 2, 478, 480]], dtype=float)})
    with pytest.raises(DatasetError, match="c3s2_000010: person id 932 is neither -2"):
        load_prw(root, "train")


def test_a_missing_annotation_file_is_named(root: Path) -> None:
    (root / "annotations" / "c6s3_000200.jpg.mat").unlink()
    with pytest.raises(DatasetError, match=r"no annotations/c6s3_000200.jpg.mat, .*frame_test.mat"):
        load_prw(root, "test")


def test_a_malformed_query_line_is_reported_with_its_number(root: Path) -> None:
    (root / "query_info.txt").write_bytes(QUERY_INFO + b"17 1 2 3 c2s1_000100\r\n")
    with pytest.raises(DatasetError, match=r"query_info.txt:3: expected 'pid x y w h frame'"):
        load_prw(root, "test")


def test_a_query_in_an_unknown_frame_is_an_error(root: Path) -> None:
    (root / "query_info.txt").write_bytes(b"5 0 290 80 340 c1s1_000001\r\n")
    with pytest.raises(DatasetError, match=r"c1s1_000001 is not a frame of frame_test.mat"):
        load_prw(root, "test")


def test_a_wrong_root_names_the_expected_folder(tmp_path: Path) -> None:
    (tmp_path / "cuhk").mkdir()
    with pytest.raises(DatasetError, match=r"no frame_train.mat; is the root the PRW folder"):
        load_prw(tmp_path / "cuhk", "train")
    with pytest.raises(DatasetError, match="no such folder; expected the PRW folder"):
        load_prw(tmp_path / "nowhere", "test")
