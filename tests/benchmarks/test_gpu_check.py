"""benchmarks/gpu_check.py: on a machine without a GPU every part is skipped with its reason and
the run succeeds; the model parts, run on the tiny configs on the CPU (``--smoke``), work.

The GPU run itself (``PYTHONPATH=. python benchmarks/gpu_check.py --out DIR``) needs a GPU
machine; these tests keep the script from rotting where there is none.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the parts would run")
def test_without_a_gpu_every_part_is_skipped_with_its_reason_and_the_run_succeeds(tmp_path):
    # As on a bare GPU machine: a plain checkout, the repository on PYTHONPATH.
    environment = {**os.environ, "PYTHONPATH": "."}
    process = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "skipped", (name, part)
        assert part["reason"], name
        assert f"== {name}: skipped" in process.stdout
    # The model parts find every paper config by itself, new families included.
    configs = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
    assert configs
    for name in ("latency", "training", "cuda_graphs"):
        assert all(config in report["parts"][name]["reason"] for config in configs), name
    assert report["machine"]["plugin_ptx_isa"] == "8.7"


def test_the_smoke_run_takes_every_tiny_config_through_inference_and_amp_training(tmp_path):
    arguments = ["--out", str(tmp_path), "--smoke", "--parts", "latency", "training"]
    assert gpu_check.main([*arguments, "--repeat", "1", "--train-iterations", "1"]) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    tiny = {path.stem for path in (ROOT / "configs/tiny").glob("*.yaml")}
    assert parts["latency"]["status"] == parts["training"]["status"] == "ok"
    assert {row["config"] for row in parts["latency"]["rows"]} == tiny
    assert {row["precision"] for row in parts["latency"]["rows"]} == {"fp32", "amp"}
    assert {row["config"] for row in parts["training"]["rows"]} == tiny
    assert all(row["losses_finite"] for row in parts["training"]["rows"])


def test_a_config_that_does_not_build_fails_its_part_and_the_run(tmp_path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: no_such_model\n")
    smoke = gpu_check.SMOKE_RUN
    monkeypatch.setattr(
        gpu_check, "SMOKE_RUN", type(smoke)(**{**smoke.__dict__, "configs": (broken,)})
    )
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--smoke", "--parts", "latency"]) == 1
    part = json.loads((out / "gpu_check.json").read_text())["parts"]["latency"]
    assert part["status"] == "failed"
    assert "broken.yaml: does not build" in part["failures"][0]


def test_a_package_missing_on_a_bare_machine_skips_the_part_and_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    monkeypatch.setitem(sys.modules, "training.config", None)
    assert gpu_check.main(["--out", str(tmp_path), "--smoke", "--parts", "training"]) == 0
    part = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["training"]
    assert part["status"] == "skipped"
    assert "is not installed" in part["reason"] and "carry its wheel" in part["reason"]
