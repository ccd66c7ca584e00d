"""``python -m server.demo`` (``make demo``): the whole system on one machine, from nothing.

::

    python -m server.demo [--data-dir data/demo] [--port 8000] [--minutes 9]
                          [--config configs/tiny/alignps_synthetic.yaml] [--seed 0] [--no-serve]

1. **data**: a synthetic dataset in PRW's file format (the generator's default size and
   difficulty), cached under ``--data-dir`` by seed and options;
2. **training**: a tiny model (``--config``) trained on it within ``--minutes``
   (``schedule.max_minutes``: the trainer times its first iterations and plans as many of the
   config's iterations as fit, with its warmup and learning rate milestones moved alike). The run
   is cached, keyed by the config, the seed, the data and the budget; an interrupted run
   continues next time;
3. **export** of the run to an ONNX model folder (checked against PyTorch);
4. **index**: the ingest pipeline puts every test frame in a gallery;
5. **service**: the API on 127.0.0.1, and a check. Every query of the test split is searched
   through the HTTP API in the PRW protocol (the gallery is every test frame but the query's
   own), and a search counts as right when its top hit is a box of the query's identity (IoU of
   at least 0.5 with its annotated box). The first query whose top hit is right is written to
   ``--data-dir/query.jpg`` and its search is printed as a ``curl`` command, run once more here
   with exactly that file and those fields; when no query is right, the demo says so.

Each stage prints how long it took. The service then runs until Ctrl-C; ``--no-serve`` runs the
check against an in-process app instead and exits (for tests). Exit status: 0 when the system
came up (whatever the check found: it is printed), 2 on a mistake the user can fix (a busy
port), 130 when interrupted before the service started.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import shlex
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from tqdm import tqdm

from common.boxes import iou_matrix
from common.run_folder import RUN_CONFIG_FILE, RUN_STATE_FILE
from export.artifact import MODEL_MANIFEST_FILE, read_model_manifest
from export.cli import export_checkpoint
from export.runtime import load_engine
from indexer.ingest import ingest, open_gallery_for
from indexer.sources import ImageSource
from indexer.store import Gallery
from indexer.types import ImageNotFound
from models import build_model
from server.app import create_app
from server.settings import ServerSettings
from training.config import TrainConfig, load_config
from training.datasets import PersonSearchSplit, Query, SceneAnnotation, load_dataset
from training.synthetic import cached_dataset
from training.trainer import Trainer, TrainingInterrupted

PROGRAM = "psearch demo"
REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPOSITORY / "configs" / "tiny" / "alignps_synthetic.yaml"
DEFAULT_MINUTES = 9.0  # with the install and the other stages (4 to 5 min), 15 min on 2 cores
DATASET_FORMAT = "prw"
USER_ERROR = 2
INTERRUPTED = 130
MATCH_IOU = 0.5  # a hit is a person when it overlaps an annotated box this much
TOP_K = 5  # hits shown for the printed search
INGEST_BATCH = 8
COMPLETE_MARKER = "demo-complete.json"  # written last: a folder without it is unfinished
READY_TIMEOUT_S = 120.0


class DemoError(Exception):
    """A mistake the user can fix; the message says what to do."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo builds and where. ``synthetic`` (generator options) and ``overrides``
    (``key=value`` config fields) make a smaller demo for tests; ``parity`` compares ONNX
    Runtime with PyTorch after the export."""

    data_dir: Path = Path("data/demo")
    config: Path = DEFAULT_CONFIG
    seed: int = 0
    minutes: float = DEFAULT_MINUTES
    host: str = "127.0.0.1"
    port: int = 8000
    serve: bool = True
    synthetic: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    parity: bool = True


def log(line: str = "") -> None:
    """Print a line now: stages take minutes, their lines should not wait in a buffer."""
    print(line, flush=True)


# --- stage timing ---------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage's name, duration and a note on what it did (``reusing ...``, counts)."""

    name: str
    seconds: float = 0.0
    note: str = ""


class Stages:
    """Announces each stage, times it and prints the table of every stage's time at the end."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.done: list[Stage] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def run(self, name: str, what: str) -> Iterator[Stage]:
        stage = Stage(name)
        log(f"\n[{len(self.done) + 1}/{self.count}] {name}: {what}")
        start = time.perf_counter()
        yield stage
        stage.seconds = time.perf_counter() - start
        self.done.append(stage)
        note = f": {stage.note}" if stage.note else ""
        log(f"      {name} done in {stage.seconds:.1f} s{note}")

    def table(self) -> str:
        lines = [f"{'stage':<10} {'seconds':>8}  what"]
        lines += [f"{s.name:<10} {s.seconds:>8.1f}  {s.note}" for s in self.done]
        lines.append(f"{'total':<10} {time.perf_counter() - self.started:>8.1f}")
        return "\n".join(lines)


# --- 1. data ----------------------------------------------------------------------------------


def digest(value: Any) -> str:
    """A short hash of JSON-able ``value``: cache folder names change with anything in it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


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


# --- 2. training ------------------------------------------------------------------------------


def run_config(options: DemoOptions, data_root: Path, run_dir: Path) -> TrainConfig:
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
    if (run_dir / COMPLETE_MARKER).is_file():
        stage.note = f"reusing {run_dir}"
        log(f"      reusing {run_dir}")
        return run_dir
    resume = (run_dir / RUN_STATE_FILE).is_file()
    if resume:
        log(f"      continuing {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(run_config(options, data_root, run_dir), build_model, resume=resume)
    trainer.run()
    record = {
        "train_seconds": trainer.train_seconds,
        "iterations": trainer.iteration,
        "epochs": trainer.iteration / len(trainer.loader),
        "stopped_by": trainer.stopped_by,
    }
    (run_dir / COMPLETE_MARKER).write_text(json.dumps(record) + "\n")
    epochs = trainer.iteration / len(trainer.loader)
    stage.note = (
        f"{trainer.iteration} iterations ({epochs:.1f} epochs) of {options.config.name} "
        f"in {run_dir}"
    )
    return run_dir


# --- 3. export ----------------------------------------------------------------------------------


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


# --- 4. index ---------------------------------------------------------------------------------


def camera_name(annotation: SceneAnnotation) -> str | None:
    return f"c{annotation.camera}" if annotation.camera >= 0 else None


def indexed_gallery(
    model_dir: Path, split: PersonSearchSplit, gallery_dir: Path, min_score: float, stage: Stage
) -> dict[str, int]:
    """Index every test frame (the ingest skips frames already in the gallery); returns the
    gallery image id of each frame by its path (the gallery's uri)."""
    engine = load_engine(model_dir, "auto", "cpu", batch_size=INGEST_BATCH)
    sources = [ImageSource(str(a.path), camera_name(a)) for a in split.images]
    info = engine.info
    with open_gallery_for(gallery_dir, info.fingerprint, info.dim) as gallery:
        summary = ingest(gallery, engine, sources, batch_size=INGEST_BATCH, min_score=min_score)
        ids = image_ids_by_uri(gallery)
        stats = gallery.stats()
    if summary.failures:
        raise DemoError(f"{summary.failed} test frames could not be read: {summary.failures[0]}")
    log(f"      {summary.describe()}")
    reused = "" if summary.added else "reusing the gallery: "
    stage.note = (
        f"{reused}{stats.num_images} frames, {stats.num_persons} persons "
        f"(detection score >= {min_score:g}, {info.backend}) in {gallery_dir}"
    )
    return ids


def image_ids_by_uri(gallery: Gallery) -> dict[str, int]:
    """Gallery image id of every stored image, by its uri."""
    ids: dict[str, int] = {}
    image_id, remaining = 0, gallery.stats().num_images
    while remaining:  # ids count up from 1; a removed image leaves a gap
        image_id += 1
        with contextlib.suppress(ImageNotFound):
            ids[gallery.get_image(image_id).uri or ""] = image_id
            remaining -= 1
    return ids


# --- 5. the check search ------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRequest:
    """A search as sent: the query image file and the form fields."""

    image: Path
    box: tuple[float, float, float, float]
    exclude_image: int
    top_k: int = TOP_K

    def fields(self) -> dict[str, str]:
        return {
            "box": ",".join(f"{v:.0f}" for v in self.box),
            "exclude_images": str(self.exclude_image),
            "top_k": str(self.top_k),
        }

    def curl(self, url: str) -> str:
        """The same search as a command line (run from the current folder)."""
        image = self.image.resolve()
        with contextlib.suppress(ValueError):
            image = image.relative_to(Path.cwd())
        parts = ["curl", "-s", f"{url}/v1/search", "-F", f"image=@{image}"]
        for name, value in self.fields().items():
            parts += ["-F", f"{name}={value}"]
        return shlex.join(parts)


@dataclass(frozen=True)
class Outcome:
    """A query's search: its top hits as answered, and whether the first is the right person."""

    query: Query
    request: SearchRequest
    hits: list[dict[str, Any]]
    right: bool


@dataclass(frozen=True)
class CheckResult:
    """Every query's outcome, in test split order, and the search printed for the user."""

    outcomes: list[Outcome]
    shown: Outcome | None

    @property
    def right(self) -> int:
        return sum(outcome.right for outcome in self.outcomes)


Check = Callable[[httpx.AsyncClient], Awaitable[CheckResult]]


def is_right_person(hit: dict[str, Any], frames: dict[str, SceneAnnotation], pid: int) -> bool:
    """Whether a hit's box is a person of identity ``pid`` in its frame (``frames`` by path):
    IoU >= MATCH_IOU with one of that identity's annotated boxes."""
    annotation = frames.get(hit["uri"] or "")
    if annotation is None:
        return False
    boxes = annotation.boxes[annotation.pids == pid].astype(np.float64)
    if not len(boxes):
        return False
    return bool(iou_matrix(hit["box"], boxes).max() >= MATCH_IOU)


async def search(client: httpx.AsyncClient, request: SearchRequest) -> list[dict[str, Any]]:
    """The hits of one search through the API (an error answer is raised with its message)."""
    files = {"image": (request.image.name, request.image.read_bytes(), "image/jpeg")}
    response = await client.post("/v1/search", files=files, data=request.fields())
    if response.status_code == 422 and "no_person_detected" in response.text:
        return []  # the detector found nobody in the query frame: no hit, not an error
    if response.status_code != 200:
        raise DemoError(f"the search failed: {response.status_code} {response.text}")
    return response.json()["hits"]


async def check_search(
    client: httpx.AsyncClient, split: PersonSearchSplit, image_ids: dict[str, int], query_file: Path
) -> CheckResult:
    """Search every test query through the API; write the first one whose top hit is right (or
    the first query, when none is) to ``query_file`` and search it once more from there."""
    names = split.by_name()
    frames = {str(annotation.path): annotation for annotation in split.images}
    outcomes = []
    for query in tqdm(split.queries, desc="searching the test queries", unit="query"):
        path = names[query.image].path
        x1, y1, x2, y2 = (float(v) for v in query.box)
        request = SearchRequest(path, (x1, y1, x2, y2), image_ids[str(path)])
        hits = await search(client, request)
        right = bool(hits) and is_right_person(hits[0], frames, query.pid)
        outcomes.append(Outcome(query, request, hits, right))
    if not outcomes:
        return CheckResult([], None)
    chosen = next((outcome for outcome in outcomes if outcome.right), outcomes[0])
    shutil.copyfile(chosen.request.image, query_file)
    request = dataclasses.replace(chosen.request, image=query_file)
    hits = await search(client, request)
    right = bool(hits) and is_right_person(hits[0], frames, chosen.query.pid)
    return CheckResult(outcomes, Outcome(chosen.query, request, hits, right))


def describe_check(result: CheckResult, url: str, serving: bool) -> str:
    """What the check found, the printed search and its answer, in words."""
    tried = len(result.outcomes)
    shown = result.shown
    if shown is None:
        return "the test split has no queries: nothing to search for"
    position = next(i for i, o in enumerate(result.outcomes) if o.query is shown.query)
    lines = [
        f"searched all {tried} test queries through the API: the top hit is the right person "
        f"for {result.right} of them (top-1 {result.right / tried:.0%})."
    ]
    if result.right:
        lines.append(f"the search below is query {position + 1} of {tried}, the first right one.")
    else:
        lines.append(
            f"NO query found its person at rank 1: the model trained in this budget is too weak "
            f"(more --minutes help). The search below (query 1 of {tried}) does NOT find the "
            "right person."
        )
    where = "" if serving else " (for a running service: this run used an in-process one)"
    lines += [f"\nsearch{where}:", f"  {shown.request.curl(url)}", ""]
    lines.append(
        f"query: person {shown.query.pid} of frame {shown.query.image} "
        f"(box {shown.request.fields()['box']}; its own frame left out with exclude_images)"
    )
    first = "  <- the RIGHT person" if shown.right else "  <- NOT the right person"
    for rank, hit in enumerate(shown.hits, start=1):
        verdict = first if rank == 1 else ""
        box = ",".join(f"{v:.0f}" for v in hit["box"])
        lines.append(
            f"  {rank}. {Path(hit['uri'] or '?').name} box {box} "
            f"similarity {hit['similarity']:.3f}{verdict}"
        )
    if not shown.hits:
        lines.append("  no hits (the detector found nobody in the query frame)")
    return "\n".join(lines)


# --- the service --------------------------------------------------------------------------


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the service, taken now so that a busy port is
    refused before minutes of work rather than after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise DemoError(
                f"port {port} on {host} is already in use (another demo or service?): stop "
                "that program, or choose another port with --port"
            ) from None
        raise DemoError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def service_settings(
    options: DemoOptions, model_dir: Path, gallery_dir: Path, min_score: float
) -> ServerSettings:
    return ServerSettings(
        model_dir=model_dir,
        gallery_dir=gallery_dir,
        create_gallery=False,
        backend="auto",
        device="cpu",
        min_detection_score=min_score,
        host=options.host,
        port=options.port,
    )


async def wait_until_ready(client: httpx.AsyncClient) -> None:
    """Poll ``/readyz`` until the model and the gallery are loaded."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        response = await client.get("/readyz")
        if response.status_code == 200:
            return
        if time.monotonic() > deadline or "loading" not in response.text:
            raise DemoError(f"the service did not get ready: {response.text}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def in_process_client(settings: ServerSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app running in this process, without a socket (``--no-serve``)."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url=f"http://{settings.host}:{settings.port}"
        ) as client,
    ):
        yield client


async def serve(
    settings: ServerSettings, sock: socket.socket, check: Check, stages: Stages
) -> CheckResult | None:
    """Run the service on ``sock`` until Ctrl-C, running ``check(client)`` once it is ready;
    returns the check's result (None when stopped before it finished)."""
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://{settings.host}:{settings.port}"
    with stages.run("service", f"starting {url} and searching the test queries") as stage:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            checking = asyncio.create_task(ready_then_check(client, check))
            await asyncio.wait({serving, checking}, return_when=asyncio.FIRST_COMPLETED)
            if not checking.done():  # the server stopped first (Ctrl-C)
                checking.cancel()
                await serving
                return None
            if checking.exception() is not None:
                server.should_exit = True  # stop serving a system that failed its check
                await serving
            result = checking.result()
        stage.note = f"{url}, {result.right} of {len(result.outcomes)} queries right at rank 1"
    log(f"\n{stages.table()}\n")
    log(describe_check(result, url, serving=True))
    log(f"\npsearch is running: web page {url}/  API docs {url}/docs\nCtrl-C stops it.")
    await serving
    return result


async def ready_then_check(client: httpx.AsyncClient, check: Check) -> CheckResult:
    await wait_until_ready(client)
    return await check(client)


async def check_in_process(settings: ServerSettings, check: Check, stages: Stages) -> CheckResult:
    """``--no-serve``: the check against the app in this process."""
    url = f"http://{settings.host}:{settings.port}"
    with stages.run("service", "in process (--no-serve): searching the test queries") as stage:
        async with in_process_client(settings) as client:
            await wait_until_ready(client)
            result = await check(client)
        stage.note = f"{result.right} of {len(result.outcomes)} queries right at rank 1"
    log(f"\n{stages.table()}\n")
    log(describe_check(result, url, serving=False))
    return result


# --- the whole demo -------------------------------------------------------------------------


def run_demo(options: DemoOptions) -> CheckResult | None:
    """Build everything (or reuse it), then serve until Ctrl-C, or with ``--no-serve`` check
    in process; returns the check's result (None when the service stopped before it ended)."""
    sock = reserve_port(options.host, options.port) if options.serve else None
    options.data_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(5)
    try:
        with stages.run("data", "synthetic PRW-format dataset") as stage:
            data_root = synthetic_dataset(options, stage)
        budget = f"{options.config.name}, budget {options.minutes:g} min"
        with stages.run("training", budget) as stage:
            run_dir = trained_run(options, data_root, stage)
        with stages.run("export", "ONNX model folder") as stage:
            model_dir = exported_model(run_dir, options.parity, stage)
        split = load_dataset(DATASET_FORMAT, data_root, "test")
        min_score = load_config(run_dir / RUN_CONFIG_FILE).eval.det_thresh
        gallery_dir = run_dir / "gallery"
        with stages.run("index", f"{len(split.images)} test frames") as stage:
            image_ids = indexed_gallery(model_dir, split, gallery_dir, min_score, stage)
        settings = service_settings(options, model_dir, gallery_dir, min_score)

        async def check(client: httpx.AsyncClient) -> CheckResult:
            return await check_search(client, split, image_ids, options.data_dir / "query.jpg")

        if sock is None:
            return asyncio.run(check_in_process(settings, check, stages))
        try:
            return asyncio.run(serve(settings, sock, check, stages))
        except KeyboardInterrupt:  # uvicorn stopped the service cleanly, then passed Ctrl-C on
            log(f"\n{PROGRAM}: the service stopped")
            return None
    finally:
        if sock is not None:
            sock.close()


def parse_args(argv: Sequence[str] | None) -> DemoOptions:
    parser = argparse.ArgumentParser(
        prog="python -m server.demo",
        description="Generate data, train (or reuse) a tiny model, export it, index the test "
        "frames and serve the search API on localhost.",
    )
    defaults = DemoOptions()
    parser.add_argument(
        "--data-dir", type=Path, default=defaults.data_dir, help="cache of every stage's output"
    )
    parser.add_argument("--port", type=int, default=defaults.port, help="port on 127.0.0.1")
    parser.add_argument(
        "--minutes",
        type=float,
        default=defaults.minutes,
        help="training budget; at least one epoch is trained (default %(default)g)",
    )
    parser.add_argument("--config", type=Path, default=defaults.config, help="tiny model config")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and training seed")
    parser.add_argument(
        "--no-serve",
        dest="serve",
        action="store_false",
        help="check the search against an in-process service, then exit",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes:g}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1 to 65535, got {args.port}")
    return DemoOptions(
        data_dir=args.data_dir,
        config=args.config,
        seed=args.seed,
        minutes=args.minutes,
        port=args.port,
        serve=args.serve,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (see the module docstring)."""
    options = parse_args(argv)
    try:
        run_demo(options)
    except DemoError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return USER_ERROR
    except TrainingInterrupted as interrupted:
        print(
            f"{PROGRAM}: training stopped ({interrupted.run_dir}); run the demo again to "
            "continue it",
            file=sys.stderr,
        )
        return INTERRUPTED
    except KeyboardInterrupt:
        print(f"\n{PROGRAM}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
