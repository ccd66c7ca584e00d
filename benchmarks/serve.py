"""Load test of the search service: latency and throughput under concurrent clients, what
micro-batching buys, and what the service adds to the engine's own time.

    python benchmarks/serve.py [--model-dir MODEL_DIR] [--backend auto] [--levels 1 4 16]
                               [--requests 64] [--seconds 60] [--max-batch-size 8]
                               [--max-wait-ms 5] [--frames 24] [--threads N]

Without ``--model-dir`` the tiny AlignPS of configs/tiny/alignps_synthetic.yaml is exported to
ONNX (random initial weights and a score threshold of 0, so that every query image has
detections: speed does not depend on the values). Synthetic PRW-format frames are generated;
they are indexed into a gallery, and their queries (a frame and a person's box) are the search
requests, sent round-robin.

The script starts the real service (``python -m server``, uvicorn) on 127.0.0.1 twice:

1. with micro-batching (``max_batch_size`` > 1): ``--levels`` concurrent clients in turn
   (asynchronous httpx), each level sending ``--requests`` searches, or fewer when
   ``--seconds`` run out; p50 / p99 latency, throughput and the mean batch the worker ran;
2. with batches of one (``max_batch_size=1``) at the highest level.

It prints the ratio of the two throughputs at the highest level (the target is >= 1.5x at 16
clients on CPU), beside what batching buys the engine alone (``Engine.detect`` on
``--max-batch-size`` query frames, one at a time and as one batch: micro-batching cannot gain
more than that), and the service overhead: the end-to-end latency of searches from one client
minus the latency of the engine alone on the same searches (``Engine.embed_query``, what the
service runs for a query, called in this process), the two taken in turns before the load
starts. A script, not a test: the numbers depend on the machine and on whatever else runs on
it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config_files import read_yaml_mapping
from export.artifact import GraphFiles, build_manifest, write_model_manifest, write_weights
from export.onnx import write_onnx_graphs
from export.runtime import Engine, load_engine
from indexer.images import decode_image
from indexer.ingest import ingest
from indexer.sources import ImageSource
from indexer.store import open_gallery_for
from models import build_model
from training.datasets import load_dataset
from training.synthetic import generate

REPOSITORY = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPOSITORY / "configs" / "tiny" / "alignps_synthetic.yaml"
BATCH_SIZE_METRIC = "psearch_inference_batch_size"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
# A pause between the engine's call here and the service's: ONNX Runtime's idle threads spin a
# while after a run, and would take the CPU from the other process's run.
SETTLE_S = 0.05


@dataclass(frozen=True)
class SearchQuery:
    """One search request's content: a frame's bytes and pixels, and a person's box in it."""

    name: str
    data: bytes
    pixels: np.ndarray  # (H, W, 3) uint8
    box: tuple[float, float, float, float]

    def form(self) -> dict[str, str]:
        return {"box": ",".join(f"{v:.1f}" for v in self.box), "top_k": "10"}


@dataclass
class LevelResult:
    """What one concurrency level measured; latencies in seconds."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    mean_batch: float = float("nan")

    @property
    def throughput(self) -> float:
        """Answered searches per second of the level's wall time."""
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


def log(line: str = "") -> None:
    print(line, flush=True)


# --- the model, the data and the gallery ----------------------------------------------------


def export_tiny_model(folder: Path) -> Path:
    """An ONNX model folder of the tiny AlignPS with random weights, every slot detected."""
    config = read_yaml_mapping(TINY_CONFIG)["model"]
    config["inference"]["score_thresh"] = 0.0
    torch.manual_seed(0)
    model = build_model(config).eval()
    manifest = build_manifest(model)
    folder.mkdir(parents=True)
    write_weights(model, folder, manifest)
    manifest.onnx = GraphFiles(**write_onnx_graphs(model, folder))
    write_model_manifest(manifest, folder)
    return folder


def synthetic_queries(folder: Path, frames: int) -> tuple[list[Path], list[SearchQuery]]:
    """Generate ``frames`` synthetic PRW test frames; returns their paths and their queries."""
    generate(
        "prw",
        folder,
        seed=0,
        train_images=2,
        train_identities=2,
        test_images=frames,
        test_identities=max(2, frames // 3),
        progress=False,
    )
    split = load_dataset("prw", folder, "test")
    paths = {annotation.name: annotation.path for annotation in split.images}
    queries = []
    for query in split.queries:
        path = paths[query.image]
        x1, y1, x2, y2 = (float(v) for v in query.box)
        data = path.read_bytes()
        queries.append(SearchQuery(path.name, data, decode_image(data), (x1, y1, x2, y2)))
    if not queries:
        raise SystemExit("the synthetic frames have no queries: use more --frames")
    return [annotation.path for annotation in split.images], queries


def build_gallery(engine: Engine, frames: Sequence[Path], gallery_dir: Path) -> int:
    """Index ``frames`` (every detection kept); returns the number of persons stored."""
    info = engine.info
    with open_gallery_for(gallery_dir, info.fingerprint, info.dim) as gallery:
        sources = [ImageSource(str(path)) for path in frames]
        summary = ingest(gallery, engine, sources, min_score=0.0, progress=False)
    return summary.persons


# --- the service ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(settings: dict[str, object], log_file: Path) -> Iterator[str]:
    """``python -m server`` with ``settings`` on a free localhost port, until the block ends
    (then stopped with SIGINT, as Ctrl-C would); yields its URL once it is ready."""
    port = free_port()
    command = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)]
    for name, value in settings.items():
        command += ["--set", f"{name}={value}"]
    command += ["--log-level", "warning"]
    with log_file.open("w") as output:
        process = subprocess.Popen(command, cwd=REPOSITORY, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_file)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(url: str, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited ({process.returncode}):\n{log_file.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    raise SystemExit(f"the service was not ready after {READY_TIMEOUT_S:.0f} s")


def batch_size_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the service's batch size histogram: images run, batches run."""
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for suffix in totals:
            if line.startswith(BATCH_SIZE_METRIC + suffix + " "):
                totals[suffix] = float(line.split()[-1])
    return totals["_sum"], totals["_count"]


# --- the load -----------------------------------------------------------------------------------


async def one_search(client: httpx.AsyncClient, query: SearchQuery) -> httpx.Response:
    files = {"image": (query.name, query.data, "image/jpeg")}
    return await client.post("/v1/search", files=files, data=query.form())


async def run_clients(
    send: Callable[[int], Awaitable[None]], clients: int, requests: int, seconds: float
) -> float:
    """Call ``send(index)`` for index 0 .. ``requests`` - 1 from ``clients`` concurrent loops
    (each awaits its call before taking the next index); no call starts after ``seconds``.
    Returns the wall time taken."""
    indexes = iter(range(requests))
    start = time.perf_counter()
    deadline = start + seconds

    async def client_loop() -> None:
        for index in indexes:  # one shared iterator: each index is sent once
            if time.perf_counter() > deadline:
                return
            await send(index)

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return time.perf_counter() - start


async def load_level(
    url: str, queries: Sequence[SearchQuery], clients: int, requests: int, seconds: float
) -> LevelResult:
    """``clients`` concurrent clients send up to ``requests`` searches in all (the queries
    round-robin), for at most ``seconds``; every answer's latency and timings are recorded."""
    result = LevelResult(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def send(index: int) -> None:
            sent = time.perf_counter()
            response = await one_search(client, queries[index % len(queries)])
            if response.status_code != 200:
                result.errors += 1
                return
            result.latencies.append(time.perf_counter() - sent)

        # Warm-up: one search per client opens the connections; not counted.
        await asyncio.gather(*(one_search(client, queries[0]) for _ in range(clients)))
        images_before, batches_before = batch_size_totals(url)
        result.seconds = await run_clients(send, clients, requests, seconds)
        images, batches = batch_size_totals(url)
    if batches > batches_before:
        result.mean_batch = (images - images_before) / (batches - batches_before)
    return result


@dataclass
class Overhead:
    """Seconds of the same searches end to end and on the engine alone, taken in turns."""

    end_to_end: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    server_ms: dict[str, list[float]] = field(default_factory=dict)


def timed_embed(engine: Engine, query: SearchQuery) -> float:
    """Seconds of ``engine.embed_query`` on the query's pixels and box."""
    start = time.perf_counter()
    engine.embed_query(query.pixels, np.asarray(query.box))
    return time.perf_counter() - start


async def paired_overhead(
    url: str, engine: Engine, queries: Sequence[SearchQuery], count: int
) -> Overhead:
    """Each query in turn, ``count`` times in all: ``engine.embed_query`` on its pixels and box
    (what the service runs for it) in this process, then the same search through the idle
    service. Taking them in turns lets a busy machine slow both alike.

    The engine runs on a worker thread of its own, as in the service (the batcher's), after a
    first call from this thread, as the service's warm-up is: on a busy 2-core machine, ONNX
    Runtime was seen to run up to twice as slowly while only one thread had ever called it.
    """
    overhead = Overhead()
    loop = asyncio.get_running_loop()
    timed_embed(engine, queries[0])  # warm-up, not counted
    with ThreadPoolExecutor(max_workers=1) as worker:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await one_search(client, queries[0])  # warm-up, not counted
            await loop.run_in_executor(worker, timed_embed, engine, queries[0])
            for index in range(count):
                query = queries[index % len(queries)]
                overhead.engine.append(
                    await loop.run_in_executor(worker, timed_embed, engine, query)
                )
                await asyncio.sleep(SETTLE_S)
                start = time.perf_counter()
                response = await one_search(client, query)
                overhead.end_to_end.append(time.perf_counter() - start)
                await asyncio.sleep(SETTLE_S)
                response.raise_for_status()
                for name, value in response.json()["timings"].items():
                    overhead.server_ms.setdefault(name, []).append(value)
    return overhead


@dataclass(frozen=True)
class BatchGain:
    """Median seconds of the engine alone on the same frames, one at a time and in one batch."""

    frames: int
    one_at_a_time: float
    batched: float

    @property
    def ratio(self) -> float:
        return self.one_at_a_time / self.batched


def engine_batch_gain(
    engine: Engine, queries: Sequence[SearchQuery], frames: int, repeat: int = 3
) -> BatchGain:
    """What batching buys the engine itself on this machine, the ceiling of what micro-batching
    can buy the service: ``engine.detect`` on `frames` query frames, one at a time and then as
    one batch, in turns, `repeat` times."""
    images = [queries[i % len(queries)].pixels for i in range(frames)]
    times: dict[int, list[float]] = {1: [], frames: []}
    for _ in range(repeat):
        for batch_size in times:
            engine.batch_size = batch_size
            start = time.perf_counter()
            engine.detect(images)
            times[batch_size].append(time.perf_counter() - start)
            time.sleep(SETTLE_S)
    engine.batch_size = 1
    return BatchGain(frames, statistics.median(times[1]), statistics.median(times[frames]))


# --- the report ---------------------------------------------------------------------------------


def table(title: str, results: Sequence[LevelResult]) -> str:
    lines = [
        title,
        f"{'clients':>7} {'answered':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'searches/s':>10} {'mean batch':>10}",
    ]
    for r in results:
        lines.append(
            f"{r.clients:>7} {len(r.latencies):>8} {r.errors:>6} {r.percentile_ms(50):>8.1f} "
            f"{r.percentile_ms(99):>8.1f} {r.throughput:>10.2f} {r.mean_batch:>10.2f}"
        )
    return "\n".join(lines)


def overhead_report(overhead: Overhead) -> str:
    """End-to-end p50 minus the engine's p50 on the same searches, and where the service's
    own share of the time went (medians of the timings it reports)."""
    end_to_end = statistics.median(overhead.end_to_end) * 1000
    engine_ms = statistics.median(overhead.engine) * 1000
    server = {name: statistics.median(values) for name, values in overhead.server_ms.items()}
    return "\n".join(
        [
            f"service overhead, one client, {len(overhead.engine)} searches each taken end to "
            f"end and on the engine alone in turns: p50 {end_to_end:.1f} ms - {engine_ms:.1f} "
            f"ms = {end_to_end - engine_ms:.1f} ms ({(end_to_end - engine_ms) / end_to_end:.0%})",
            f"  the service's own timings (p50): decode {server['decode_ms']:.1f} ms, embed "
            f"{server['embed_ms']:.1f} ms (batcher wait included), search "
            f"{server['search_ms']:.1f} ms, total {server['total_ms']:.1f} ms; the remaining "
            f"{end_to_end - server['total_ms']:.1f} ms are HTTP, multipart parsing and the client",
        ]
    )


def batch_gain_report(gain: BatchGain) -> str:
    return (
        f"the engine alone on {gain.frames} query frames: one at a time "
        f"{gain.one_at_a_time * 1000:.0f} ms, in one batch {gain.batched * 1000:.0f} ms: "
        f"{gain.ratio:.2f}x, the most micro-batching can gain here"
    )


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {os.cpu_count()} CPUs, load average {load:.1f} when the run started "
        "(on a shared machine, other work changes every figure)"
    )


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="exported model (default: tiny AlignPS)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime"))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="clients")
    parser.add_argument("--requests", type=int, default=64, help="searches per level")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit per level")
    parser.add_argument("--max-batch-size", type=int, default=8, help="micro-batching's batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batching's wait")
    parser.add_argument("--frames", type=int, default=24, help="synthetic frames (gallery)")
    parser.add_argument("--threads", type=int, help="backend CPU threads (default: its own)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 2:
        parser.error("--max-batch-size must be at least 2 (it is compared with batches of one)")
    if min(args.levels) < 1 or args.requests < 1 or args.seconds <= 0 or args.frames < 2:
        parser.error("--levels and --requests must be >= 1, --seconds > 0, --frames >= 2")
    return args


def service_settings(args: argparse.Namespace, model_dir: Path, gallery_dir: Path) -> dict:
    settings: dict[str, object] = {
        "model_dir": model_dir,
        "gallery_dir": gallery_dir,
        "create_gallery": False,
        "backend": args.backend,
        "max_wait_ms": args.max_wait_ms,
        "queue_size": 4 * max(args.levels),  # never full: the test measures, it does not shed
        "max_images_per_request": 1,  # it uploads nothing; at most queue_size, as it must be
    }
    if args.threads is not None:
        settings["threads"] = args.threads
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log(machine_line())
    with tempfile.TemporaryDirectory(prefix="psearch-bench-serve-") as scratch:
        folder = Path(scratch)
        model_dir = args.model_dir or export_tiny_model(folder / "model")
        frames, queries = synthetic_queries(folder / "data", args.frames)
        engine = load_engine(model_dir, args.backend, "cpu", batch_size=1, threads=args.threads)
        persons = build_gallery(engine, frames, folder / "gallery")
        log(
            f"model {engine.info.name} on {engine.info.backend} ({model_dir}); gallery of "
            f"{len(frames)} frames and {persons} persons; {len(queries)} distinct queries"
        )
        settings = service_settings(args, model_dir, folder / "gallery")
        batched_settings = settings | {"max_batch_size": args.max_batch_size}
        with running_service(batched_settings, folder / "batched.log") as url:
            calls = max(len(queries), min(args.requests, 32))
            overhead = asyncio.run(paired_overhead(url, engine, queries, calls))
            gain = engine_batch_gain(engine, queries, args.max_batch_size)
            del engine  # its threads would compete with the service's
            batched = [
                asyncio.run(load_level(url, queries, clients, args.requests, args.seconds))
                for clients in args.levels
            ]
        top = max(args.levels)
        with running_service(settings | {"max_batch_size": 1}, folder / "single.log") as url:
            single = asyncio.run(load_level(url, queries, top, args.requests, args.seconds))
    batching = f"micro-batching (max_batch_size {args.max_batch_size}, max_wait_ms "
    log("\n" + table(batching + f"{args.max_wait_ms:g})", batched))
    log("\n" + table("batches of one (max_batch_size 1)", [single]))
    at_top = next(r for r in batched if r.clients == top)
    ratio = at_top.throughput / single.throughput if single.throughput else float("nan")
    log(
        f"\nthroughput at {top} clients, micro-batching / batches of one: {ratio:.2f}x "
        "(target >= 1.5x at 16 clients on CPU)"
    )
    log(batch_gain_report(gain))
    log(overhead_report(overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
