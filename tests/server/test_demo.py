"""``python -m server.demo``: its plan, its judgement of a search, its port and its pipeline.

The pipeline test runs every stage on a dataset of a few frames, with the run and the model
folder cached beforehand (the service tests' random tiny model, which detects 5 "persons" per
frame): it proves the plumbing and the reporting, not the model. Training and its plan run for
real in their own test, on four images.
"""

import json
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from indexer.store import Gallery
from server import demo
from tests.server.support import TINY_CONFIG, write_model_folder
from training.datasets import SceneAnnotation, load_dataset

# A few frames (the generator's default difficulty): 2 training and 2 test identities.
TINY_DATA = {
    "train_images": 4,
    "test_images": 6,
    "train_identities": 2,
    "test_identities": 2,
    "progress": False,
}


def tiny_options(tmp_path: Path, **changes) -> demo.DemoOptions:
    values = {
        "data_dir": tmp_path / "demo",
        "config": TINY_CONFIG,
        "minutes": 0.01,
        "serve": False,
        "synthetic": TINY_DATA,
        # Small inputs and no loader processes: two training steps take seconds.
        "overrides": (
            "model.preprocess.min_size=96",
            "model.preprocess.max_size=128",
            "data.workers=0",
        ),
        "parity": False,
    }
    return demo.DemoOptions(**(values | changes))


# --- training ---------------------------------------------------------------------------------


def test_training_fits_the_budget_and_is_then_reused(tmp_path, capsys):
    options = tiny_options(tmp_path, minutes=1e-4, synthetic=TINY_DATA | {"test_images": 2})
    data_root = demo.synthetic_dataset(options, demo.Stage("data"))

    run_dir = demo.trained_run(options, data_root, demo.Stage("training"))

    # 4 images in batches of 4 (the config's): one iteration per epoch. A budget of 6 ms is
    # less than one iteration: the second step finds it spent, is still taken, and ends the run.
    record = json.loads((run_dir / demo.COMPLETE_MARKER).read_text())
    assert (record["epochs"], record["iterations"], record["stopped_by"]) == (2, 2, "time budget")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["schedule"]["max_minutes"] == 1e-4
    assert Path(saved["data"]["root"]) == data_root
    assert (run_dir / demo.COMPLETE_MARKER).is_file()

    again = demo.Stage("training")
    assert demo.trained_run(options, data_root, again) == run_dir
    assert again.note == f"reusing {run_dir}"
    assert "reusing" in capsys.readouterr().out


def test_another_budget_is_another_run(tmp_path):
    data_root = tmp_path / "prw-seed0-abc"
    short = demo.run_folder(tiny_options(tmp_path, minutes=5), data_root)
    long = demo.run_folder(tiny_options(tmp_path, minutes=10), data_root)
    assert short != long
    assert short == demo.run_folder(tiny_options(tmp_path, minutes=5), data_root)


# --- judging a hit ------------------------------------------------------------------------------


@pytest.fixture
def frames() -> dict[str, SceneAnnotation]:
    """One frame: identity 3 at (10, 10)-(30, 70), an unlabeled person at (50, 10)-(70, 70)."""
    frame = SceneAnnotation(
        name="c1s1_000001",
        path=Path("/data/frames/c1s1_000001.jpg"),
        boxes=np.array([[10, 10, 30, 70], [50, 10, 70, 70]], dtype=np.float32),
        pids=np.array([3, -1]),
        camera=1,
    )
    return {str(frame.path): frame}


def hit(box, uri="/data/frames/c1s1_000001.jpg") -> dict:
    return {"uri": uri, "box": box, "similarity": 0.9}


def test_a_hit_on_the_query_identity_is_right(frames):
    assert demo.is_right_person(hit([10, 10, 30, 70]), frames, pid=3)
    # Shifted by 5 px: intersection 15 x 60 = 900, union 2 * 1200 - 900 = 1500, IoU 0.6.
    assert demo.is_right_person(hit([15, 10, 35, 70]), frames, pid=3)


def test_a_hit_on_someone_else_or_beside_the_person_is_wrong(frames):
    assert not demo.is_right_person(hit([50, 10, 70, 70]), frames, pid=3)  # the unlabeled one
    # Shifted by 10 px: intersection 600, union 1800, IoU 1/3 < 0.5.
    assert not demo.is_right_person(hit([20, 10, 40, 70]), frames, pid=3)
    assert not demo.is_right_person(hit([10, 10, 30, 70]), frames, pid=4)  # not in the frame
    assert not demo.is_right_person(hit([10, 10, 30, 70], uri="/elsewhere.jpg"), frames, pid=3)


def test_the_printed_curl_sends_the_same_fields(tmp_path):
    request = demo.SearchRequest(tmp_path / "query.jpg", (10.4, 20.0, 50.6, 140.0), 17)

    words = shlex.split(request.curl("http://127.0.0.1:8000"))

    assert words[:3] == ["curl", "-s", "http://127.0.0.1:8000/v1/search"]
    fields = dict(words[i + 1].split("=", 1) for i in range(3, len(words), 2))
    assert fields == {
        "image": f"@{(tmp_path / 'query.jpg').resolve()}",
        "box": "10,20,51,140",  # whole pixels
        "exclude_images": "17",
        "top_k": str(demo.TOP_K),
    }


# --- the port -----------------------------------------------------------------------------------


def test_a_busy_port_is_refused_before_any_work(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        status = demo.main(["--port", str(port), "--data-dir", str(tmp_path / "demo")])

    assert status == demo.USER_ERROR
    error = capsys.readouterr().err
    assert f"port {port}" in error and "--port" in error
    assert not (tmp_path / "demo").exists()


def test_a_free_port_is_held_for_the_service():
    sock = demo.reserve_port("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


@pytest.mark.parametrize("argv", [["--minutes", "0"], ["--port", "70000"]])
def test_impossible_options_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args(argv)
    assert exit_.value.code == 2


def test_no_serve_and_the_documented_defaults():
    options = demo.parse_args(["--no-serve"])
    assert not options.serve
    assert (options.port, options.data_dir) == (8000, Path("data/demo"))


# --- the pipeline -------------------------------------------------------------------------------


def cache_a_trained_run(options: demo.DemoOptions) -> Path:
    """Put a finished run in the demo's cache, as an earlier demo would have left it: its
    config (every detection kept) and a model folder (the service tests' tiny model)."""
    data_root = demo.synthetic_dataset(options, demo.Stage("data"))
    run_dir = demo.run_folder(options, data_root)
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["eval"]["det_thresh"] = 0.0
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    write_model_folder(run_dir / "model")
    (run_dir / demo.COMPLETE_MARKER).write_text("{}\n")
    return data_root


def test_the_pipeline_indexes_the_test_frames_and_searches_every_query(tmp_path, capsys):
    options = tiny_options(tmp_path)
    data_root = cache_a_trained_run(options)
    split = load_dataset("prw", data_root, "test")

    result = demo.run_demo(options)

    output = capsys.readouterr().out
    run_dir = demo.run_folder(options, data_root)
    assert f"reusing {run_dir}" in output and f"reusing {run_dir / 'model'}" in output
    with Gallery.open(run_dir / "gallery", fingerprint=None) as gallery:
        assert gallery.stats().num_images == len(split.images)
    # Every query of the test split, in order, each searched without its own frame.
    assert [outcome.query.image for outcome in result.outcomes] == [q.image for q in split.queries]
    frames = split.by_name()
    for outcome in result.outcomes:
        assert outcome.hits, "the tiny model detects persons in every frame"
        own_frame = str(frames[outcome.query.image].path)
        assert all(hit["uri"] != own_frame for hit in outcome.hits)
    # The shown search: the first right query, or the first query when none is right.
    first_right = next((o for o in result.outcomes if o.right), result.outcomes[0])
    assert result.shown.query is first_right.query
    query_file = options.data_dir / "query.jpg"
    assert query_file.read_bytes() == frames[first_right.query.image].path.read_bytes()
    assert result.shown.request.curl(f"http://{options.host}:{options.port}") in output
    assert f"for {result.right} of them" in output
    if not result.right:
        assert "NO query found its person at rank 1" in output
    for stage in ("data", "training", "export", "index", "service", "total"):
        assert any(line.startswith(stage) for line in output.splitlines()), stage
