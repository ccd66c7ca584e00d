"""One image, one set of persons, whichever way it comes in: an upload, a bulk job of the
service and ``psearch-index add`` decode it with the same function and store the same persons.

The image is a PNG with transparency, the case the routes once decoded differently (uploads
composited it onto white, jobs and the command line dropped its alpha channel).
"""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from export.runtime import Engine
from indexer.cli import main as psearch_index
from indexer.images import decode_image
from indexer.store import Gallery
from tests.server.support import encode, make_settings, running_app, scene, wait_until_ready

pytestmark = pytest.mark.anyio


def transparent_png(path: Path) -> Path:
    """A scene whose alpha runs from opaque at the top to transparent at the bottom."""
    pixels = scene(11)
    alpha = np.linspace(255, 0, pixels.shape[0]).astype(np.uint8)[:, None, None]
    alpha = np.broadcast_to(alpha, (*pixels.shape[:2], 1))
    path.write_bytes(encode(np.concatenate([pixels, alpha], axis=2)))
    return path


def stored_persons(gallery_dir: Path) -> list[tuple]:
    """The gallery's one image, as its persons' (box, detection score) and their similarities
    to three fixed directions (which tell embeddings apart)."""
    with Gallery.open(gallery_dir, fingerprint=None) as gallery:
        assert gallery.stats().num_images == 1
        image = gallery.get_image(1)
        directions = np.random.default_rng(0).standard_normal((3, gallery.dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        hits = [gallery.search(direction, top_k=100) for direction in directions]
    similarity = {
        (hit.person_id, index): hit.similarity for index, found in enumerate(hits) for hit in found
    }
    return [
        (person.box, person.det_score, [similarity[person.id, i] for i in range(3)])
        for person in image.persons
    ]


def assert_same_persons(found: list[tuple], expected: list[tuple]) -> None:
    assert len(found) == len(expected)
    for (box, score, similarities), (box_e, score_e, similarities_e) in zip(
        found, expected, strict=True
    ):
        np.testing.assert_allclose(box, box_e, atol=1e-3)
        assert score == pytest.approx(score_e, abs=1e-5)
        np.testing.assert_allclose(similarities, similarities_e, atol=1e-4)


async def wait_for_job(client, job_id: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := (await client.get(f"/v1/gallery/jobs/{job_id}")).json())["status"] not in (
        "done",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    return job


async def test_a_transparent_png_gives_the_same_persons_by_upload_job_and_cli(
    tmp_path: Path, model_dir: Path, engine: Engine, capsys
):
    folder = tmp_path / "frames"
    folder.mkdir()
    image = transparent_png(folder / "cut-out.png")

    uploaded = make_settings(model_dir, tmp_path / "upload")
    async with running_app(uploaded, lambda _: engine) as service:
        await wait_until_ready(service.client)
        files = {"images": ("cut-out.png", image.read_bytes(), "image/png")}
        response = await service.client.post("/v1/gallery/images", files=files)
        assert response.status_code == 200, response.text

    by_job = make_settings(model_dir, tmp_path / "job", allowed_roots=[folder])
    async with running_app(by_job, lambda _: engine) as service:
        await wait_until_ready(service.client)
        response = await service.client.post("/v1/gallery/jobs", json={"paths": [str(folder)]})
        assert response.status_code == 202, response.text
        job = await wait_for_job(service.client, response.json()["id"])
        assert (job["status"], job["added"]) == ("done", 1), job

    command_line = tmp_path / "cli" / "gallery"
    argv = ["add", str(folder), "--gallery", str(command_line), "--model", str(model_dir),
            "--backend", "torch", "--min-score", "0", "--no-progress"]  # fmt: skip
    assert psearch_index(argv) == 0, capsys.readouterr().err

    expected = stored_persons(uploaded.gallery_dir)
    assert expected, "the tiny model detects persons in every image"
    assert_same_persons(stored_persons(by_job.gallery_dir), expected)
    assert_same_persons(stored_persons(command_line), expected)
    # What dropping the alpha channel would have stored is something else: the test can fail.
    dropped = engine.detect([decode_image(encode(scene(11)))])[0]
    composited = engine.detect([decode_image(image.read_bytes())])[0]
    assert not np.allclose(dropped.boxes, composited.boxes, atol=1e-3)
    np.testing.assert_allclose([box for box, _, _ in expected], composited.boxes, atol=1e-3)
