"""``python -m demo``: its options, its port, and the whole pipeline on a few frames.

The pipeline test runs every stage on a dataset of a few frames, with the run and the model
folder cached beforehand (the service tests' random tiny model, which detects 5 "persons" per
frame): it proves the plumbing and the reporting, not the model. Training and its plan run for
real in tests/demo/test_build.py, on four images.
"""

import socket
from pathlib import Path

import pytest

from demo import build, cli, serve
from indexer.store import Gallery
from tests.demo.support import cache_a_trained_run, tiny_options
from training.datasets import load_dataset


def test_a_busy_port_is_refused_before_any_work(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        status = cli.main(["--port", str(port), "--data-dir", str(tmp_path / "demo")])

    assert status == cli.USER_ERROR
    error = capsys.readouterr().err
    assert f"port {port}" in error and "--port" in error
    assert not (tmp_path / "demo").exists()


def test_a_free_port_is_held_for_the_service():
    sock = serve.reserve_port("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


@pytest.mark.parametrize("argv", [["--minutes", "0"], ["--port", "70000"]])
def test_impossible_options_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(argv)
    assert exit_.value.code == 2


def test_no_serve_and_the_documented_defaults():
    options = cli.parse_args(["--no-serve"])
    assert not options.serve
    assert (options.port, options.data_dir) == (8000, Path("data/demo"))


def test_the_pipeline_indexes_the_test_frames_and_searches_every_query(tmp_path, capsys):
    options = tiny_options(tmp_path)
    data_root = cache_a_trained_run(options)
    split = load_dataset("prw", data_root, "test")

    result = cli.run_demo(options)

    output = capsys.readouterr().out
    run_dir = build.run_folder(options, data_root)
    assert f"reusing {run_dir}" in output and f"reusing {run_dir / 'model'}" in output
    gallery_dir = build.gallery_folder(options, run_dir / "model")
    with Gallery.open(gallery_dir, fingerprint=None) as gallery:
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
