"""``python -m training.evaluate``: tables on tiny splits, and errors as messages (exit 2).

Most tests replace the dataset loader by a tiny in-memory split; the last one reads a PRW folder
written by the synthetic writers through the real loader. Predictions always go through a real
predictions file.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training.evaluate as cli
from training.datasets import camera_of, load_prw
from training.datasets.base import GalleryItem, PersonSearchSplit, Query, SceneAnnotation
from training.evaluation.predictions import Predictions, save_predictions
from training.synthetic.writers import SceneRecord, write_prw

PERSON = [0.0, 0.0, 50.0, 100.0]


def scene(name: str, boxes: list[list[float]], pid: int = 0, camera: int = 1, path=None):
    array = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    pids = np.full(len(array), pid, dtype=np.int64)
    return SceneAnnotation(name, Path(path or name), array, pids, camera=camera)


@pytest.fixture
def fake_loader(monkeypatch):
    """Make the CLI load ``splits[name]`` and record the loader's arguments."""
    calls = []

    def install(split: PersonSearchSplit) -> list:
        def load_dataset(name, root, split_name, **kwargs):
            calls.append((name, root, split_name, kwargs))
            return split

        monkeypatch.setattr(cli, "load_dataset", load_dataset)
        return calls

    return install


def write(tmp_path: Path, rows: dict, query_embeddings=None, **extra) -> str:
    """{image: [(box, score, similarity)]} with 1-D embeddings -> a predictions file."""
    detections = {n: np.array([[*b, s] for b, s, _ in r]).reshape(-1, 5) for n, r in rows.items()}
    embeddings = {n: np.array([[e] for _, _, e in r]).reshape(-1, 1) for n, r in rows.items()}
    path = tmp_path / "predictions.npz"
    save_predictions(path, Predictions(detections, embeddings, query_embeddings, **extra))
    return str(path)


def table_row(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return line[len(label) :].split()


# The cross-camera case of test_search: all cameras AP 7/12, top-1 miss; cross-camera AP 1.
PRW_SPLIT = PersonSearchSplit(
    "prw",
    "test",
    Path("prw"),
    [
        scene("q", [PERSON], camera=1),
        scene("a", [PERSON], camera=1),
        scene("b", [PERSON], camera=2),
        scene("c", [], camera=2),
        scene("d", [], camera=1),
    ],
    [Query(0, "q", np.array(PERSON), camera=1)],
)
PRW_ROWS = {
    "q": [],
    "a": [(PERSON, 0.9, 0.9)],
    "b": [(PERSON, 0.9, 0.6)],
    "c": [(PERSON, 0.9, 0.5)],
    "d": [(PERSON, 0.9, 0.95)],
}


def test_prw_prints_all_camera_and_cross_camera_rows(tmp_path, fake_loader, capsys):
    calls = fake_loader(PRW_SPLIT)
    predictions = write(tmp_path, PRW_ROWS, np.ones((1, 1)))
    code = cli.main(["--dataset", "prw", "--root", "data/PRW", "--predictions", predictions])
    output = capsys.readouterr().out
    assert code == 0
    assert calls == [("prw", "data/PRW", "test", {})]
    # queries, mAP, top-1, top-5, top-10
    assert table_row(output, "all cameras") == ["1", "58.33", "0.00", "100.00", "100.00"]
    assert table_row(output, "cross-camera") == ["1", "100.00", "100.00", "100.00", "100.00"]
    assert "det_thresh   0.5" in output
    assert "embeddings of the GT query boxes" in output
    # Detection: 3 GT boxes (q, a, b), 4 detections all scored 0.9, 2 of them on people:
    # recall 2/3; one tied threshold with precision 2/4, so AP = 1/2 * 2/3.
    assert "detection    AP 33.33   recall 66.67" in output


def test_cuhk_sysu_passes_the_gallery_size_to_the_loader(tmp_path, fake_loader, capsys):
    images = [scene(name, [PERSON], pid=-1, camera=-1) for name in ("q", "g1", "g2")]
    gallery = (GalleryItem("g1", np.array(PERSON)), GalleryItem("g2", None))
    split = PersonSearchSplit(
        "cuhk_sysu",
        "test",
        Path("cuhk"),
        images,
        [Query(0, "q", np.array(PERSON), gallery=gallery)],
    )
    calls = fake_loader(split)
    rows = {"q": [], "g1": [(PERSON, 0.9, 0.6)], "g2": [(PERSON, 0.9, 0.5)]}
    predictions = write(tmp_path, rows, np.ones((1, 1)))
    arguments = ["--dataset", "cuhk_sysu", "--root", "cuhk", "--predictions", predictions]
    assert cli.main(arguments) == 0
    assert table_row(capsys.readouterr().out, "gallery") == [
        "1",
        "100.00",
        "100.00",
        "100.00",
        "100.00",
    ]
    assert cli.main([*arguments, "--gallery-size", "-1", "--det-thresh", "0.3"]) == 0
    assert "det_thresh   0.3" in capsys.readouterr().out
    assert [call[3] for call in calls] == [{"gallery_size": 100}, {"gallery_size": -1}]


def test_max_iou_mode_reports_queries_with_low_overlap(tmp_path, fake_loader, capsys):
    fake_loader(PRW_SPLIT)
    rows = dict(PRW_ROWS, q=[([300, 0, 350, 100], 0.9, 1.0)])  # nothing on the query box
    predictions = write(tmp_path, rows)
    assert cli.main(["--dataset", "prw", "--root", "prw", "--predictions", predictions]) == 0
    assert "1 of 1 have best IoU < 0.5" in capsys.readouterr().out


# CrowdHuman: the worked example of test_miss_rate (MR^-2 0.75^(7/9) * 0.25^(2/9)).
def box(x: float) -> list[float]:
    return [x, 0.0, x + 50.0, 100.0]


CROWDHUMAN_SPLIT = PersonSearchSplit(
    "crowdhuman",
    "val",
    Path("crowdhuman"),
    [
        scene("a", [box(0), box(100)], pid=-1),
        SceneAnnotation(
            "b",
            Path("b"),
            np.array([box(0), box(100)], dtype=np.float32),
            np.array([-1, -1]),
            ignore_boxes=np.array([[300, 0, 500, 200]], dtype=np.float32),
        ),
    ],
)
CROWDHUMAN_DETECTIONS = {
    "a": np.array([[*box(0), 0.9], [*box(600), 0.8], [*box(100), 0.6]]),
    "b": np.array([[*box(350), 0.85], [*box(0), 0.7], [*box(800), 0.5]]),
}


def test_crowdhuman_prints_mr2_ap_and_recall(tmp_path, fake_loader, capsys):
    calls = fake_loader(CROWDHUMAN_SPLIT)
    path = tmp_path / "detections.npz"
    sizes = {"a": (1000, 1000), "b": (1000, 1000)}
    save_predictions(path, Predictions(CROWDHUMAN_DETECTIONS, image_sizes=sizes))
    code = cli.main(["--dataset", "crowdhuman", "--root", "ch", "--predictions", str(path)])
    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert calls[0][2] == "val"
    mr2 = 100 * 0.75 ** (7 / 9) * 0.25 ** (2 / 9)
    ap = 100 * (0.25 * (1 / 2 + 2 / 3) / 2 + 0.25 * (2 / 3 + 3 / 4) / 2)
    assert output[-1].split() == [f"{mr2:.2f}", f"{ap:.2f}", "75.00"]
    assert "det_thresh   0" in output


def test_crowdhuman_reads_image_sizes_from_the_images_when_the_file_has_none(
    tmp_path, fake_loader, capsys
):
    # A person cut by the left border of a 100 x 100 image is matched only once clipped.
    Image.new("RGB", (100, 100)).save(tmp_path / "a.jpg")
    split = PersonSearchSplit(
        "crowdhuman",
        "val",
        tmp_path,
        [scene("a", [[-50, 0, 50, 100]], pid=-1, path=tmp_path / "a.jpg")],
    )
    fake_loader(split)
    path = tmp_path / "detections.npz"
    save_predictions(path, Predictions({"a": np.array([[0, 0, 50, 100, 0.9]])}))
    assert cli.main(["--dataset", "crowdhuman", "--root", "ch", "--predictions", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == "100.00"  # recall
    (tmp_path / "a.jpg").unlink()
    assert cli.main(["--dataset", "crowdhuman", "--root", "ch", "--predictions", str(path)]) == 2
    assert "cannot read the size of" in capsys.readouterr().err


def test_errors_are_one_line_messages_with_exit_status_2(tmp_path, fake_loader, capsys):
    fake_loader(PRW_SPLIT)
    absent = str(tmp_path / "absent.npz")
    assert cli.main(["--dataset", "prw", "--root", "prw", "--predictions", absent]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "no such predictions file" in error
    assert "Traceback" not in error

    wrong = write(tmp_path, {"elsewhere": []}, np.ones((1, 1)))
    assert cli.main(["--dataset", "prw", "--root", "prw", "--predictions", wrong]) == 2
    assert "no predictions for 5 of the 5 images of prw test" in capsys.readouterr().err

    arguments = [
        "--dataset",
        "prw",
        "--root",
        "prw",
        "--predictions",
        wrong,
        "--gallery-size",
        "50",
    ]
    assert cli.main(arguments) == 2
    assert "--gallery-size applies to cuhk_sysu only" in capsys.readouterr().err


def test_help_documents_the_predictions_format():
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    for key in ("image_names", "offsets", "detections", "embeddings", "query_embeddings"):
        assert key in result.stdout


def test_end_to_end_with_the_real_prw_loader(tmp_path, capsys):
    # Four test frames on two cameras, identities 0 and 1 (and one unlabeled person):
    #   c1s1_000001: 0, 1    c2s1_000002: 0    c1s1_000003: 0, 1    c2s1_000004: 1, unlabeled
    # Oracle predictions (GT boxes, one-hot embeddings per identity) except that identity 0 is
    # missed in c1s1_000003.
    # Query 0 (identity 0, frame 1): found in frame 2, missed in frame 3: AP 1 * 1/2.
    # Query 1 (identity 1, frame 4): found in frames 1 and 3: AP 1. mAP 75; top-1 100.
    # Cross-camera: query 0 only counts frame 2, query 1 frames 1 and 3: mAP 100.
    # Detection: 7 GT boxes, 6 found at score 1: recall 6/7 and AP 1 * 6/7.
    image = np.full((48, 64, 3), 128, dtype=np.uint8)
    frames = [
        ("c1s1_000001", [[2, 2, 12, 22], [20, 2, 30, 22]], [0, 1]),
        ("c2s1_000002", [[4, 4, 14, 24]], [0]),
        ("c1s1_000003", [[2, 2, 12, 22], [30, 4, 40, 24]], [0, 1]),
        ("c2s1_000004", [[6, 6, 16, 26], [40, 10, 50, 30]], [1, -1]),
        ("c3s1_000005", [[1, 1, 11, 21]], [2]),
    ]
    scenes = [SceneRecord(n, image, b, p, camera_of(n)) for n, b, p in frames]
    queries = [
        (0, "c1s1_000001", np.array([2, 2, 12, 22])),
        (1, "c2s1_000004", np.array([6, 6, 16, 26])),
    ]
    root = write_prw(tmp_path / "prw", scenes, ["c3s1_000005"], [f[0] for f in frames[:4]], queries)

    split = load_prw(root, "test")
    one_hot = np.eye(3)
    detections, embeddings = {}, {}
    for annotation in split.images:
        keep = np.ones(len(annotation.boxes), dtype=bool)
        if annotation.name == "c1s1_000003":
            keep = annotation.pids != 0
        boxes = annotation.boxes[keep]
        detections[annotation.name] = np.concatenate([boxes, np.ones((len(boxes), 1))], axis=1)
        embeddings[annotation.name] = one_hot[
            np.where(annotation.pids[keep] >= 0, annotation.pids[keep], 2)
        ]
    query_embeddings = one_hot[[query.pid for query in split.queries]]
    query_images = tuple(query.image for query in split.queries)
    path = tmp_path / "predictions.npz"
    save_predictions(path, Predictions(detections, embeddings, query_embeddings, query_images))

    assert cli.main(["--dataset", "prw", "--root", str(root), "--predictions", str(path)]) == 0
    output = capsys.readouterr().out
    assert table_row(output, "all cameras") == ["2", "75.00", "100.00", "100.00", "100.00"]
    assert table_row(output, "cross-camera") == ["2", "100.00", "100.00", "100.00", "100.00"]
    assert "detection    AP 85.71   recall 85.71" in output
