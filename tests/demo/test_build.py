"""What the demo builds: its data, its model folder (training within the budget, then export,
each cached) and its gallery."""

import json
from pathlib import Path

import yaml

from demo import build
from demo.options import Stage, Stages
from indexer.store import Gallery
from tests.demo.support import TINY_DATA, cache_a_trained_run, tiny_options
from training.datasets import load_dataset


def test_training_fits_the_budget_and_is_then_reused(tmp_path, capsys):
    options = tiny_options(tmp_path, minutes=1e-4, synthetic=TINY_DATA | {"test_images": 2})
    data_root = build.synthetic_dataset(options, Stage("data"))

    run_dir = build.trained_run(options, data_root, Stage("training"))

    # 4 images in batches of 4 (the config's): one iteration per epoch. A budget of 6 ms is
    # less than one iteration: the second step finds it spent, is still taken, and ends the run.
    record = json.loads((run_dir / build.TRAINED_MARKER).read_text())
    assert (record["epochs"], record["iterations"], record["stopped_by"]) == (2, 2, "time budget")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["schedule"]["max_minutes"] == 1e-4
    assert Path(saved["data"]["root"]) == data_root

    again = Stage("training")
    assert build.trained_run(options, data_root, again) == run_dir
    assert again.note == f"reusing {run_dir}"
    assert "reusing" in capsys.readouterr().out


def test_another_budget_is_another_run(tmp_path):
    data_root = tmp_path / "prw-seed0-abc"
    short = build.run_folder(tiny_options(tmp_path, minutes=5), data_root)
    long = build.run_folder(tiny_options(tmp_path, minutes=10), data_root)
    assert short != long
    assert short == build.run_folder(tiny_options(tmp_path, minutes=5), data_root)


def test_the_model_folder_step_gives_the_exported_folder_and_its_threshold(tmp_path):
    options = tiny_options(tmp_path)
    data_root = cache_a_trained_run(options)

    model = build.model_folder(options, data_root, Stages(2))

    assert model.model_dir == build.run_folder(options, data_root) / "model"
    assert model.min_score == 0.0  # the run's eval.det_thresh


def test_every_test_frame_is_indexed_and_found_by_its_bytes(tmp_path):
    options = tiny_options(tmp_path)
    data_root = cache_a_trained_run(options)
    model = build.model_folder(options, data_root, Stages(2))
    split = load_dataset("prw", data_root, "test")
    gallery_dir = build.gallery_folder(options, model.model_dir)

    ids = build.indexed_gallery(model, split, gallery_dir, Stage("index"))
    again = build.indexed_gallery(model, split, gallery_dir, Stage("index"))  # nothing new

    assert again == ids and set(ids) == {str(frame.path) for frame in split.images}
    with Gallery.open(gallery_dir, fingerprint=None) as gallery:
        assert gallery.stats().num_images == len(split.images)
        for path, image_id in ids.items():
            assert gallery.get_image(image_id).uri == path
