"""CrowdHuman loader on a hand-written .odgt file (one JSON object per line)."""

import json
from pathlib import Path

import numpy as np
import pytest

from training.datasets import DatasetError, load_crowdhuman, load_dataset


def gtbox(tag: str, fbox: list, **extra) -> dict:
    """One entry of "gtboxes"; the loader reads only the tag, the full body and extra.ignore."""
    return {"tag": tag, "fbox": fbox, "vbox": fbox, "hbox": [*fbox[:2], 5, 5], "extra": extra}


FIRST = {
    "ID": "273271,c9db000d5146c15",
    "gtboxes": [
        gtbox("person", [10, 20, 30, 60], box_id=0, occ=1),  # a person: [10 20 40 80]
        gtbox("person", [100, 20, 30, 60], box_id=1, ignore=1),  # ignore region [100 20 130 80]
        gtbox("mask", [200, 0, 50, 50], ignore=1),  # a crowd or reflection: ignore [200 0 250 50]
        gtbox("person", [5, 5, 0, 10], box_id=3, ignore=0),  # degenerate (w = 0): dropped
        gtbox("person", [-5, -10, 20, 40], box_id=4, ignore=0),  # past the corner: kept as is
    ],
}
SECOND = {"ID": "284193,faa9000f2678b5e", "gtboxes": []}


def write_raw_crowdhuman(root: Path, split: str = "val") -> Path:
    (root / "Images").mkdir(parents=True)
    for record in (FIRST, SECOND):
        (root / "Images" / f"{record['ID']}.jpg").touch()  # never decoded by the loader
    lines = [json.dumps(FIRST), json.dumps(SECOND), ""]
    (root / f"annotation_{split}.odgt").write_text("\n".join(lines))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_raw_crowdhuman(tmp_path / "crowdhuman")


def test_one_scene_per_line_named_by_id(root: Path) -> None:
    split = load_crowdhuman(root, "val")
    assert [image.name for image in split.images] == [FIRST["ID"], SECOND["ID"]]
    assert split.images[0].path == root / "Images" / f"{FIRST['ID']}.jpg"
    assert split.queries == []


def test_full_body_boxes_are_the_persons_and_nobody_has_an_identity(root: Path) -> None:
    first, second = load_crowdhuman(root, "val").images
    assert first.boxes.tolist() == [[10, 20, 40, 80], [-5, -10, 15, 30]]
    assert first.pids.tolist() == [-1, -1]
    assert second.boxes.shape == (0, 4)
    assert second.pids.shape == (0,)


def test_mask_tags_and_ignore_flags_become_ignore_regions(root: Path) -> None:
    first = load_crowdhuman(root, "val").images[0]
    assert first.ignore_boxes.tolist() == [[100, 20, 130, 80], [200, 0, 250, 50]]
    assert first.ignore_boxes.dtype == np.float32


def test_load_dataset_finds_crowdhuman(root: Path) -> None:
    assert load_dataset("crowdhuman", root, "val").dataset == "crowdhuman"


def test_a_missing_annotation_file_names_the_expected_folder(root: Path) -> None:
    with pytest.raises(DatasetError, match=r"no annotation_train.odgt; is the root the CrowdHuman"):
        load_crowdhuman(root, "train")


def test_a_broken_line_is_reported_with_its_number(root: Path) -> None:
    with (root / "annotation_val.odgt").open("a") as odgt:
        odgt.write('{"ID": "x", "gtboxes": [\n')  # the third line, after FIRST and SECOND
    with pytest.raises(DatasetError, match=r"annotation_val.odgt:3: not a JSON object"):
        load_crowdhuman(root, "val")


def test_an_unknown_tag_is_an_error(root: Path) -> None:
    record = {"ID": SECOND["ID"], "gtboxes": [{"tag": "car", "fbox": [1, 1, 5, 5]}]}
    (root / "annotation_val.odgt").write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match="box tag 'car', expected 'person' or 'mask'"):
        load_crowdhuman(root, "val")


def test_a_missing_image_is_reported(root: Path) -> None:
    (root / "Images" / f"{SECOND['ID']}.jpg").unlink()
    with pytest.raises(DatasetError, match=f"are missing, e.g. {SECOND['ID']}.jpg"):
        load_crowdhuman(root, "val")


def test_an_unknown_split_or_dataset_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="'train' or 'val'"):
        load_crowdhuman(root, "test")
    with pytest.raises(
        ValueError, match="unknown dataset 'coco'; known: cuhk_sysu, prw, crowdhuman"
    ):
        load_dataset("coco", root, "val")
