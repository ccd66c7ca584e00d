"""Writers -> loaders: what the writers put on disk reads back as the scenes that were written.

The writers exist to produce the real datasets' layouts for synthetic data; these tests hold them
to the loaders (which the hand-built tests hold to the real layouts), and check a few raw details
the loaders do not look at (the public loaders' indexing, raw PRW ids, CRLF line endings).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.datasets import load_crowdhuman, load_cuhk_sysu, load_prw
from training.synthetic.writers import SceneRecord, write_crowdhuman, write_cuhk_sysu, write_prw


def scene(name: str, boxes: list, pids: list, camera: int = -1, ignore_boxes=None) -> SceneRecord:
    """A 48 x 64 scene of one flat colour (so JPEG keeps it), with the given persons."""
    color = np.array([len(name) * 10 % 256, 120, 200], dtype=np.uint8)
    image = np.broadcast_to(color, (48, 64, 3)).copy()
    ignore = np.zeros((0, 4)) if ignore_boxes is None else np.array(ignore_boxes, dtype=float)
    return SceneRecord(
        name, image, np.array(boxes, dtype=float).reshape(-1, 4), np.array(pids), camera, ignore
    )


# ---------------------------------------------------------------------------------------------
# CUHK-SYSU: whole-pixel boxes, as in the real files.

CUHK_TRAIN = [
    scene("s1", [[1, 2, 11, 22], [20, 5, 30, 35]], [0, -1]),
    scene("s2", [[3, 4, 13, 24], [30, 1, 45, 40]], [0, 1]),
    scene("s3", [[5, 5, 15, 25]], [2]),
    scene("s4", [[2, 2, 12, 22]], [-1]),
    scene("s11", [], []),  # nobody: Images.mat stores its box list as []
]
CUHK_TEST = [
    scene("s5", [[5, 5, 15, 25], [30, 3, 40, 33]], [0, 1]),
    scene("s6", [[6, 6, 16, 26]], [0]),
    scene("s7", [[2, 2, 12, 22], [40, 2, 50, 30]], [-1, 2]),
    scene("s8", [[8, 8, 18, 28]], [1]),
    scene("s9", [[9, 9, 19, 29]], [-1]),
    scene("s10", [[1, 1, 21, 41]], [2]),
]
# One query per test identity, in pid order, so the loader's ids (query order) equal the pids.
CUHK_QUERIES = [(0, "s5", np.array([5, 5, 15, 25])), (1, "s8", np.array([8, 8, 18, 28])),
                (2, "s7", np.array([40, 2, 50, 30]))]  # fmt: skip
TEST_NAMES = [s.name for s in CUHK_TEST]


@pytest.fixture(scope="module")
def cuhk_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuhk")
    write_cuhk_sysu(root, CUHK_TRAIN + CUHK_TEST, TEST_NAMES, CUHK_QUERIES, gallery_sizes=(50, 3))
    return root


def assert_same_scenes(loaded, written) -> None:
    assert [image.name for image in loaded] == [s.name for s in written]
    for image, record in zip(loaded, written, strict=True):
        np.testing.assert_array_equal(image.boxes, record.boxes)
        np.testing.assert_array_equal(image.pids, record.pids)


def test_cuhk_files_have_the_nesting_the_public_loaders_index(cuhk_root: Path) -> None:
    annotation = cuhk_root / "annotation"
    img = scipy.io.loadmat(annotation / "Images.mat")["Img"]
    assert img["imname"][0][1][0] == "s2.jpg"  # NAE: Img['imname'][0][i][0]
    _, _, boxes = img.squeeze()[1]  # OIM: for im_name, __, boxes in Img.squeeze()
    assert [b[0].tolist() for b in boxes[0]] == [[[3, 4, 10, 20]], [[30, 1, 15, 39]]]  # x y w h
    pool = scipy.io.loadmat(annotation / "pool.mat")["pool"].squeeze()
    assert [str(a[0]) for a in pool] == [f"{name}.jpg" for name in TEST_NAMES]
    train = scipy.io.loadmat(annotation / "test/train_test/Train.mat")["Train"].squeeze()
    assert [str(item[0, 0][0][0]) for item in train] == ["p00001", "p00002", "p00003"]
    protoc = scipy.io.loadmat(annotation / "test/train_test/TestG50.mat")["TestG50"].squeeze()
    assert str(protoc["Query"][1]["imname"][0, 0][0]) == "s8.jpg"
    assert str(protoc["Query"][1]["idname"][0, 0][0]) == "p00002"


def test_cuhk_empty_gallery_boxes_are_1x0_so_seqnet_evaluation_reads_them(cuhk_root: Path) -> None:
    # The distributed TestG files store a gallery image without the query person as a 1 x 0
    # double; OIM's, SeqNet's and COAT's evaluation read it as ``item[1][0]`` (a (0,) row) and
    # count it by ``gt.size > 0``. A 0 x 0 matrix has no row 0: that indexing raises.
    protocols = cuhk_root / "annotation/test/train_test"
    for size in (50, 3):
        protoc = scipy.io.loadmat(protocols / f"TestG{size}.mat")[f"TestG{size}"].squeeze()
        for items in protoc["Gallery"]:
            items = items.squeeze()
            shapes = [item[1].shape for item in items]
            assert shapes[0] == (1, 4) and shapes[-1] == (1, 0)  # positives first, then negatives
            assert set(shapes) == {(1, 4), (1, 0)}
            count_gt = sum(item[1][0].size > 0 for item in items)  # SeqNet's eval_search_cuhk
            assert count_gt == shapes.count((1, 4))


def test_cuhk_training_split_reads_back(cuhk_root: Path) -> None:
    assert_same_scenes(load_cuhk_sysu(cuhk_root, "train").images, CUHK_TRAIN)


def test_cuhk_test_split_and_queries_read_back(cuhk_root: Path) -> None:
    split = load_cuhk_sysu(cuhk_root, "test", gallery_size=50)
    assert_same_scenes(split.images, CUHK_TEST)
    for query, (pid, name, box) in zip(split.queries, CUHK_QUERIES, strict=True):
        assert (query.pid, query.image, query.box.tolist()) == (pid, name, box.tolist())


def test_cuhk_galleries_list_every_positive_first_then_negatives(cuhk_root: Path) -> None:
    by_name = {s.name: s for s in CUHK_TEST}
    for query in load_cuhk_sysu(cuhk_root, "test", gallery_size=50).queries:
        # 5 other test scenes < 50: each appears once; the positives, with the identity's box,
        # come before every negative.
        names = [item.image for item in query.gallery]
        assert sorted(names) == sorted(set(TEST_NAMES) - {query.image})
        targets = [item.target is not None for item in query.gallery]
        assert targets == sorted(targets, reverse=True)
        for item in query.gallery:
            record = by_name[item.image]
            expected = record.boxes[record.pids == query.pid]
            if item.target is None:
                assert len(expected) == 0
            else:
                np.testing.assert_array_equal(item.target, expected[0])


def test_cuhk_small_galleries_are_sampled_to_their_size(cuhk_root: Path) -> None:
    for query in load_cuhk_sysu(cuhk_root, "test", gallery_size=3).queries:
        names = [item.image for item in query.gallery]
        assert len(names) == len(set(names)) == 3
        assert query.image not in names
        assert query.gallery[0].target is not None  # every query here has a positive


def test_cuhk_full_gallery_is_every_other_test_image_once(cuhk_root: Path) -> None:
    for query in load_cuhk_sysu(cuhk_root, "test", gallery_size=-1).queries:
        names = [item.image for item in query.gallery]
        assert sorted(names) == sorted(set(TEST_NAMES) - {query.image})


def test_images_are_jpegs_of_the_written_pixels(cuhk_root: Path) -> None:
    with Image.open(cuhk_root / "Image" / "SSM" / "s10.jpg") as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 48), "RGB")
        pixels = np.asarray(image, dtype=int)
    assert np.abs(pixels - CUHK_TEST[-1].image).max() <= 2  # a flat colour survives JPEG


def test_cuhk_writer_refuses_inconsistent_queries(tmp_path: Path) -> None:
    scenes = CUHK_TRAIN + CUHK_TEST
    with pytest.raises(ValueError, match="s1, which is not a test scene"):
        write_cuhk_sysu(tmp_path, scenes, TEST_NAMES, [(0, "s1", np.array([1, 2, 11, 22]))])
    with pytest.raises(ValueError, match=r"s5 has no box .* of identity 1"):
        write_cuhk_sysu(tmp_path, scenes, TEST_NAMES, [(1, "s5", np.array([5, 5, 15, 25]))])
    with pytest.raises(ValueError, match="must include 50"):
        write_cuhk_sysu(tmp_path, scenes, TEST_NAMES, CUHK_QUERIES, gallery_sizes=(100,))


# ---------------------------------------------------------------------------------------------
# PRW: fractional boxes (kept exactly in the .mat files; query_info has 4 decimals).

PRW_TRAIN = [
    scene("c1s1_000001", [[10.5, 20.25, 40.75, 80.5], [50, 5, 70, 45]], [0, -1], camera=1),
    scene("c2s1_000002", [[3, 4, 13, 24]], [1], camera=2),
    scene("c2s1_000003", [], [], camera=2),  # nobody: a (0, 5) box_new
]
PRW_TEST = [
    scene("c4s1_000010", [[5, 5, 15, 25], [30, 3, 40, 33]], [0, 1], camera=4),
    scene("c5s2_000020", [[6.5, 6, 16, 26]], [0], camera=5),
    scene("c6s3_000030", [[2, 2, 12, 22], [40.25, 2.5, 50.75, 30.5]], [-1, 2], camera=6),
]
# Identity 1 has no query; it still keeps its id, as raw PRW test ids do.
PRW_QUERIES = [(0, "c5s2_000020", np.array([6.5, 6, 16, 26])),
               (2, "c6s3_000030", np.array([40.25, 2.5, 50.75, 30.5]))]  # fmt: skip


@pytest.fixture(scope="module")
def prw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prw")
    train, test = [s.name for s in PRW_TRAIN], [s.name for s in PRW_TEST]
    write_prw(root, PRW_TRAIN + PRW_TEST, train, test, PRW_QUERIES)
    return root


def test_prw_files_hold_raw_ids_and_crlf_lines(prw_root: Path) -> None:
    annotation = scipy.io.loadmat(prw_root / "annotations" / "c1s1_000001.jpg.mat")["box_new"]
    # raw ids: pid + 1, unlabeled -2; then x y w h
    assert annotation.tolist() == [[1, 10.5, 20.25, 30.25, 60.25], [-2, 50, 5, 20, 40]]
    assert scipy.io.loadmat(prw_root / "ID_train.mat")["ID_train"].tolist() == [[1, 2]]
    assert scipy.io.loadmat(prw_root / "ID_test.mat")["ID_test2"].tolist() == [[1, 3]]
    frames = scipy.io.loadmat(prw_root / "frame_test.mat")["img_index_test"]
    assert [str(f[0][0]) for f in frames] == [s.name for s in PRW_TEST]
    assert (prw_root / "query_info.txt").read_bytes().split(b"\r\n") == [
        b"1 6.5000 6.0000 9.5000 20.0000 c5s2_000020",
        b"3 40.2500 2.5000 10.5000 28.0000 c6s3_000030",
        b"",
    ]


def test_prw_splits_read_back(prw_root: Path) -> None:
    train = load_prw(prw_root, "train")
    assert_same_scenes(train.images, PRW_TRAIN)
    test = load_prw(prw_root, "test")
    # Test raw ids in use are 1, 2, 3 -> 0, 1, 2: the written pids again.
    assert_same_scenes(test.images, PRW_TEST)
    assert [image.camera for image in test.images] == [4, 5, 6]


def test_prw_queries_read_back_with_their_camera(prw_root: Path) -> None:
    queries = load_prw(prw_root, "test").queries
    loaded = [(q.pid, q.image, q.box.tolist(), q.camera, q.gallery) for q in queries]
    assert loaded == [
        (0, "c5s2_000020", [6.5, 6, 16, 26], 5, None),
        (2, "c6s3_000030", [40.25, 2.5, 50.75, 30.5], 6, None),
    ]


def test_prw_writer_refuses_bad_splits_and_cameras(tmp_path: Path) -> None:
    scenes = PRW_TRAIN + PRW_TEST
    train, test = [s.name for s in PRW_TRAIN], [s.name for s in PRW_TEST]
    with pytest.raises(ValueError, match=r"in neither \['c6s3_000030'\]"):
        write_prw(tmp_path, scenes, train, test[:-1], [])
    wrong_camera = scene("c3s1_000001", [[1, 1, 5, 5]], [0], camera=2)
    with pytest.raises(ValueError, match="camera 2 disagrees with its name"):
        write_prw(tmp_path, [wrong_camera], [wrong_camera.name], [], [])


# ---------------------------------------------------------------------------------------------
# CrowdHuman

CROWD = [
    scene("273271,c9db000d5146c15", [[10, 20, 40, 80], [-5, -10, 15, 30.5]], [-1, -1],
          ignore_boxes=[[100, 20, 130, 80]]),
    scene("284193,faa9000f2678b5e", [], []),
]  # fmt: skip


def test_crowdhuman_reads_back_with_ignore_regions(tmp_path: Path) -> None:
    write_crowdhuman(tmp_path, CROWD, "train")
    split = load_crowdhuman(tmp_path, "train")
    assert_same_scenes(split.images, CROWD)
    np.testing.assert_array_equal(split.images[0].ignore_boxes, CROWD[0].ignore_boxes)
    assert split.images[1].ignore_boxes.shape == (0, 4)


def test_crowdhuman_lines_carry_the_fields_of_the_real_files(tmp_path: Path) -> None:
    write_crowdhuman(tmp_path, CROWD, "val")
    first = json.loads((tmp_path / "annotation_val.odgt").read_text().splitlines()[0])
    person, _, region = first["gtboxes"]
    assert person["fbox"] == [10, 20, 30, 60]  # whole numbers are written as JSON integers
    assert set(person) == {"tag", "fbox", "vbox", "hbox", "extra"}
    assert (person["tag"], person["extra"]["ignore"]) == ("person", 0)
    assert (region["tag"], region["extra"]["ignore"]) == ("mask", 1)


def test_scene_records_refuse_malformed_arrays() -> None:
    with pytest.raises(ValueError, match=r"image must be \(H, W, 3\) uint8"):
        SceneRecord("s1", np.zeros((4, 4), np.uint8), np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="2 boxes but pids"):
        SceneRecord("s1", np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4)), np.zeros(3))
