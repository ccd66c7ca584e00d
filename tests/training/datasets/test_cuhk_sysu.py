"""CUHK-SYSU loader on a tiny dataset hand-built in the distributed file layout.

The .mat files are written here with ``scipy.io.savemat`` directly (not with our writers), in the
nesting the public loaders (OIM's psdb.py, SeqNet) index: ``Img`` a 1 x N struct whose ``box`` is
a 1 x n struct of (idlocate, ishard); ``pool`` a cell column of names; ``Train`` a cell column of
1 x 1 structs (idname, nAppear, scene); ``TestG{N}`` a 1 x Q struct of (Query, Gallery).

The scenes (boxes are x y w h as in the files):

    Images.mat order: s1, t1, s2, t2, s3, t3, t4, t5      pool order: t3, t1, t2, t4, t5
    s1: [10 20 30 60] p00001, [50 20 0 40] degenerate, [100 10 20 50] unlabeled
    s2: [5 5 20 40] p00001, [60 5 20 40] (Train.mat says [61 5 20 40] for p00007: no match)
    s3: [7 7 25 50] p00007, [40 10 25 -3] degenerate
    t1: [10 10 20 40] query of p00100, [50 10 20 40] unlabeled
    t2: [12 12 20 40] p00100 in the gallery, [70 10 20 40] query of p00200
    t3: [15 15 20 40] p00200 in the gallery
    t4: [5 5 10 30], t5: [1 1 10 30], unlabeled (t5 is listed with a box after an empty one)
"""

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from training.datasets import DatasetError, load_cuhk_sysu, load_dataset

IMAGES = {
    "s1": [[10, 20, 30, 60], [50, 20, 0, 40], [100, 10, 20, 50]],
    "t1": [[10, 10, 20, 40], [50, 10, 20, 40]],
    "s2": [[5, 5, 20, 40], [60, 5, 20, 40]],
    "t2": [[12, 12, 20, 40], [70, 10, 20, 40]],
    "s3": [[7, 7, 25, 50], [40, 10, 25, -3]],
    "t3": [[15, 15, 20, 40]],
    "t4": [[5, 5, 10, 30]],
    "t5": [[1, 1, 10, 30]],
}
POOL = ["t3", "t1", "t2", "t4", "t5"]
TRAIN = {
    "p00001": [("s1", [10, 20, 30, 60]), ("s2", [5, 5, 20, 40])],
    "p00007": [("s2", [61, 5, 20, 40]), ("s3", [7, 7, 25, 50])],
}
EMPTY = None
# (idname, query image, query box, gallery [(image, box or EMPTY)])
TEST_G50 = [
    (
        "p00100",
        "t1",
        [10, 10, 20, 40],
        [("t2", [12, 12, 20, 40]), ("t4", EMPTY), ("t5", [1, 1, 10, 30])],
    ),
    ("p00200", "t2", [70, 10, 20, 40], [("t3", [15, 15, 20, 40]), ("t1", EMPTY), ("t4", EMPTY)]),
]
TEST_G100 = [
    (
        "p00100",
        "t1",
        [10, 10, 20, 40],
        [("t2", [12, 12, 20, 40]), ("t3", EMPTY), ("t4", EMPTY), ("t5", EMPTY)],
    ),
    (
        "p00200",
        "t2",
        [70, 10, 20, 40],
        [("t3", [15, 15, 20, 40]), ("t1", EMPTY), ("t4", EMPTY), ("t5", EMPTY)],
    ),
]


def struct(rows: list[dict]) -> np.ndarray:
    """A 1 x n MATLAB struct array."""
    array = np.empty((1, len(rows)), dtype=[(name, object) for name in rows[0]])
    for i, row in enumerate(rows):
        array[0, i] = tuple(row.values())
    return array


def cell(values: list) -> np.ndarray:
    """A MATLAB cell column."""
    array = np.empty((len(values), 1), dtype=object)
    for i, value in enumerate(values):
        array[i, 0] = value
    return array


def double(values) -> np.ndarray:
    return np.array(values, dtype=np.float64).reshape(1, -1)


# The distributed TestG files hold an empty gallery box as a 1 x 0 double. psearch's writer
# stored 0 x 0 before it was fixed; the loader reads both.
DISTRIBUTED_EMPTY = (1, 0)


def sighting(image: str, box, empty=DISTRIBUTED_EMPTY) -> dict:
    idlocate = np.zeros(empty) if box is EMPTY else double(box)
    return {"imname": f"{image}.jpg", "idlocate": idlocate, "ishard": double(0)}


def protocol(entries, empty=DISTRIBUTED_EMPTY) -> np.ndarray:
    return struct(
        [
            {
                "Query": struct([{**sighting(image, box), "idname": idname}]),
                "Gallery": struct([sighting(g, box, empty) for g, box in gallery]),
            }
            for idname, image, box, gallery in entries
        ]
    )


def write_raw_cuhk(root: Path) -> Path:
    (root / "Image" / "SSM").mkdir(parents=True)
    for name in IMAGES:
        (root / "Image" / "SSM" / f"{name}.jpg").touch()  # never decoded by the loader
    annotation = root / "annotation"
    protocols = annotation / "test" / "train_test"
    protocols.mkdir(parents=True)
    img = struct(
        [
            {
                "imname": f"{name}.jpg",
                "nAppear": double(len(boxes)),
                "box": struct([{"idlocate": double(b), "ishard": double(0)} for b in boxes]),
            }
            for name, boxes in IMAGES.items()
        ]
    )
    scipy.io.savemat(annotation / "Images.mat", {"Img": img})
    scipy.io.savemat(annotation / "pool.mat", {"pool": cell([f"{name}.jpg" for name in POOL])})
    train = cell(
        [
            struct(
                [
                    {
                        "idname": idname,
                        "nAppear": double(len(scenes)),
                        "scene": struct([sighting(image, box) for image, box in scenes]),
                    }
                ]
            )
            for idname, scenes in TRAIN.items()
        ]
    )
    scipy.io.savemat(protocols / "Train.mat", {"Train": train})
    scipy.io.savemat(protocols / "TestG50.mat", {"TestG50": protocol(TEST_G50)})
    scipy.io.savemat(protocols / "TestG100.mat", {"TestG100": protocol(TEST_G100)})
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_raw_cuhk(tmp_path / "cuhk")


def gallery_of(query) -> list[tuple[str, list[float] | None]]:
    return [(g.image, None if g.target is None else g.target.tolist()) for g in query.gallery]


def test_hand_built_files_have_the_nesting_the_public_loaders_index(root: Path) -> None:
    annotation = root / "annotation"
    img = scipy.io.loadmat(annotation / "Images.mat")["Img"]
    assert img["imname"][0][2][0] == "s2.jpg"  # NAE: Img['imname'][0][i][0]
    _, _, boxes = img.squeeze()[0]  # OIM: for im_name, __, boxes in Img.squeeze()
    assert [b[0].tolist() for b in boxes[0]][1] == [[50, 20, 0, 40]]
    train = scipy.io.loadmat(annotation / "test/train_test/Train.mat")["Train"].squeeze()
    assert str(train[1][0, 0][2].squeeze()[1][0][0]) == "s3.jpg"  # item[0, 0][2]: scene
    protoc = scipy.io.loadmat(annotation / "test/train_test/TestG50.mat")["TestG50"].squeeze()
    assert str(protoc["Query"][1]["imname"][0, 0][0]) == "t2.jpg"
    empty_box = protoc["Gallery"][0].squeeze()[1][1]  # the empty box of t4
    assert empty_box[0].shape == (0,)  # OIM, SeqNet: gt = item[1][0]; count_gt += gt.size > 0


def test_training_split_is_every_image_outside_the_pool_in_images_mat_order(root: Path) -> None:
    split = load_cuhk_sysu(root, "train")
    assert [image.name for image in split.images] == ["s1", "s2", "s3"]
    assert split.images[0].path == root / "Image" / "SSM" / "s1.jpg"
    assert split.queries == []


def test_boxes_become_x1y1x2y2_and_degenerate_boxes_are_dropped(root: Path) -> None:
    s1, _, s3 = load_cuhk_sysu(root, "train").images
    # [10 20 30 60] -> [10 20 40 80]; [50 20 0 40] (w = 0) is dropped;
    # [100 10 20 50] -> [100 10 120 60]
    assert s1.boxes.tolist() == [[10, 20, 40, 80], [100, 10, 120, 60]]
    assert s1.boxes.dtype == np.float32
    assert s3.boxes.tolist() == [[7, 7, 32, 57]]  # [40 10 25 -3] (h < 0) dropped


def test_a_training_box_has_an_identity_only_if_train_mat_lists_exactly_that_box(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s1, s2, s3 = load_cuhk_sysu(root, "train").images
    # p00001 -> 0 and p00007 -> 1, in Train.mat order. Train.mat places p00007 at [61 5 20 40]
    # in s2, one pixel off the annotated [60 5 20 40], so that box stays unlabeled.
    assert s1.pids.tolist() == [0, -1]
    assert s2.pids.tolist() == [0, -1]
    assert s3.pids.tolist() == [1]
    assert s1.pids.dtype == np.int64
    assert "1 identity boxes equal no valid box" in caplog.text


def test_test_boxes_are_labeled_from_testg50_queries_and_positives_only(root: Path) -> None:
    split = load_cuhk_sysu(root, "test")
    assert [image.name for image in split.images] == POOL
    pids = {image.name: image.pids.tolist() for image in split.images}
    # p00100 -> 0 (query box in t1, positive in t2); p00200 -> 1 (query in t2, positive in t3).
    # t5's box follows an empty gallery box, so it is not a positive and labels nothing.
    assert pids == {"t1": [0, -1], "t2": [0, 1], "t3": [1], "t4": [-1], "t5": [-1]}
    assert split.num_identities == 2


def test_queries_come_from_the_requested_testg_file_with_positives_first(root: Path) -> None:
    first, second = load_cuhk_sysu(root, "test", gallery_size=100).queries
    assert (first.pid, first.image, first.box.tolist()) == (0, "t1", [10, 10, 30, 50])
    assert first.camera == -1
    assert gallery_of(first) == [("t2", [12, 12, 32, 52]), ("t3", None), ("t4", None), ("t5", None)]
    assert (second.pid, second.image) == (1, "t2")
    assert gallery_of(second)[0] == ("t3", [15, 15, 35, 55])


def test_the_first_empty_gallery_box_ends_the_positives(root: Path) -> None:
    first, _ = load_cuhk_sysu(root, "test", gallery_size=50).queries
    # TestG50 lists t2 (box), t4 (empty), t5 (box): t5 comes after the empty box, a negative.
    assert gallery_of(first) == [("t2", [12, 12, 32, 52]), ("t4", None), ("t5", None)]


def test_an_empty_gallery_box_stored_as_0x0_reads_like_the_distributed_1x0(root: Path) -> None:
    # Files written by psearch's synthetic writer before it matched the distributed 1 x 0.
    sizes = {50: TEST_G50, 100: TEST_G100}
    expected = {n: [gallery_of(q) for q in load_cuhk_sysu(root, "test", n).queries] for n in sizes}
    for size, entries in sizes.items():
        path = root / f"annotation/test/train_test/TestG{size}.mat"
        scipy.io.savemat(path, {f"TestG{size}": protocol(entries, empty=(0, 0))})
        galleries = [gallery_of(query) for query in load_cuhk_sysu(root, "test", size).queries]
        assert galleries == expected[size]


def test_full_gallery_appends_every_other_pool_image_once_and_never_the_query_image(
    root: Path,
) -> None:
    first, second = load_cuhk_sysu(root, "test", gallery_size=-1).queries
    # Query 1 (in t1): TestG50 lists t2+, t4, t5; the pool (t3 t1 t2 t4 t5) adds only t3.
    assert gallery_of(first) == [("t2", [12, 12, 32, 52]), ("t4", None), ("t5", None), ("t3", None)]
    # Query 2 (in t2): TestG50 lists t3+, t1, t4; the pool adds t5 (t2 is the query's own).
    assert gallery_of(second) == [
        ("t3", [15, 15, 35, 55]),
        ("t1", None),
        ("t4", None),
        ("t5", None),
    ]
    for query in (first, second):
        names = [item.image for item in query.gallery]
        assert len(names) == len(set(names)) == len(POOL) - 1
        assert query.image not in names


def test_load_dataset_passes_the_gallery_size_on(root: Path) -> None:
    split = load_dataset("cuhk_sysu", root, "test", gallery_size=50)
    assert split.dataset == "cuhk_sysu"
    assert len(split.queries[0].gallery) == 3


def test_a_box_claimed_by_two_identities_is_an_error(tmp_path: Path) -> None:
    root = write_raw_cuhk(tmp_path / "cuhk")
    TRAIN_CONFLICT = {**TRAIN, "p00009": [("s3", [7, 7, 25, 50])]}
    train = cell(
        [
            struct(
                [{"idname": n, "nAppear": double(1), "scene": struct([sighting(*s) for s in v])}]
            )
            for n, v in TRAIN_CONFLICT.items()
        ]
    )
    scipy.io.savemat(root / "annotation/test/train_test/Train.mat", {"Train": train})
    with pytest.raises(DatasetError, match="two identities, p00009 and p00007"):
        load_cuhk_sysu(root, "train")


def test_a_gallery_image_outside_the_test_pool_is_an_error(root: Path) -> None:
    entries = [TEST_G100[0], (*TEST_G100[1][:3], [("t3", [15, 15, 20, 40]), ("s1", EMPTY)])]
    path = root / "annotation/test/train_test/TestG100.mat"
    scipy.io.savemat(path, {"TestG100": protocol(entries)})
    with pytest.raises(DatasetError, match=r"p00200 \(in t2.jpg\) refers to images outside"):
        load_cuhk_sysu(root, "test", gallery_size=100)


def test_a_wrong_root_names_the_missing_file_and_the_expected_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder; expected the CUHK-SYSU folder"):
        load_cuhk_sysu(tmp_path / "nowhere", "train")
    (tmp_path / "prw").mkdir()
    message = "no annotation/Images.mat; is the root the CUHK-SYSU folder .it contains Image/"
    with pytest.raises(DatasetError, match=message):
        load_cuhk_sysu(tmp_path / "prw", "train")


def test_a_missing_protocol_file_lists_the_distributed_gallery_sizes(root: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"no annotation/test/train_test/TestG500.mat; .* 50, 100"
    ):
        load_cuhk_sysu(root, "test", gallery_size=500)
    with pytest.raises(ValueError, match="gallery_size must be positive or -1"):
        load_cuhk_sysu(root, "test", gallery_size=0)


def test_a_missing_variable_is_named(root: Path) -> None:
    scipy.io.savemat(root / "annotation" / "pool.mat", {"test_pool": cell(["t1.jpg"])})
    with pytest.raises(
        DatasetError, match=r"pool.mat: no variable pool \(it holds \['test_pool'\]\)"
    ):
        load_cuhk_sysu(root, "test")


def test_a_missing_image_is_reported_with_its_name(root: Path) -> None:
    (root / "Image" / "SSM" / "t4.jpg").unlink()
    with pytest.raises(
        DatasetError,
        match=r"1 of the 5 images listed in annotation/Images.mat are missing, e.g. t4.jpg",
    ):
        load_cuhk_sysu(root, "test")


def test_an_unknown_split_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_cuhk_sysu(root, "val")
