"""Helpers of the demo tests: a demo of a few frames, and a finished run in its cache."""

from pathlib import Path

import yaml

from common.run_folder import RUN_CONFIG_FILE
from demo import build
from demo.options import DemoOptions, Stage
from tests.server.support import TINY_CONFIG, write_model_folder

# A few frames (the generator's default difficulty): 2 training and 2 test identities.
TINY_DATA = {
    "train_images": 4,
    "test_images": 6,
    "train_identities": 2,
    "test_identities": 2,
    "progress": False,
}


def tiny_options(tmp_path: Path, **changes) -> DemoOptions:
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
    return DemoOptions(**(values | changes))


def cache_a_trained_run(options: DemoOptions) -> Path:
    """Put a finished run in the demo's cache, as an earlier demo would have left it: its
    config (every detection kept) and a model folder (the service tests' tiny model, which
    detects 5 "persons" per frame); returns the dataset's root."""
    data_root = build.synthetic_dataset(options, Stage("data"))
    run_dir = build.run_folder(options, data_root)
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["eval"]["det_thresh"] = 0.0
    run_dir.mkdir(parents=True)
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config))
    write_model_folder(run_dir / "model")
    (run_dir / build.TRAINED_MARKER).write_text("{}\n")
    return data_root
