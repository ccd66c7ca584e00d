"""benchmarks/learn.py: the script runs end to end, caches its data and judges its targets.

Nothing here is about accuracy: the smoke test trains for two iterations on a dataset of a few
images, which proves the plumbing, not the learning.
"""

import json
from pathlib import Path

import pytest

from benchmarks import learn

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
    assert set(rows) == {"untrained", "trained"}
    # Columns: config, model, MR^-2, AP, recall, iterations, training seconds.
    assert rows["untrained"][5] == "0" and rows["trained"][5] == "1"
    assert "stopped by schedule" in output
    (run,) = (tmp_path / "runs").iterdir()  # the trainer's run folder, checkpoint included
    assert (run / "model.safetensors").is_file() and (run / "state.pt").is_file()
    assert f"command: python benchmarks/learn.py --config {TINY_DETECTOR}" in output
    assert "1 threads" in output


def test_a_format_without_a_generator_is_a_config_error(tmp_path, capsys):
    argv = ["--config", str(TINY_DETECTOR), "--data-dir", str(tmp_path), "--set",
            "data.dataset=market1501"]  # fmt: skip
    assert learn.main(argv) == 2
    assert "'market1501'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def search_result(
    name: str, trained: list[dict[str, float]], model: str = "alignps"
) -> learn.ConfigResult:
    """A person search config's result with one trained run per metrics dict (seeds 0, 1, ...)."""
    runs = [
        learn.TrainedRun(seed, learn.TrainingRecord(iterations=10), learn.Evaluation(m, 1.0))
        for seed, m in enumerate(trained)
    ]
    return learn.ConfigResult(
        config_path=Path(f"configs/tiny/{name}.yaml"),
        model_name=model,
        dataset="prw",
        data_root=Path("data"),
        parameters=1,
        untrained=learn.Evaluation({"mAP": 0.0, "top1": 0.0}, seconds=1.0),
        runs=runs,
    )


def test_search_verdicts_compare_the_mean_over_seeds_with_each_target():
    # mAP (0.58 + 0.66) / 2 = 0.62 >= 0.60 is met; top-1 (0.75 + 0.79) / 2 = 0.77 < 0.80 is not.
    result = search_result("alignps", [{"mAP": 0.58, "top1": 0.75}, {"mAP": 0.66, "top1": 0.79}])
    verdicts = [line.split(": ", 1)[1] for line in learn.search_verdicts(result)]
    assert verdicts == ["mAP 62.00 >= 60: yes", "top-1 77.00 >= 80: NO"]


SPREAD = {"config": "a.yaml", "seeds": [0, 1, 2], "minutes": 20, "date": "2026-12-08"}


def test_a_papers_ordering_is_judged_against_the_measured_spread():
    alignps = search_result("alignps", [{"mAP": 0.50, "top1": 0.8}])
    leaps = search_result("leaps", [{"mAP": 0.52, "top1": 0.8}], model="leaps")
    wide = SPREAD | {"spread": {"mAP": 0.03, "top1": 0.05}}
    narrow = SPREAD | {"spread": {"mAP": 0.01, "top1": 0.05}}
    (within,) = learn.ordering_verdicts([alignps, leaps], wide)
    assert within.endswith("yes (mAP difference +2.00, within the spread of 3.00)")
    (beyond,) = learn.ordering_verdicts([leaps, alignps], narrow)
    assert beyond.endswith("yes (mAP difference +2.00, beyond the spread of 1.00)")
    (unmeasured,) = learn.ordering_verdicts([alignps, leaps], None)
    assert unmeasured.endswith("(mAP difference +2.00, spread not measured)")
    assert learn.ordering_verdicts([alignps], wide) == []  # no pair of the papers in the run


def test_the_spread_is_the_range_of_each_metric_over_the_seeds(tmp_path):
    runs = [{"mAP": 0.40, "top1": 0.70}, {"mAP": 0.46, "top1": 0.75}, {"mAP": 0.43, "top1": 0.69}]
    result = search_result("alignps", runs)
    assert learn.measured_spread(result) == pytest.approx({"mAP": 0.06, "top1": 0.06})
    record = learn.spread_record(result, ["--config", "a.yaml"], 20.0)
    assert record["seeds"] == [0, 1, 2] and record["minutes"] == 20.0
    path = tmp_path / "spread.json"
    path.write_text(json.dumps(record))
    assert learn.read_spread(path) == record
    assert "mAP 6.00, top-1 6.00 points" in learn.describe_spread(record)
    assert learn.read_spread(tmp_path / "none.json") is None
    assert "not measured" in learn.describe_spread(None)


def test_the_table_shows_each_seed_their_mean_and_the_reference():
    result = search_result("alignps", [{"mAP": 0.4, "top1": 0.6}, {"mAP": 0.5, "top1": 0.8}])
    reference = learn.ReferenceResult(
        Path("data"), 100, learn.Evaluation({"mAP": 0.7, "top1": 0.9, "det_ap": 1.0}, 1.0)
    )
    header, *lines = learn.metrics_table([result], learn.SEARCH_METRICS, [reference])
    assert header.split()[2:4] == ["mAP", "top-1"]  # the columns every result has
    assert [line.split()[:5] for line in lines] == [
        ["alignps.yaml", "untrained", "0.00", "0.00", "0"],
        ["alignps.yaml", "trained", "s0", "40.00", "60.00"],
        ["alignps.yaml", "trained", "s1", "50.00", "80.00"],
        ["alignps.yaml", "trained", "mean", "45.00", "70.00"],
        ["reference", "GT", "crops", "70.00", "90.00"],
    ]
