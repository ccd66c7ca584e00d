"""Helpers of the service tests: a tiny exported model, test settings, running apps, images.

The model is the tiny AlignPS of configs/tiny/alignps_synthetic.yaml with its score threshold
at 0, so that even random weights "detect" persons (``MAX_DETECTIONS`` per image, scores around
0.01, boxes of about 32 x 64 pixels in a 128 x 96 scene): the tests check the service, not the
model's accuracy.
"""

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml
from fastapi import FastAPI
from PIL import Image

import models
from export import artifact
from server.app import create_app
from server.lifecycle import EngineLoader
from server.settings import ServerSettings

TINY_CONFIG = Path(__file__).parents[2] / "configs" / "tiny" / "alignps_synthetic.yaml"
API_KEY = "test-key"
MAX_DETECTIONS = 5  # persons per image: enough to choose from, few to store


def write_model_folder(folder: Path, detection_threshold: float | None = None) -> Path:
    """An exported model folder (manifest + weights: what the torch backend loads) of the
    tiny AlignPS, randomly initialised, recommending ``detection_threshold`` (None: none, as
    folders exported before psearch.json recorded it)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    config["inference"].update(score_thresh=0.0, max_detections=MAX_DETECTIONS)
    config["preprocess"].update(min_size=96, max_size=128)  # the test scenes' own size: fast
    torch.manual_seed(0)
    model = models.build_model(config).eval()
    # Random regression weights give zero-area boxes; a bias of (2, 4, 2, 4) strides (stride 8)
    # from each location makes person-shaped 32 x 64 pixel boxes, which queries can aim at.
    with torch.no_grad():
        model.head.bbox_pred.bias.copy_(torch.tensor([2.0, 4.0, 2.0, 4.0]))
    manifest = artifact.build_manifest(model, detection_threshold)
    folder.mkdir(parents=True, exist_ok=True)
    artifact.write_weights(model, folder, manifest)
    artifact.write_model_manifest(manifest, folder)
    return folder


def make_settings(model_dir: Path, folder: Path, **changes) -> ServerSettings:
    """Settings of a test app: its own gallery, every detection stored, an API key."""
    values = {
        "model_dir": model_dir,
        "gallery_dir": folder / "gallery",
        "backend": "torch",
        "threads": 1,
        "min_detection_score": 0.0,
        "max_batch_size": 8,
        "max_wait_ms": 20,
        "api_keys": [API_KEY],
        "max_upload_bytes": 2 * 1024 * 1024,
        "max_image_pixels": 1_000_000,
        "top_k_max": 50,
    }
    return ServerSettings(**(values | changes))


@dataclass
class Running:
    """An app running its lifespan, and a client talking to it (with the API key)."""

    app: FastAPI
    client: httpx.AsyncClient


@asynccontextmanager
async def running_app(
    settings: ServerSettings,
    load_engine: EngineLoader | None = None,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[Running]:
    """``async with running_app(settings, load_engine) as service``: the app is started (its
    model loads in the background) and stopped at the end. Errors the app does not handle are
    raised in the test, unless ``raise_app_exceptions`` is False (then they are answered 500)."""
    app = create_app(settings, load_engine)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
        base_url="http://psearch",
        headers={"X-API-Key": API_KEY},
    )
    async with app.router.lifespan_context(app), client:
        yield Running(app, client)


async def wait_until_ready(client: httpx.AsyncClient, timeout_s: float = 30) -> httpx.Response:
    """Poll /readyz while it says "still loading"; the first other answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        response = await client.get("/readyz")
        if response.status_code != 503 or response.json()["error"]["code"] != "not_ready":
            return response
        if "loading" not in response.json()["error"]["message"]:
            return response  # not ready for good (loading failed)
        if loop.time() > deadline:
            raise AssertionError(f"not ready after {timeout_s} s: {response.json()}")
        await asyncio.sleep(0.02)


def scene(seed: int, width: int = 128, height: int = 96) -> np.ndarray:
    """A random (height, width, 3) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(pixels: np.ndarray | Image.Image, image_format: str = "PNG", **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_file(seed: int, name: str | None = None, **size) -> tuple[str, bytes, str]:
    """A multipart file tuple (name, bytes, media type) of a random PNG scene."""
    return (name or f"scene-{seed}.png", encode(scene(seed, **size)), "image/png")
