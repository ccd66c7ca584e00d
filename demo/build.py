"""What the demo serves, built or taken from its cache: the data, the model folder, the gallery.

Each step reuses what an earlier demo left when it is complete (a marker or a manifest written
last says so), so a second ``make demo`` starts serving within a minute.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from common.run_folder import RUN_CONFIG_FILE, RUN_STATE_FILE
from demo.options import DEFAULT_CONFIG, REPOSITORY, DemoError, DemoOptions, Stage, Stages, log
from demo.shipped import SHIPPED_DIR, misfits, read_card
from export.artifact import MODEL_MANIFEST_FILE, ArtifactError, read_model_manifest
from export.cli import export_checkpoint
from export.runtime import load_engine
from indexer.ingest import ingest
from indexer.sources import ImageSource
from indexer.store import open_gallery_for
from models import build_model
from training.config import TrainConfig, load_config
from training.datasets import PersonSearchSplit, SceneAnnotation
from training.synthetic import cached_dataset
from training.trainer import Trainer

DATASET_FORMAT = "prw"
TRAINED_MARKER = "demo-complete.json"  # written last in a run folder: its training is finished
INGEST_BATCH = 8


# --- 1. data ----------------------------------------------------------------------------------


def synthetic_dataset(options: DemoOptions, stage: Stage) -> Path:
    """The dataset's root, generated unless a complete copy is cached (``cached_dataset``)."""
    root, generated = cached_dataset(
        options.data_dir, DATASET_FORMAT, options.seed, **options.synthetic
    )
    if generated is None:
        stage.note = f"reusing {root}"
        log(f"      reusing {root}")
    else:
        log(str(generated))
        stage.note = f"generated {root}"
    return root


# --- 2. the model folder --------------------------------------------------------------------


class DemoModel(NamedTuple):
    """A model folder (``psearch-export``'s) to serve, and the detection score from which its
    gallery stores persons."""

    model_dir: Path
    min_score: float


def model_folder(options: DemoOptions, data_root: Path, stages: Stages) -> DemoModel:
    """The model the demo serves: a tiny model trained on the synthetic data within the budget,
    then exported to ONNX, each step cached. Its detection threshold is the one its config
    evaluates with. This is the step to replace to serve another model (a pretrained one):
    anything that returns a model folder and a threshold will do."""
    budget = f"{options.config.name}, budget {options.minutes:g} min"
    with stages.run("training", budget) as stage:
        run_dir = trained_run(options, data_root, stage)
    with stages.run("export", "ONNX model folder") as stage:
        model_dir = exported_model(run_dir, options.parity, stage)
    min_score = load_config(run_dir / RUN_CONFIG_FILE).eval.det_thresh
    return DemoModel(model_dir, min_score)


def shipped_model(options: DemoOptions) -> DemoModel | None:
    """The shipped model (``demo/shipped.py``) when the options ask for what it was trained as
    (the default config and data, the card's seed, no --train) and it fits today's code; None
    otherwise, saying why when the reason is the code."""
    if not options.wants_shipped_model():
        return None
    try:
        card = read_card(SHIPPED_DIR)
    except ArtifactError:
        log(f"no shipped model in {SHIPPED_DIR}: training one")
        return None
    if card["seed"] != options.seed or REPOSITORY / card["config"] != DEFAULT_CONFIG:
        return None
    problems = misfits(SHIPPED_DIR)
    if problems:
        log(f"the shipped model no longer fits the code ({'; '.join(problems)}): training one")
        return None
    api = card["api"]
    log(
        f"serving the shipped model {SHIPPED_DIR} ({card['model']}, {card['fingerprint'][:19]}; "
        f"its card: API top-1 {api['right']}/{api['queries']}); --train trains a new one"
    )
    return DemoModel(SHIPPED_DIR, card["det_thresh"])


def digest(value: Any) -> str:
    """A short hash of JSON-able ``value``: cache folder names change with anything in it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def training_config(options: DemoOptions, data_root: Path, run_dir: Path) -> TrainConfig:
    """The config file with the demo's data, seed, run folder and time budget, and no
    evaluation."""
    overrides = [
        f"data.root={data_root}",
        f"seed={options.seed}",
        f"schedule.max_minutes={options.minutes}",
        "eval.at_end=false",  # the demo's own check searches the test split through the API
        "tensorboard=false",
        *options.overrides,
    ]
    config = load_config(options.config, overrides)
    config.output_dir = run_dir
    return config


def run_folder(options: DemoOptions, data_root: Path) -> Path:
    """The run's cache folder: keyed by the config file, overrides, seed, data and budget."""
    key = {
        "config": options.config.read_text(),
        "overrides": options.overrides,
        "seed": options.seed,
        "data": data_root.name,
        "minutes": options.minutes,
    }
    return options.data_dir / "runs" / f"{options.config.stem}-seed{options.seed}-{digest(key)}"


def trained_run(options: DemoOptions, data_root: Path, stage: Stage) -> Path:
    """The run folder of a model trained within the budget: cached, continued from its last
    checkpoint when an earlier demo was interrupted, else trained now. The trainer times its
    first iterations and keeps the config's epochs that fit the budget."""
    run_dir = run_folder(options, data_root)
    if (run_dir / TRAINED_MARKER).is_file():
        stage.note = f"reusing {run_dir}"
        log(f"      reusing {run_dir}")
        return run_dir
    resume = (run_dir / RUN_STATE_FILE).is_file()
    if resume:
        log(f"      continuing {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(training_config(options, data_root, run_dir), build_model, resume=resume)
    trainer.run()
    record = {
        "train_seconds": trainer.train_seconds,
        "iterations": trainer.iteration,
        "epochs": trainer.iteration / len(trainer.loader),
        "stopped_by": trainer.stopped_by,
    }
    (run_dir / TRAINED_MARKER).write_text(json.dumps(record) + "\n")
    epochs = trainer.iteration / len(trainer.loader)
    stage.note = (
        f"{trainer.iteration} iterations ({epochs:.1f} epochs) of {options.config.name} "
        f"in {run_dir}"
    )
    return run_dir


def exported_model(run_dir: Path, parity: bool, stage: Stage) -> Path:
    """The run's ONNX model folder, exported unless a checked export is cached."""
    model_dir = run_dir / "model"
    if (model_dir / MODEL_MANIFEST_FILE).is_file():
        stage.note = f"reusing {model_dir}"
        log(f"      reusing {model_dir}")
        return model_dir
    partial = run_dir / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _, report = export_checkpoint(run_dir, partial, parity=parity, log=lambda line: log(line))
    if report is not None and not report.passed:
        raise DemoError(
            f"ONNX Runtime does not reproduce the trained model (the files are in {partial})"
        )
    partial.rename(model_dir)
    stage.note = f"{model_dir} ({read_model_manifest(model_dir).name})"
    return model_dir


# --- 3. index ---------------------------------------------------------------------------------


def gallery_folder(options: DemoOptions, model_dir: Path) -> Path:
    """The demo's gallery of a model: one per model fingerprint (embeddings of two models are
    not comparable)."""
    fingerprint = read_model_manifest(model_dir).fingerprint
    return options.data_dir / "galleries" / fingerprint.removeprefix("sha256:")[:16]


def camera_name(annotation: SceneAnnotation) -> str | None:
    return f"c{annotation.camera}" if annotation.camera >= 0 else None


def indexed_gallery(
    model: DemoModel, split: PersonSearchSplit, gallery_dir: Path, stage: Stage
) -> dict[str, int]:
    """Index every test frame (the ingest skips frames already in the gallery); returns the
    gallery image id of each frame by its path: the image that holds its bytes."""
    engine = load_engine(model.model_dir, "auto", "cpu", batch_size=INGEST_BATCH)
    sources = [ImageSource(str(a.path), camera_name(a)) for a in split.images]
    info = engine.info
    with open_gallery_for(gallery_dir, info.fingerprint, info.dim) as gallery:
        summary = ingest(
            gallery, engine, sources, batch_size=INGEST_BATCH, min_score=model.min_score
        )
        if summary.failures:
            failure = summary.failures[0]
            raise DemoError(
                f"{summary.failed} test frames could not be read: {failure.path}: {failure.reason}"
            )
        ids = {
            source.path: gallery.image_by_sha256(_sha256(Path(source.path))).id
            for source in sources
        }
        stats = gallery.stats()
    log(f"      {summary.describe()}")
    reused = "" if summary.added else "reusing the gallery: "
    stage.note = (
        f"{reused}{stats.num_images} frames, {stats.num_persons} persons "
        f"(detection score >= {model.min_score:g}, {info.backend}) in {gallery_dir}"
    )
    return ids


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
