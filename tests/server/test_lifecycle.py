"""Starting, readiness, overload, authentication and stopping of the service."""

import asyncio
import dataclasses
import hashlib
import logging
import threading

import pytest

from indexer.store import Gallery
from server.lifecycle import load_runtime_engine
from tests.server.support import API_KEY, make_settings, png_file, running_app, wait_until_ready

pytestmark = pytest.mark.anyio


async def post_search(client, seed: int = 1, **headers):
    return await client.post("/v1/search", files={"image": png_file(seed)}, headers=headers)


async def test_the_service_is_alive_at_once_and_ready_once_loaded(settings):
    """While the (real) loader is held, /healthz answers, /readyz and the API say 503 "not
    ready" with Retry-After; once loaded, both are ready."""
    gate = threading.Event()

    def held_loader(settings):
        gate.wait(timeout=30)
        return load_runtime_engine(settings)

    async with running_app(settings, held_loader) as service:
        client = service.client
        try:
            assert (await client.get("/healthz")).status_code == 200
            for response in (await client.get("/readyz"), await post_search(client)):
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "not_ready"
                assert response.headers["Retry-After"] == str(settings.retry_after_s)
        finally:
            gate.set()
        assert (await wait_until_ready(client)).status_code == 200
        assert (await post_search(client)).status_code == 200


async def test_a_gallery_of_another_model_is_refused_with_409(settings, engine):
    Gallery.create(settings.gallery_dir, "sha256:another-model", engine.info.dim).close()
    async with running_app(settings, lambda _: engine) as service:
        ready = await wait_until_ready(service.client)
        stats = await service.client.get("/v1/gallery/stats")
    for response in (ready, stats):
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "model_mismatch"
        assert "sha256:another-model" in response.json()["error"]["message"]


async def test_without_a_gallery_and_without_create_the_service_is_not_ready(
    model_dir, tmp_path, engine
):
    settings = make_settings(model_dir, tmp_path, create_gallery=False)
    async with running_app(settings, lambda _: engine) as service:
        ready = await wait_until_ready(service.client)
    assert ready.status_code == 503
    assert "no gallery" in ready.json()["error"]["message"]
    assert "Retry-After" not in ready.headers  # retrying will not help


class HeldEngine:
    """The real engine, whose detect can be held at a gate (to fill the queue)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.manifest = engine.manifest
        self.holding = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def detect(self, images):
        if self.holding:
            self.entered.set()
            self.gate.wait(timeout=30)
        return self.engine.detect(images)

    def embed_query(self, image, box=None):
        return self.engine.embed_query(image, box)


async def test_a_full_queue_answers_503_with_retry_after_and_recovers(model_dir, tmp_path, engine):
    """Queue of 1, batches of 1: search A holds the worker, B waits in the queue, C is refused
    at once; when the worker is released A and B are answered, and later searches too."""
    settings = make_settings(
        model_dir,
        tmp_path,
        queue_size=1,
        max_images_per_request=1,
        max_batch_size=1,
        retry_after_s=7,
    )
    held = HeldEngine(engine)
    async with running_app(settings, lambda _: held) as service:
        client = service.client
        await wait_until_ready(client)
        batcher = service.app.state.service_state.services.batcher
        held.holding = True
        try:
            first = asyncio.ensure_future(post_search(client, 1))
            assert await asyncio.to_thread(held.entered.wait, 30)
            second = asyncio.ensure_future(post_search(client, 2))
            while batcher.depth < 1:
                await asyncio.sleep(0.01)

            refused = await post_search(client, 3)

            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["Retry-After"] == "7"
        finally:
            held.holding = False
            held.gate.set()
        assert [(await first).status_code, (await second).status_code] == [200, 200]
        assert (await post_search(client, 4)).status_code == 200


class RecommendingEngine(HeldEngine):
    """The real engine, its model folder recommending ``threshold``."""

    def __init__(self, engine, threshold) -> None:
        super().__init__(engine)
        self.info = dataclasses.replace(engine.info, detection_threshold=threshold)


@pytest.mark.parametrize(
    ("setting", "recommended", "used"),
    [(None, 0.0, 0.0), (None, None, 0.5), (0.0, 0.9, 0.0)],
    ids=["the folder's threshold", "a folder without one: 0.5", "a setting overrides it"],
)
async def test_persons_are_stored_from_the_model_folders_threshold_unless_a_setting_says(
    model_dir, tmp_path, engine, caplog, setting, recommended, used
):
    """The tiny model scores its 5 detections about 0.01. The service used to store from 0.5
    whatever the model's own config evaluates with, so an upload stored nobody."""
    settings = make_settings(model_dir, tmp_path, min_detection_score=setting)
    caplog.set_level(logging.WARNING, logger="server.lifecycle")
    async with running_app(settings, lambda _: RecommendingEngine(engine, recommended)) as service:
        ready = (await wait_until_ready(service.client)).json()
        added = await service.client.post("/v1/gallery/images", files={"images": png_file(1)})
    assert ready["min_detection_score"] == used
    assert ready["model"]["detection_threshold"] == recommended
    assert added.json()["images"][0]["num_persons"] == (5 if used == 0.0 else 0)
    warned = "recommends no detection threshold" in caplog.text
    assert warned == (setting is None and recommended is None)


async def test_api_keys_guard_the_api_but_not_health_and_metrics(client):
    without_key = {"X-API-Key": ""}
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path, headers=without_key)).status_code == 200
    assert (await client.get("/v1/gallery/stats", headers=without_key)).status_code == 401
    assert (await client.get("/v1/gallery/stats")).status_code == 200


async def test_without_configured_keys_no_key_is_needed(model_dir, tmp_path, engine):
    settings = make_settings(model_dir, tmp_path, api_keys=[])
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        service.client.headers.pop("X-API-Key")
        assert (await service.client.get("/v1/gallery/stats")).status_code == 200


async def test_any_of_several_keys_is_accepted(model_dir, tmp_path, engine):
    settings = make_settings(model_dir, tmp_path, api_keys=["first", API_KEY])
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        for key in ("first", API_KEY):
            response = await service.client.get("/v1/gallery/stats", headers={"X-API-Key": key})
            assert response.status_code == 200


async def test_a_stopped_service_leaves_its_gallery_saved_for_the_next_start(settings, engine):
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        files = [("images", png_file(1)), ("images", png_file(2))]
        added = await service.client.post("/v1/gallery/images", files=files)
        assert added.status_code == 200

    # Closing the gallery wrote its index snapshot: nothing is left to replay.
    with Gallery.open(settings.gallery_dir, engine.info.fingerprint) as gallery:
        stats = gallery.stats()
    assert (stats.num_images, stats.pending) == (2, 0)

    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        search = await post_search(service.client, 3)
    assert {hit["image_id"] for hit in search.json()["hits"]} == {
        image["image_id"] for image in added.json()["images"]
    }


async def test_a_start_after_a_kill_removes_the_files_the_kill_left(settings, engine):
    """A kill (SIGKILL, power loss) can leave a half-written upload (a temporary file beside
    where it was going) and the file of an upload whose transaction never committed. Nothing
    used to remove them; the next start does, and keeps the files of stored images."""
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        added = await service.client.post("/v1/gallery/images", files={"images": png_file(1)})
    [stored] = added.json()["images"]
    kept_hash = stored["sha256"]
    files = settings.gallery_dir / "files"
    kept = files / kept_hash[:2] / kept_hash
    orphan_hash = hashlib.sha256(b"never committed").hexdigest()
    orphan = files / orphan_hash[:2] / orphan_hash
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"never committed")
    temporary = kept.with_name(f".{orphan_hash}.5eed5eed.tmp")
    temporary.write_bytes(b"half an upload")
    (settings.gallery_dir / "gallery.lock").write_text("open\n")  # what a killed owner leaves

    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        served = await service.client.get(f"/v1/gallery/images/{stored['image_id']}/file")

    assert served.status_code == 200 and kept.exists()
    assert not orphan.exists() and not temporary.exists()


class FailingEngine(HeldEngine):
    """The real engine, whose detect fails on demand (a backend error)."""

    def detect(self, images):
        if self.holding:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.engine.detect(images)


async def test_an_engine_failure_is_a_500_in_the_error_shape_and_the_service_goes_on(
    settings, engine
):
    failing = FailingEngine(engine)
    async with running_app(settings, lambda _: failing, raise_app_exceptions=False) as service:
        await wait_until_ready(service.client)
        failing.holding = True
        response = await post_search(service.client)
        assert response.status_code == 500
        assert response.json() == {
            "error": {"code": "internal", "message": "internal error (see the server log)"}
        }
        failing.holding = False
        assert (await post_search(service.client)).status_code == 200
