"""benchmarks/learn.py: the script runs end to end, caches its data and judges its targets.

Nothing here is about accuracy: the smoke test trains for two iterations on a dataset of a few
images, which proves the plumbing, not the learning.
"""

import math
from pathlib import Path

import pytest

from benchmarks import learn
from training.config import ConfigError

TINY_DETECTOR = Path(__file__).resolve().parents[2] / "configs/tiny/lla_fcos_synthetic.yaml"
TINY_CROWDHUMAN = {"train_images": 2, "test_images": 1, "min_persons": 2, "max_persons": 3}


def test_main_prints_untrained_and_trained_rows_for_a_detector_config(tmp_path, capsys):
    argv = [
        "--config",
        str(TINY_DETECTOR),
        "--data-dir",
        str(tmp_path),
        "--set",
        "schedule.epochs=1",  # of 1 batch of 2 images: one iteration
        "--runs-dir",
        str(tmp_path / "runs"),
        "--threads",
        "1",
        "--synthetic",
        *(f"{key}={value}" for key, value in TINY_CROWDHUMAN.items()),
    ]
    assert learn.main(argv) == 0
    output = capsys.readouterr().out
    table = output.split("=== final table ===")[1].splitlines()
    rows = {
        line.split()[1]: line.split() for line in table if line.startswith(f"{TINY_DETECTOR.name} ")
    }
    assert set(rows) == {"untrained", "trained", "ratio"}
    # Columns: config, model, MR^-2, AP, recall, iterations, training seconds.
    assert rows["untrained"][5] == "0" and rows["trained"][5] == "1"
    assert "stopped by schedule" in output
    (run,) = (tmp_path / "runs").iterdir()  # the trainer's run folder, checkpoint included
    assert (run / "model.safetensors").is_file() and (run / "state.pt").is_file()
    assert f"command: python benchmarks/learn.py --config {TINY_DETECTOR}" in output
    assert "1 threads" in output


def test_a_generated_dataset_is_reused_and_other_options_get_another_folder(tmp_path):
    root, generated = learn.synthetic_dataset(tmp_path, "crowdhuman", 0, TINY_CROWDHUMAN)
    assert generated and (root / learn.COMPLETE_MARKER).is_file()

    again, generated_again = learn.synthetic_dataset(tmp_path, "crowdhuman", 0, TINY_CROWDHUMAN)
    assert (again, generated_again) == (root, False)

    other_seed, _ = learn.synthetic_dataset(tmp_path, "crowdhuman", 1, TINY_CROWDHUMAN)
    more_images = {**TINY_CROWDHUMAN, "train_images": 3}
    other_options, _ = learn.synthetic_dataset(tmp_path, "crowdhuman", 0, more_images)
    assert len({root, other_seed, other_options}) == 3
    # Only finished datasets are left behind, no temporary folders.
    assert sorted(tmp_path.iterdir()) == sorted([root, other_seed, other_options])


def test_a_changed_generator_gets_another_folder(tmp_path, monkeypatch):
    options = learn.synthetic_options("crowdhuman", TINY_CROWDHUMAN)
    before = learn.dataset_folder(tmp_path, "crowdhuman", 0, options)
    monkeypatch.setattr(learn, "generator_fingerprint", lambda: "0123456789ab")
    assert learn.dataset_folder(tmp_path, "crowdhuman", 0, options) != before


def test_an_unfinished_dataset_folder_is_generated_again(tmp_path):
    options = learn.synthetic_options("crowdhuman", TINY_CROWDHUMAN)
    root = learn.dataset_folder(tmp_path, "crowdhuman", 0, options)
    (root / "leftover").mkdir(parents=True)  # an interrupted write: no completion marker

    found, generated = learn.synthetic_dataset(tmp_path, "crowdhuman", 0, TINY_CROWDHUMAN)
    assert (found, generated) == (root, True)
    assert not (root / "leftover").exists()


def test_a_format_without_a_generator_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'market1501' has no synthetic generator"):
        learn.synthetic_dataset(tmp_path, "market1501", 0, {})


def search_result(trained: dict[str, float], untrained: dict[str, float]) -> learn.ConfigResult:
    return learn.ConfigResult(
        config_path=Path("configs/tiny/alignps_synthetic.yaml"),
        dataset="prw",
        data_root=Path("data"),
        parameters=1,
        untrained=learn.Evaluation(untrained, seconds=1.0),
        trained=learn.Evaluation(trained, seconds=1.0),
        training=learn.TrainingRecord(iterations=10, seconds=5.0),
    )


def test_search_verdicts_compare_each_figure_with_its_target():
    # mAP 0.62 >= 0.60 is met; top-1 0.65 < 0.70 is not; 0.62 / 0.25 = 2.48x < 3x is not.
    result = search_result({"mAP": 0.62, "top1": 0.65}, {"mAP": 0.25, "top1": 0.3})
    verdicts = [line.split(": ", 1)[1] for line in learn.search_verdicts(result)]
    assert verdicts == [
        "mAP 62.00 >= 60: yes",
        "top-1 65.00 >= 70: NO",
        "mAP trained / untrained 2.5x >= 3x: NO",
    ]


def test_an_untrained_map_of_zero_makes_any_trained_map_infinitely_better():
    assert learn.ratio(0.5, 0.0) == math.inf
    assert math.isnan(learn.ratio(0.0, 0.0))
    assert learn.format_ratio(learn.ratio(0.0, 0.0)) == "-"
    result = search_result({"mAP": 0.61, "top1": 0.8}, {"mAP": 0.0, "top1": 0.0})
    assert learn.search_verdicts(result)[-1].endswith("inf >= 3x: yes")
    nothing = search_result({"mAP": 0.0, "top1": 0.0}, {"mAP": 0.0, "top1": 0.0})
    assert learn.search_verdicts(nothing)[-1].endswith("- >= 3x: NO")
