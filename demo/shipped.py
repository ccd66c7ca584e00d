"""The demo's shipped model: a tiny model the project trained itself, so that ``make demo`` serves
a good search at once on any machine instead of training for minutes on it.

The folder ``demo/model/`` is a model folder as ``psearch-export`` writes it, plus its card:

- ``card.json``: how the model was made (the exact command, config, seed, training time and
  iterations, the machine and its load), what it scored on the demo's synthetic test split
  (the protocol's figures and the demo's own check through the HTTP API), its fingerprint, and
  its answer to a probe frame (``probe.png``, one of the test frames);
- ``MODEL_CARD.md``: the same, to read.

The model fits the code while the folder loads with today's model code and gives the probe the
answer its card recorded (within float rounding): a change to the model code that changes what
the weights compute makes the demo train a new model and the shipped model's test fail, until
someone ships a new one with ``python -m demo.ship``.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from demo.options import REPOSITORY
from export.artifact import ArtifactError, read_model_manifest
from export.runtime import BackendUnavailableError, load_engine
from indexer.images import decode_image

SHIPPED_DIR = REPOSITORY / "demo" / "model"
CARD_FILE = "card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
PROBE_FILE = "probe.png"
PROBE_DETECTIONS = 5  # the probe's top detections recorded in the card
# How far today's answer to the probe may be from the card's: float rounding, not a new model.
BOX_TOLERANCE = 0.05  # pixels
SCORE_TOLERANCE = 1e-4
EMBEDDING_TOLERANCE = 1e-4


def read_card(model_dir: Path) -> dict[str, Any]:
    """The card of a shipped model folder; ArtifactError when there is none."""
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise ArtifactError(f"{model_dir}: no {CARD_FILE}; not a shipped model folder")
    return json.loads(path.read_text())


def probe_answer(model_dir: Path) -> dict[str, list]:
    """The model's top detections on the probe frame (PyTorch, CPU): boxes, scores and
    embeddings, as plain lists for the card."""
    engine = load_engine(model_dir, "torch", "cpu")
    image = decode_image((model_dir / PROBE_FILE).read_bytes())
    detections = engine.detect([image])[0]
    top = slice(0, PROBE_DETECTIONS)
    return {
        "boxes": detections.boxes[top].tolist(),
        "scores": detections.scores[top].tolist(),
        "embeddings": detections.embeddings[top].tolist(),
    }


def misfits(model_dir: Path) -> list[str]:
    """Why the shipped model does not fit today's code; empty when it does."""
    try:
        card = read_card(model_dir)
        manifest = read_model_manifest(model_dir)
        answer = probe_answer(model_dir)
    except (ArtifactError, BackendUnavailableError, OSError, ValueError) as error:
        return [f"it does not load: {error}"]
    problems = []
    if manifest.fingerprint != card["fingerprint"]:
        problems.append(
            f"its weights or config changed: fingerprint {manifest.fingerprint}, card "
            f"{card['fingerprint']}"
        )
    expected = card["probe"]
    for key, tolerance in (
        ("boxes", BOX_TOLERANCE),
        ("scores", SCORE_TOLERANCE),
        ("embeddings", EMBEDDING_TOLERANCE),
    ):
        now, then = np.asarray(answer[key]), np.asarray(expected[key])
        if now.shape != then.shape or not np.allclose(now, then, rtol=0, atol=tolerance):
            difference = np.abs(now - then).max() if now.shape == then.shape else "shape"
            problems.append(
                f"today's code answers the probe frame differently ({key}: {difference})"
            )
    return problems
