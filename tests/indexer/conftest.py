"""Fixtures of the gallery tests: a small gallery and images whose similarities are known, and
the tiny model the ingest tests run.

The query is the first axis e0 of an 8-dimensional space; ``person(s)`` is the unit vector
s e0 + sqrt(1 - s^2) e_k, whose cosine similarity to the query is exactly s, so expected
rankings can be read off the test itself.
"""

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from export import artifact
from indexer.store import Gallery
from indexer.types import NewImage

TINY_CONFIG = Path(__file__).parents[2] / "configs" / "tiny" / "alignps_synthetic.yaml"

DIM = 8
FINGERPRINT = "model-a"


@pytest.fixture
def gallery_path(tmp_path: Path) -> Path:
    return tmp_path / "gallery"


@pytest.fixture
def index_type() -> str:
    """The index type the gallery fixture is created with; tests that hold for every type a
    gallery can be created with parametrize it (``EVERY_CREATABLE_INDEX``)."""
    return "flat"


# The index types a new gallery can have (IVF types need stored embeddings to train on).
EVERY_CREATABLE_INDEX = pytest.mark.parametrize("index_type", ["flat", "hnsw"])


@pytest.fixture
def gallery(gallery_path: Path, index_type: str) -> Iterator[Gallery]:
    with Gallery.create(gallery_path, FINGERPRINT, DIM, index_type) as created:
        yield created


@pytest.fixture
def query() -> np.ndarray:
    """e0: the query of the similarity-based tests."""
    return np.eye(DIM, dtype=np.float32)[0]


@pytest.fixture
def person() -> Callable[..., np.ndarray]:
    """``person(s, axis=1)``: a unit embedding with cosine similarity ``s`` to the query."""

    def make(similarity: float, axis: int = 1) -> np.ndarray:
        vector = np.zeros(DIM, dtype=np.float32)
        vector[0], vector[axis] = similarity, np.sqrt(1 - similarity**2)
        return vector

    return make


@pytest.fixture
def image() -> Callable[..., NewImage]:
    """``image(*embeddings, camera=None, timestamp=None)``: a new image (distinct bytes each
    call) with one person per embedding, boxes (10i, 0, 10i + 5, 20), scores 0.9."""
    counter = itertools.count()

    def make(*embeddings: np.ndarray, camera: str | None = None, timestamp: float | None = None):
        count = len(embeddings)
        boxes = [[10 * i, 0, 10 * i + 5, 20] for i in range(count)]
        return NewImage(
            data=f"image {next(counter)}".encode(),
            boxes=np.array(boxes, dtype=np.float64).reshape(count, 4),
            scores=np.full(count, 0.9),
            embeddings=np.array(embeddings, dtype=np.float32).reshape(count, DIM),
            width=640,
            height=480,
            camera=camera,
            timestamp=timestamp,
        )

    return make


@pytest.fixture
def random_embeddings() -> Callable[[int, int], np.ndarray]:
    """``random_embeddings(n, seed)``: (n, DIM) random unit vectors."""

    def make(count: int, seed: int) -> np.ndarray:
        vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return make


def tiny_model_config() -> dict:
    """configs/tiny AlignPS at the test images' own size (64 x 96), keeping every one of its 6
    best detections (a random model scores about 0.01, below the config's threshold)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    config["preprocess"] = {"min_size": 64, "max_size": 96}
    config["inference"].update(score_thresh=0.0, max_detections=6, pre_nms_top_k=50)
    return config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported model folder (manifest + weights, what the runtime's PyTorch backend loads)
    of the tiny model, randomly initialised with seed 0."""
    torch.manual_seed(0)
    model = artifact.build_model(tiny_model_config()).eval()
    manifest = artifact.build_manifest(model)
    directory = tmp_path_factory.mktemp("model")
    artifact.write_weights(model, directory, manifest)
    artifact.write_model_manifest(manifest, directory)
    return directory
