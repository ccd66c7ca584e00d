"""Soak: the service is killed (SIGKILL) and started again, several times, while clients upload,
delete, search and run bulk jobs over HTTP on the loopback interface; then it is stopped with
SIGTERM, and the gallery it leaves must be consistent:

- files: every uploaded image has its file, and there is no other file (no file of a removed
  image, no temporary of a write cut short);
- rows: every upload acknowledged (200) and never deleted is stored, each image once;
- index: one vector per stored person;
- job reports: every job finished and added each of its (distinct) images exactly once, the
  image its report names holding that file's bytes, none counted as a duplicate of itself.

Bounded in time: a fixed number of kills at seeded moments, a deadline on every wait; about
half a minute on two cores, most of it the service starting (importing torch).
"""

import contextlib
import hashlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from indexer.jobs import JobStore
from indexer.store import SQLITE_FILE, Gallery
from tests.server.support import API_KEY, encode, scene

KILLS = 3
RUN_BEFORE_KILL_S = (0.6, 1.6)  # the service serves this long (seeded) before each kill
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
DELETABLE = range(0, 6)  # upload seeds the deleter removes (racing re-uploads of them)
KEPT = range(6, 12)  # upload seeds nobody deletes: every acknowledged one must survive
JOB_IMAGES = 4  # distinct images per job folder
OK_STATUSES = {200, 202, 404, 409, 503}  # 404: deleted meanwhile; 409: a retried job name


@dataclass
class Record:
    """What the clients saw, shared by their threads."""

    uploaded: dict[int, set[str]] = field(default_factory=dict)  # seed -> acknowledged sha256
    upload_ids: dict[int, int] = field(default_factory=dict)  # image id -> seed
    jobs: list[str] = field(default_factory=list)  # names of the jobs surely submitted
    deleted: int = 0  # deletes answered 200
    unexpected: list[str] = field(default_factory=list)  # answers no client should get
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note_unexpected(self, what: str, response: httpx.Response) -> None:
        with self.lock:
            self.unexpected.append(f"{what}: {response.status_code} {response.text[:200]}")


class Service:
    """``python -m server`` on 127.0.0.1, killed and started again by the test."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "server", "--config", str(self.config)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                cwd=Path(__file__).parents[2],
            )

    def wait_until_ready(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the service died:\n{self.tail()}"
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"not ready in {READY_TIMEOUT_S} s:\n{self.tail()}")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown, no snapshot, no cleanup
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self) -> int:
        """SIGTERM, as an orchestrator stops a container; the exit status (uvicorn shuts down,
        then may raise the signal again: -15)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"SIGTERM did not stop the service in {STOP_TIMEOUT_S} s:\n{self.tail()}"
            ) from None

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upload_image(seed: int) -> bytes:
    return encode(scene(seed))


def write_job_folders(root: Path, count: int) -> list[Path]:
    """``count`` folders of JOB_IMAGES distinct scenes, none of them an upload's."""
    folders = []
    for job in range(count):
        folder = root / f"job{job:02d}"
        folder.mkdir(parents=True)
        for index in range(JOB_IMAGES):
            (folder / f"frame{index}.png").write_bytes(encode(scene(1000 + job * 100 + index)))
        folders.append(folder)
    return folders


@contextlib.contextmanager
def clients(base_url: str, record: Record, job_folders: list[Path]) -> Iterator[None]:
    """Client threads hitting the service until the block ends; transport errors (the service
    being killed) are retried."""
    stop = threading.Event()
    pending_jobs = list(job_folders)

    def loop(act: Callable[[httpx.Client, random.Random], None], seed: int) -> None:
        rng = random.Random(seed)
        headers = {"X-API-Key": API_KEY}
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.TransportError):
                    act(client, rng)
                stop.wait(rng.uniform(0.01, 0.05))

    def upload(client: httpx.Client, rng: random.Random) -> None:
        seed = rng.choice([*DELETABLE, *KEPT])
        data = upload_image(seed)
        files = {"images": (f"upload{seed:02d}.png", data, "image/png")}
        response = client.post("/v1/gallery/images", files=files, data={"cameras": f"c{seed}"})
        if response.status_code == 200:
            image_id = response.json()["images"][0]["image_id"]
            with record.lock:
                record.uploaded.setdefault(seed, set()).add(hashlib.sha256(data).hexdigest())
                record.upload_ids[image_id] = seed
        elif response.status_code not in OK_STATUSES:
            record.note_unexpected("upload", response)

    def delete(client: httpx.Client, rng: random.Random) -> None:
        with record.lock:
            deletable = [i for i, seed in record.upload_ids.items() if seed in DELETABLE]
        if deletable:
            response = client.delete(f"/v1/gallery/images/{rng.choice(deletable)}")
            if response.status_code == 200:
                with record.lock:
                    record.deleted += 1
            elif response.status_code not in OK_STATUSES:
                record.note_unexpected("delete", response)

    def search(client: httpx.Client, rng: random.Random) -> None:
        files = {"image": ("query.png", upload_image(rng.choice(KEPT)), "image/png")}
        response = client.post("/v1/search", files=files, data={"top_k": "5"})
        if response.status_code not in OK_STATUSES:
            record.note_unexpected("search", response)
        if response.status_code == 200:  # every hit's image is readable, with its file
            for hit in response.json()["hits"][:1]:
                file = client.get(f"/v1/gallery/images/{hit['image_id']}/file")
                if file.status_code not in (200, 404):  # 404: deleted meanwhile
                    record.note_unexpected("file", file)

    def submit_jobs(client: httpx.Client, rng: random.Random) -> None:
        if not pending_jobs or rng.random() > 0.1:
            return
        folder = pending_jobs[0]
        body = {"paths": [str(folder)], "name": folder.name}
        response = client.post("/v1/gallery/jobs", json=body)
        if response.status_code in (202, 409):  # 409: an earlier, cut-off try went in
            pending_jobs.pop(0)
            with record.lock:
                record.jobs.append(folder.name)
        elif response.status_code != 503:
            record.note_unexpected("job", response)

    actions = [upload, upload, delete, search, submit_jobs]
    threads = [
        threading.Thread(target=loop, args=(act, n), name=f"soak-{act.__name__}-{n}", daemon=True)
        for n, act in enumerate(actions)
    ]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def wait_for_jobs(client: httpx.Client, names: list[str], service: Service) -> list[dict]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        jobs = client.get("/v1/gallery/jobs").json()["jobs"]
        if {job["name"] for job in jobs} >= set(names) and all(
            job["status"] not in ("queued", "running") for job in jobs
        ):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"jobs not finished in {READY_TIMEOUT_S} s:\n{service.tail()}")


@pytest.fixture
def soak_settings(model_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(settings file, gallery folder, allowed root) of the soaked service."""
    allowed = tmp_path / "images"
    settings = {
        "model_dir": str(model_dir),
        "gallery_dir": str(tmp_path / "gallery"),
        "backend": "torch",
        "threads": 1,
        "min_detection_score": 0.0,
        "max_batch_size": 4,
        "max_wait_ms": 5,
        "queue_size": 16,
        "max_images_per_request": 4,
        "api_keys": [API_KEY],
        "allowed_roots": [str(allowed)],
    }
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config, tmp_path / "gallery", allowed


def test_killed_and_restarted_under_load_the_gallery_stays_consistent(soak_settings, tmp_path):
    config, gallery_dir, allowed = soak_settings
    job_folders = write_job_folders(allowed, count=KILLS + 2)
    service = Service(config, free_port(), tmp_path / "service.log")
    base_url = f"http://127.0.0.1:{service.port}"
    record = Record()
    rng = random.Random(0)
    with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        service.start()
        service.wait_until_ready(client)
        with clients(base_url, record, job_folders):
            for _ in range(KILLS):
                time.sleep(rng.uniform(*RUN_BEFORE_KILL_S))
                service.kill()
                service.start()
                service.wait_until_ready(client)
            time.sleep(RUN_BEFORE_KILL_S[1])  # the clients go on against the last start
        jobs = wait_for_jobs(client, record.jobs, service)
        assert service.terminate() in (0, -signal.SIGTERM), service.tail()

    # Stopped, not killed: the gallery was closed (its lock file emptied, its index written).
    assert (gallery_dir / "gallery.lock").read_text() == ""

    assert not record.unexpected, record.unexpected[:5]
    # The load was there: jobs spread over the kills, uploads of both kinds, deletes.
    assert len(record.jobs) >= KILLS
    assert record.uploaded.keys() & DELETABLE and record.uploaded.keys() & KEPT
    assert record.deleted > 0
    check_gallery(gallery_dir, record, jobs, {f.name: f for f in job_folders})


def check_gallery(gallery_dir: Path, record: Record, jobs: list[dict], folders: dict) -> None:
    on_disk = [path for path in (gallery_dir / "files").rglob("*") if path.is_file()]
    assert not [p for p in gallery_dir.rglob(".*.tmp")], "a temporary file was left behind"
    with Gallery.open(gallery_dir, fingerprint=None) as gallery:
        stats = gallery.stats()
        # Index: one vector per stored person, all of them in the snapshot written at the stop.
        assert stats.indexed == stats.num_persons and stats.pending == 0
        images = [gallery.get_image(image_id) for image_id in _image_ids(gallery)]
        # Files: exactly the uploaded images' (a job's images are served from their paths).
        uploaded = {image.sha256 for image in images if not Path(image.uri or "").is_absolute()}
        assert {path.name for path in on_disk} == uploaded
        for path in on_disk:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        # Rows: every acknowledged upload nobody deleted is there.
        stored = {image.sha256 for image in images}
        for seed in KEPT:
            assert record.uploaded.get(seed, set()) <= stored, f"upload {seed} was lost"
        # Job reports: each job added each of its distinct images once.
        with JobStore(gallery) as store:
            for job in jobs:
                counts = store.counts(job["id"])
                assert [job[key] for key in ("status", "total", "done")] == [
                    "done",
                    JOB_IMAGES,
                    JOB_IMAGES,
                ], job
                assert counts == {"pending": 0, "added": JOB_IMAGES, "duplicate": 0, "failed": 0}
                for item in store.items(job["id"]):
                    expected = hashlib.sha256(Path(item.source.path).read_bytes()).hexdigest()
                    assert gallery.get_image(item.image_id).sha256 == expected
                    assert Path(item.source.path).parent == folders[job["name"]]


def _image_ids(gallery: Gallery) -> list[int]:
    with contextlib.closing(sqlite3.connect(gallery.path / SQLITE_FILE)) as database:
        return [row[0] for row in database.execute("SELECT id FROM images ORDER BY id")]
