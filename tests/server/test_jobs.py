"""Bulk indexing jobs: ``POST /v1/gallery/jobs`` and following them, path safety, restarts.

Every app here may read the ``allowed`` folder only; ``outside`` is a sibling folder with an
image in it, which every escape attempt aims at.
"""

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from indexer.jobs import JobStore
from indexer.store import Gallery
from server.settings import ServerSettings
from tests.hostile_files import fifo, sparse_file
from tests.server.support import (
    encode,
    make_settings,
    png_file,
    running_app,
    scene,
    wait_until_ready,
)

pytestmark = pytest.mark.anyio

SCENE_SHAPE = (96, 128)  # (height, width) of support.scene: what jobs index here
FINISHED = ("done", "failed", "cancelled")


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.png").write_bytes(encode(scene(99)))
    return folder


@pytest.fixture
def settings(model_dir: Path, tmp_path: Path, allowed: Path) -> ServerSettings:
    """Overrides conftest's: the apps of these tests may index ``allowed``."""
    return make_settings(model_dir, tmp_path, allowed_roots=[allowed])


def write_scenes(folder: Path, seeds, prefix: str = "frame") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"{prefix}{seed:02d}.png"
        path.write_bytes(encode(scene(seed)))
        paths.append(path)
    return paths


async def wait_for_job(client, job_id: int, timeout_s: float = 30) -> dict:
    """Poll the job until it has finished; its last report."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(f"/v1/gallery/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in FINISHED:
            return job
        assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout_s} s: {job}"
        await asyncio.sleep(0.05)


async def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout_s} s"
        await asyncio.sleep(0.01)


class PacedEngine:
    """The shared engine, taking ``seconds`` longer per batch, counting the scene images it
    detects (the warm-up's 64 x 64 image is not a scene)."""

    def __init__(self, engine, seconds: float = 0.0) -> None:
        self.engine, self.info, self.manifest = engine, engine.info, engine.manifest
        self.seconds = seconds
        self.scenes = 0

    def detect(self, images):
        time.sleep(self.seconds)
        found = self.engine.detect(images)
        self.scenes += sum(image.shape[:2] == SCENE_SHAPE for image in images)
        return found

    def embed_query(self, image, box=None):
        return self.engine.embed_query(image, box)


class GatedEngine(PacedEngine):
    """The shared engine, holding its first batch of scenes at a gate: ``entered`` is set once
    that batch arrives, which then waits for ``gate``."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.entered, self.gate = threading.Event(), threading.Event()

    def detect(self, images):
        if any(image.shape[:2] == SCENE_SHAPE for image in images) and not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().detect(images)


async def held_at_the_gate(gated: GatedEngine) -> None:
    assert await asyncio.to_thread(gated.entered.wait, 30), "no job batch reached the engine"


@asynccontextmanager
async def gated_service(settings: ServerSettings, gated: GatedEngine) -> AsyncIterator:
    """A ready app on ``gated``; its client."""
    async with running_app(settings, lambda _: gated) as service:
        await wait_until_ready(service.client)
        yield service.client


# -- jobs run ----------------------------------------------------------------------------


async def test_a_folder_job_indexes_the_folder_and_its_images_become_searchable(client, allowed):
    frames = write_scenes(allowed / "gate", [1, 2, 3])
    [deeper] = write_scenes(allowed / "gate" / "night", [4])
    (allowed / "gate" / "notes.txt").write_text("not an image: a folder listing leaves it out")

    response = await client.post(
        "/v1/gallery/jobs", json={"paths": [str(allowed / "gate")], "recursive": True}
    )

    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["Location"] == f"http://psearch/v1/gallery/jobs/{job_id}"
    assert response.json()["total"] == 4
    job = await wait_for_job(client, job_id)
    assert job["status"] == "done"
    counts = [job[key] for key in ("total", "done", "added", "duplicates", "failed")]
    assert counts == [4, 4, 4, 0, 0]
    listed = (await client.get("/v1/gallery/jobs")).json()["jobs"]
    assert [(entry["id"], entry["status"]) for entry in listed] == [(job_id, "done")]

    # Images are stored in job order (the folder's files by name, then its subfolder's), each
    # under its path on the server.
    images = [(await client.get(f"/v1/gallery/images/{i}")).json() for i in (1, 2, 3, 4)]
    assert [image["uri"] for image in images] == [str(path) for path in [*frames, deeper]]
    served = await client.get("/v1/gallery/images/2/file")
    assert served.content == frames[1].read_bytes()

    # A query with a stored person's own box finds that person first (see test_api.py).
    person = images[1]["persons"][0]
    box = ",".join(repr(value) for value in person["box"])
    found = await client.post("/v1/search", files={"image": png_file(2)}, data={"box": box})
    assert found.status_code == 200, found.text
    assert found.json()["hits"][0]["person_id"] == person["id"]


async def test_a_manifest_job_takes_cameras_and_times_from_it_and_reports_what_failed(
    client, allowed
):
    first, second = write_scenes(allowed / "cam", [5, 6])
    (allowed / "cam" / "copy.png").write_bytes(first.read_bytes())
    (allowed / "broken.png").write_bytes(b"these bytes are not an image")
    manifest = allowed / "manifest.csv"
    manifest.write_text(
        "path,camera,timestamp\n"
        "cam/frame05.png,north,2024-05-01T08:30:00Z\n"
        f"{second},,1000\n"  # an absolute path; camera: the job's
        "cam/copy.png,north,\n"  # the bytes of the first image again
        "broken.png,,\n"
    )

    response = await client.post(
        "/v1/gallery/jobs", json={"manifest": str(manifest), "camera": "south", "name": "m"}
    )

    assert response.status_code == 202, response.text
    job = await wait_for_job(client, response.json()["id"])
    assert (job["status"], job["name"]) == ("done", "m")
    counts = [job[key] for key in ("total", "done", "added", "duplicates", "failed")]
    assert counts == [4, 4, 2, 1, 1]
    [failure] = job["failures"]
    assert failure["path"] == str(allowed / "broken.png")
    assert "not an image" in failure["reason"]
    stored = [(await client.get(f"/v1/gallery/images/{i}")).json() for i in (1, 2)]
    # 2024-05-01T08:30:00Z is 19844 days and 8.5 hours after 1970-01-01: 1714552200 s.
    assert [(s["uri"], s["camera"], s["timestamp"]) for s in stored] == [
        (str(first), "north", 1714552200.0),
        (str(second), "south", 1000.0),
    ]


async def test_a_job_name_is_unique(client, allowed):
    [frame] = write_scenes(allowed, [7])
    body = {"paths": [str(frame)], "name": "nightly"}
    assert (await client.post("/v1/gallery/jobs", json=body)).status_code == 202

    again = await client.post("/v1/gallery/jobs", json=body)

    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_name_taken"
    assert "nightly" in again.json()["error"]["message"]


async def test_an_unknown_job_is_404(client):
    response = await client.get("/v1/gallery/jobs/12345")
    assert response.status_code == 404
    assert response.json()["error"] == {"code": "not_found", "message": "no job with id 12345"}


async def test_the_job_endpoints_need_the_api_key(client, allowed):
    [frame] = write_scenes(allowed, [8])
    requests = [
        ("POST", "/v1/gallery/jobs", {"paths": [str(frame)]}),
        ("GET", "/v1/gallery/jobs", None),
        ("GET", "/v1/gallery/jobs/1", None),
    ]
    for method, url, body in requests:
        missing = await client.request(method, url, json=body, headers={"X-API-Key": ""})
        wrong = await client.request(method, url, json=body, headers={"X-API-Key": "guess"})
        assert (missing.status_code, wrong.status_code) == (401, 403), url
        assert wrong.json()["error"]["code"] == "forbidden"
    assert (await client.get("/v1/gallery/jobs")).json()["jobs"] == []  # nothing was queued


# -- path safety -------------------------------------------------------------------------


def dot_dot(allowed: Path, outside: Path) -> tuple[dict, str]:
    path = f"{allowed}/../outside"
    return {"paths": [path]}, path


def absolute_elsewhere(allowed: Path, outside: Path) -> tuple[dict, str]:
    return {"paths": [str(outside / "secret.png")]}, str(outside / "secret.png")


def symlink_to_a_folder_outside(allowed: Path, outside: Path) -> tuple[dict, str]:
    (allowed / "shortcut").symlink_to(outside, target_is_directory=True)
    return {"paths": [str(allowed / "shortcut")]}, str(allowed / "shortcut")


def symlinked_image_in_an_allowed_folder(allowed: Path, outside: Path) -> tuple[dict, str]:
    write_scenes(allowed / "cam", [1])
    (allowed / "cam" / "frame02.png").symlink_to(outside / "secret.png")
    return {"paths": [str(allowed / "cam")]}, str(allowed / "cam" / "frame02.png")


def manifest_outside(allowed: Path, outside: Path) -> tuple[dict, str]:
    (outside / "list.csv").write_text("path\nsecret.png\n")
    return {"manifest": str(outside / "list.csv")}, str(outside / "list.csv")


def manifest_entry_going_up(allowed: Path, outside: Path) -> tuple[dict, str]:
    write_scenes(allowed, [1])
    (allowed / "list.csv").write_text("path\nframe01.png\n../outside/secret.png\n")
    return {"manifest": str(allowed / "list.csv")}, "entry 2"


def manifest_entry_absolute_elsewhere(allowed: Path, outside: Path) -> tuple[dict, str]:
    (allowed / "list.jsonl").write_text(f'{{"path": "{outside / "secret.png"}"}}\n')
    return {"manifest": str(allowed / "list.jsonl")}, str(outside / "secret.png")


@pytest.mark.parametrize(
    "escape",
    [
        dot_dot,
        absolute_elsewhere,
        symlink_to_a_folder_outside,
        symlinked_image_in_an_allowed_folder,
        manifest_outside,
        manifest_entry_going_up,
        manifest_entry_absolute_elsewhere,
    ],
)
async def test_a_path_resolving_outside_the_allowed_roots_is_refused_with_403(
    client, allowed, outside, escape
):
    body, offending = escape(allowed, outside)

    response = await client.post("/v1/gallery/jobs", json=body)

    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "path_not_allowed"
    assert offending in error["message"]
    assert "outside the allowed roots" in error["message"]
    assert (await client.get("/v1/gallery/jobs")).json()["jobs"] == []


async def test_without_allowed_roots_no_server_path_is_indexed(model_dir, tmp_path, engine):
    [frame] = write_scenes(tmp_path / "images", [1])
    settings = make_settings(model_dir, tmp_path)  # allowed_roots: none
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        response = await service.client.post("/v1/gallery/jobs", json={"paths": [str(frame)]})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "path_not_allowed"
    assert "no allowed_roots" in response.json()["error"]["message"]


async def test_malformed_job_requests_are_422_saying_what_is_wrong(client, allowed):
    write_scenes(allowed / "cam", [1])
    (allowed / "empty").mkdir()
    cases = [
        ({}, "give `paths`, a `manifest`, or both"),
        ({"paths": ["cam"]}, "'cam' is relative"),
        ({"paths": [f"{allowed}/cam\x00.png"]}, "NUL"),
        ({"paths": [str(allowed / "cam")], "recurse": True}, "recurse"),
        ({"paths": [str(allowed / "missing")]}, f"no such file or folder: {allowed}/missing"),
        ({"paths": [str(allowed / "empty")]}, "no image files found"),
        ({"manifest": str(allowed / "cam" / "frame01.png")}, "a manifest is .csv or JSON lines"),
        ({"paths": [str(allowed / "cam")], "camera": "c" * 257}, "at most 256 characters"),
    ]
    for body, message in cases:
        response = await client.post("/v1/gallery/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["code"] == "invalid_field"
        assert message in response.json()["error"]["message"], body


async def test_a_job_name_no_database_can_hold_is_422(client, allowed):
    """JSON may escape an unpaired surrogate, which no UTF-8 text (and no SQLite) holds."""
    write_scenes(allowed, [1])
    body = f'{{"paths": ["{allowed}"], "name": "night\\ud800"}}'
    response = await client.post(
        "/v1/gallery/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("name:")


# -- jobs and the rest of the service ----------------------------------------------------


async def test_a_search_is_answered_while_a_job_runs(model_dir, tmp_path, allowed, engine):
    """Job images and queries share the batcher, first in, first out, and a job sends its next
    batch only once the last is answered: a query waits for about one job batch, not the job.
    Here the job takes 8 batches of 0.2 s; the query is answered while it still runs."""
    write_scenes(allowed, range(16))
    paced = PacedEngine(engine, seconds=0.2)
    settings = make_settings(model_dir, tmp_path, allowed_roots=[allowed], max_batch_size=2)
    async with running_app(settings, lambda _: paced) as service:
        client = service.client
        await wait_until_ready(client)
        job_id = (await client.post("/v1/gallery/jobs", json={"paths": [str(allowed)]})).json()[
            "id"
        ]
        await wait_until(lambda: paced.scenes >= 2)  # the job's first batch is done

        found = await client.post("/v1/search", files={"image": png_file(1)})

        assert found.status_code == 200, found.text
        job = (await client.get(f"/v1/gallery/jobs/{job_id}")).json()
        assert job["status"] == "running"


async def test_a_job_interrupted_by_a_shutdown_resumes_at_the_next_start_without_duplicates(
    model_dir, tmp_path, allowed, engine
):
    """Stopping the app stops the job after its current batch; what it finished is kept and
    the job goes back to the queue. The next app on the gallery resumes it, detecting only
    the images that were not done, and every image is stored once."""
    write_scenes(allowed, range(8))
    settings = make_settings(model_dir, tmp_path, allowed_roots=[allowed], max_batch_size=2)
    paced = PacedEngine(engine, seconds=0.25)  # 4 batches of 2: about 1 s of work
    async with running_app(settings, lambda _: paced) as first:
        await wait_until_ready(first.client)
        submitted = await first.client.post("/v1/gallery/jobs", json={"paths": [str(allowed)]})
        job_id = submitted.json()["id"]
        await wait_until(lambda: paced.scenes >= 2)
    # The app is stopped, its gallery closed: read what the job left.
    with Gallery.open(settings.gallery_dir, engine.info.fingerprint) as gallery:
        with JobStore(gallery) as jobs:
            stopped = jobs.get(job_id)
        images_after_first = gallery.stats().num_images
    assert stopped.status == "queued"
    assert "interrupted" in stopped.error
    assert 2 <= stopped.done < 8
    assert images_after_first == stopped.done

    counting = PacedEngine(engine)
    async with running_app(settings, lambda _: counting) as second:
        await wait_until_ready(second.client)
        job = await wait_for_job(second.client, job_id)
        stats = (await second.client.get("/v1/gallery/stats")).json()

    assert job["status"] == "done"
    counts = [job[key] for key in ("total", "done", "added", "duplicates", "failed")]
    assert counts == [8, 8, 8, 0, 0]
    assert counting.scenes == 8 - stopped.done  # the done images were skipped unread
    assert stats["num_images"] == 8


# -- hostile files and paths -------------------------------------------------------------


async def test_a_path_too_long_for_the_file_system_is_422_not_500(client, allowed):
    """A name longer than 255 bytes made looking at the path raise "File name too long"."""
    too_long = "x" * 300
    cases = [
        {"paths": [f"{allowed}/{too_long}"]},
        {"paths": [f"{allowed}/{too_long}/frame.png"]},
        {"manifest": f"{allowed}/{too_long}.csv"},
    ]
    for body in cases:
        response = await client.post("/v1/gallery/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert "File name too long" in response.json()["error"]["message"]


async def test_a_fifo_in_a_manifest_fails_alone_and_the_next_job_runs(client, allowed):
    """Opening a FIFO for reading waits for a writer: the job used to stay running at 0 with
    every later job queued behind it, and the service could not be stopped."""
    write_scenes(allowed, [1, 2])
    with fifo(allowed / "pipe.png") as pipe:
        (allowed / "list.csv").write_text("path\nframe01.png\npipe.png\n")
        first = await client.post("/v1/gallery/jobs", json={"manifest": str(allowed / "list.csv")})
        second = await client.post(
            "/v1/gallery/jobs", json={"paths": [str(allowed / "frame02.png")]}
        )
        listed, after = [await wait_for_job(client, r.json()["id"]) for r in (first, second)]
    counts = [listed[key] for key in ("status", "total", "done", "added", "failed")]
    assert counts == ["done", 2, 2, 1, 1]
    assert listed["failures"] == [
        {"path": str(pipe), "reason": f"{pipe} is a FIFO (named pipe), not a regular file"}
    ]
    assert (after["status"], after["added"]) == ("done", 1)


async def test_a_file_over_max_image_bytes_fails_unread(client, allowed):
    """A job read every file whole: a 1 GiB file took 1 GiB of memory before failing to
    decode. Just over the default limit (64 MiB, sparse here) is refused from its size."""
    write_scenes(allowed, [1])
    big = sparse_file(allowed / "big.png", 64 * 1024 * 1024 + 1)
    response = await client.post("/v1/gallery/jobs", json={"paths": [str(allowed)]})
    job = await wait_for_job(client, response.json()["id"])
    assert [job[key] for key in ("status", "added", "failed")] == ["done", 1, 1]
    assert job["failures"] == [
        {"path": str(big), "reason": f"{big} is 67108865 bytes; the limit is 67108864"}
    ]


async def test_a_folder_swapped_for_a_link_out_while_its_job_runs_is_not_read_through(
    model_dir, tmp_path, allowed, outside, engine
):
    """The job lists allowed/cam (checked inside the allowed roots); while its first image is
    detected, allowed/cam becomes a link to the outside folder, which holds other images under
    the same names. The job reads the rest after the swap: none of the outside images may be
    indexed (the check and the open used to be separate steps)."""
    names = [f"frame{seed:02d}.png" for seed in range(10)]
    for seed, name in enumerate(names):
        (allowed / "cam").mkdir(exist_ok=True)
        (allowed / "cam" / name).write_bytes(encode(scene(seed)))
        (outside / name).write_bytes(encode(scene(100 + seed)))
    secret = {hashlib.sha256((outside / name).read_bytes()).hexdigest() for name in names}
    gated = GatedEngine(engine)
    # One image per batch and two decoding threads: at most 2 * 2 + 1 files are read ahead of
    # the first detection; the other 5 are read after the swap.
    settings = make_settings(model_dir, tmp_path, allowed_roots=[allowed], max_batch_size=1)
    async with gated_service(settings, gated) as client:
        submitted = await client.post("/v1/gallery/jobs", json={"paths": [str(allowed / "cam")]})
        await held_at_the_gate(gated)
        (allowed / "cam").rename(allowed / "cam.before")
        (allowed / "cam").symlink_to(outside, target_is_directory=True)
        gated.gate.set()
        job = await wait_for_job(client, submitted.json()["id"])
        stored = [
            (await client.get(f"/v1/gallery/images/{image_id}")).json()["sha256"]
            for image_id in range(1, job["added"] + 1)
        ]
    assert job["status"] == "done" and job["added"] + job["failed"] == 10
    assert not secret & set(stored)
    assert job["failed"] >= 5
    assert all("outside the allowed roots" in f["reason"] for f in job["failures"])


# -- cancelling --------------------------------------------------------------------------


async def test_a_cancelled_job_stops_keeps_what_it_added_and_is_never_resumed(
    model_dir, tmp_path, allowed, engine
):
    """The running job is cancelled while its first batch is detected: it stops after that
    batch. The job queued behind it is cancelled before it starts: it never runs. Neither
    resumes when the service starts again."""
    write_scenes(allowed / "a", range(6))
    write_scenes(allowed / "b", range(6, 8))
    gated = GatedEngine(engine)
    settings = make_settings(model_dir, tmp_path, allowed_roots=[allowed], max_batch_size=2)
    async with gated_service(settings, gated) as client:
        running = await client.post("/v1/gallery/jobs", json={"paths": [str(allowed / "a")]})
        queued = await client.post("/v1/gallery/jobs", json={"paths": [str(allowed / "b")]})
        running_id, queued_id = running.json()["id"], queued.json()["id"]
        await held_at_the_gate(gated)

        cancel_queued = await client.post(f"/v1/gallery/jobs/{queued_id}/cancel")
        cancelling = asyncio.ensure_future(client.post(f"/v1/gallery/jobs/{running_id}/cancel"))
        await asyncio.sleep(0.2)  # the cancel waits for the job to stop: its batch is held
        assert not cancelling.done()
        gated.gate.set()
        cancel_running = await cancelling
        again = await client.post(f"/v1/gallery/jobs/{queued_id}/cancel")
        stats = (await client.get("/v1/gallery/stats")).json()

    assert cancel_queued.status_code == 200, cancel_queued.text
    assert (cancel_queued.json()["status"], cancel_queued.json()["done"]) == ("cancelled", 0)
    assert cancel_running.status_code == 200, cancel_running.text
    stopped = cancel_running.json()
    assert stopped["status"] == "cancelled" and stopped["error"] == "cancelled through the API"
    assert stopped["added"] == stats["num_images"] == 2  # the batch it was detecting
    assert (again.status_code, again.json()["status"]) == (200, "cancelled")

    async with gated_service(settings, gated) as client:
        await asyncio.sleep(0.3)  # a resumed job would start at once
        jobs = {j["id"]: j for j in (await client.get("/v1/gallery/jobs")).json()["jobs"]}
    assert [jobs[i]["status"] for i in (running_id, queued_id)] == ["cancelled", "cancelled"]
    assert [jobs[i]["done"] for i in (running_id, queued_id)] == [2, 0]


async def test_only_an_unfinished_job_can_be_cancelled(client, allowed):
    write_scenes(allowed, [1])
    done = await wait_for_job(
        client, (await client.post("/v1/gallery/jobs", json={"paths": [str(allowed)]})).json()["id"]
    )
    finished = await client.post(f"/v1/gallery/jobs/{done['id']}/cancel")
    unknown = await client.post("/v1/gallery/jobs/12345/cancel")
    assert (finished.status_code, finished.json()["error"]["code"]) == (409, "job_finished")
    assert "job 1 is done" in finished.json()["error"]["message"]
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
