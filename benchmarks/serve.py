"""Load test of the search service: latency and throughput under concurrent clients, what
micro-batching buys, what the service adds to the engine's own time, and where it goes.

    python benchmarks/serve.py [--model-dir MODEL_DIR] [--backend auto] [--levels 1 4 16]
                               [--requests 64] [--seconds 60] [--max-batch-size 8]
                               [--max-wait-ms 0] [--frames 24] [--threads N]

Without ``--model-dir`` the tiny AlignPS of configs/tiny/alignps_synthetic.yaml is exported to
ONNX (random initial weights and a score threshold of 0, so that every query image has
detections: speed does not depend on the values). Synthetic PRW-format frames are generated;
they are indexed into a gallery, and their queries (a frame and a person's box) are the search
requests, sent round-robin.

The script starts the real service (``python -m server``, uvicorn) on 127.0.0.1 twice:

1. with micro-batching (``max_batch_size`` > 1): ``--levels`` concurrent clients in turn
   (asynchronous httpx), each level sending ``--requests`` searches, or fewer when
   ``--seconds`` run out; p50 / p99 latency, throughput, the mean batch the worker ran, and
   the CPU time per search of the service's process and of the clients (Linux);
2. with batches of one (``max_batch_size=1``) at the highest level.

It prints the ratio of the two throughputs at the highest level beside what batching buys the
engine alone (``Engine.detect`` on ``--max-batch-size`` query frames, one at a time and as one
batch: micro-batching cannot gain more than that), and the share of that gain the service
keeps (the target is >= 90% at 16 clients). Then the service overhead: the end-to-end latency
of searches from one client minus the latency of the engine alone on the same searches
(``Engine.embed_query``, what the service runs for a query, called in this process), the two
taken in turns before the load starts (the target is <= 10% of the engine's time), and where
the time of those searches went, step by step, from the ``Server-Timing`` header the service
answers with (``server/timing.py``; a service without it gets its JSON timings only), with the
CPU time each took. A script, not a test: the numbers depend on the machine and on whatever
else runs on it.
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
# A pause between the engine's call here and the service's: the threads of a run (ONNX Runtime's,
# OpenMP's) may spin a while after it, and would take the CPU from the other process's run.
SETTLE_S = 0.05
BATCH_GAIN_TARGET = 0.9  # share of the engine's own batch gain the service should keep
OVERHEAD_TARGET = 0.1  # the service's time beyond the engine's, as a share of the engine's
# The steps of a search in the service's Server-Timing header, and what each covers.
STEPS = {
    "receive": "the body, multipart parsing, form validation, the API key",
    "decode": "decoding the image (in the thread pool)",
    "queue": "waiting for the inference worker, and the hand-over",
    "engine": "the worker's batch",
    "wake": "until the request runs again",
    "search": "the gallery search (in the thread pool)",
    "respond": "validating and serialising the answer",
}


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
    """What one concurrency level measured; latencies in seconds, and milliseconds per step
    of the service's Server-Timing header."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    mean_batch: float = float("nan")
    steps_ms: dict[str, list[float]] = field(default_factory=dict)
    service_cpu: float = float("nan")  # CPU seconds of the service's process over the level
    client_cpu: float = float("nan")  # CPU seconds of this process (the clients)

    def cpu_ms_per_search(self, seconds: float) -> float:
        return seconds * 1000 / len(self.latencies) if self.latencies else float("nan")

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


@dataclass(frozen=True)
class Service:
    """A running service: its URL and its process id."""

    url: str
    pid: int


@contextmanager
def running_service(settings: dict[str, object], log_file: Path) -> Iterator[Service]:
    """``python -m server`` with ``settings`` on a free localhost port, until the block ends
    (then stopped with SIGINT, as Ctrl-C would); yields it once it is ready."""
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
        yield Service(url, process.pid)
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def server_timing(response: httpx.Response) -> dict[str, float]:
    """Milliseconds per step of a ``Server-Timing`` header (empty when there is none)."""
    steps = {}
    for entry in response.headers.get("server-timing", "").split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name and duration:
            steps[name] = float(duration)
    return steps


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
    service: Service, queries: Sequence[SearchQuery], clients: int, requests: int, seconds: float
) -> LevelResult:
    """``clients`` concurrent clients send up to ``requests`` searches in all (the queries
    round-robin), for at most ``seconds``; every answer's latency and steps are recorded, and
    the CPU time the service and the clients took."""
    result = LevelResult(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=service.url, limits=limits, timeout=120) as client:

        async def send(index: int) -> None:
            sent = time.perf_counter()
            response = await one_search(client, queries[index % len(queries)])
            if response.status_code != 200:
                result.errors += 1
                return
            result.latencies.append(time.perf_counter() - sent)
            for step, milliseconds in server_timing(response).items():
                result.steps_ms.setdefault(step, []).append(milliseconds)

        # Warm-up: one search per client opens the connections; not counted.
        await asyncio.gather(*(one_search(client, queries[0]) for _ in range(clients)))
        images_before, batches_before = batch_size_totals(service.url)
        service_cpu, client_cpu = process_cpu_seconds(service.pid), time.process_time()
        result.seconds = await run_clients(send, clients, requests, seconds)
        result.service_cpu = process_cpu_seconds(service.pid) - service_cpu
        result.client_cpu = time.process_time() - client_cpu
        images, batches = batch_size_totals(service.url)
    if batches > batches_before:
        result.mean_batch = (images - images_before) / (batches - batches_before)
    return result


@dataclass
class Overhead:
    """Seconds of the same searches end to end and on the engine alone, taken in turns; the
    service's JSON timings and Server-Timing steps (milliseconds); CPU seconds of the service's
    process over all the searches (it idles between them; the kernel counts in ticks of 10 ms,
    too coarse for one search), and of each search in this process (the client) and on the
    engine alone."""

    end_to_end: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    server_ms: dict[str, list[float]] = field(default_factory=dict)
    steps_ms: dict[str, list[float]] = field(default_factory=dict)
    service_cpu: float = float("nan")  # CPU seconds of the service's process, all searches
    client_cpu: list[float] = field(default_factory=list)
    engine_cpu: list[float] = field(default_factory=list)


def timed_embed(engine: Engine, query: SearchQuery) -> tuple[float, float]:
    """Seconds of ``engine.embed_query`` on the query's pixels and box, and the CPU seconds
    this process spent meanwhile (all the engine's threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    engine.embed_query(query.pixels, np.asarray(query.box))
    return time.perf_counter() - start, time.process_time() - cpu


async def paired_overhead(
    service: Service, engine: Engine, queries: Sequence[SearchQuery], count: int
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
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
            await one_search(client, queries[0])  # warm-up, not counted
            await loop.run_in_executor(worker, timed_embed, engine, queries[0])
            service_cpu = process_cpu_seconds(service.pid)
            for index in range(count):
                query = queries[index % len(queries)]
                seconds, cpu = await loop.run_in_executor(worker, timed_embed, engine, query)
                overhead.engine.append(seconds)
                overhead.engine_cpu.append(cpu)
                await asyncio.sleep(SETTLE_S)
                start, client_cpu = time.perf_counter(), time.process_time()
                response = await one_search(client, query)
                overhead.end_to_end.append(time.perf_counter() - start)
                overhead.client_cpu.append(time.process_time() - client_cpu)
                await asyncio.sleep(SETTLE_S)
                response.raise_for_status()
                for name, value in response.json()["timings"].items():
                    overhead.server_ms.setdefault(name, []).append(value)
                for step, milliseconds in server_timing(response).items():
                    overhead.steps_ms.setdefault(step, []).append(milliseconds)
            overhead.service_cpu = (process_cpu_seconds(service.pid) - service_cpu) / count
    return overhead


@dataclass(frozen=True)
class BatchGain:
    """Median seconds of the engine alone on the same frames, one at a time and in one batch,
    and the median CPU seconds (all its threads) of each."""

    frames: int
    one_at_a_time: float
    batched: float
    one_at_a_time_cpu: float = float("nan")
    batched_cpu: float = float("nan")

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
    cpu: dict[int, list[float]] = {1: [], frames: []}
    for _ in range(repeat):
        for batch_size in times:
            engine.batch_size = batch_size
            start, started_cpu = time.perf_counter(), time.process_time()
            engine.detect(images)
            times[batch_size].append(time.perf_counter() - start)
            cpu[batch_size].append(time.process_time() - started_cpu)
            time.sleep(SETTLE_S)
    engine.batch_size = 1
    median = statistics.median
    return BatchGain(
        frames, median(times[1]), median(times[frames]), median(cpu[1]), median(cpu[frames])
    )


# --- the report ---------------------------------------------------------------------------------


def table(title: str, results: Sequence[LevelResult]) -> str:
    lines = [
        title,
        f"{'clients':>7} {'answered':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'searches/s':>10} {'mean batch':>10} {'service CPU ms':>14} {'client CPU ms':>13}",
    ]
    for r in results:
        lines.append(
            f"{r.clients:>7} {len(r.latencies):>8} {r.errors:>6} {r.percentile_ms(50):>8.1f} "
            f"{r.percentile_ms(99):>8.1f} {r.throughput:>10.2f} {r.mean_batch:>10.2f} "
            f"{r.cpu_ms_per_search(r.service_cpu):>14.1f} "
            f"{r.cpu_ms_per_search(r.client_cpu):>13.1f}"
        )
    lines.append("(CPU: time per answered search, all threads, of the service and of the clients)")
    return "\n".join(lines)


def steps_table(title: str, results: Sequence[LevelResult]) -> str:
    """p50 milliseconds of each Server-Timing step, one row per level."""
    names = [name for name in (*STEPS, "total") if any(name in r.steps_ms for r in results)]
    if not names:
        return f"{title}: the service answers no Server-Timing header"
    lines = [title, f"{'clients':>7} " + " ".join(f"{name:>8}" for name in names)]
    for r in results:
        cells = [_median(r.steps_ms.get(name, [])) for name in names]
        lines.append(f"{r.clients:>7} " + " ".join(f"{cell:>8.2f}" for cell in cells))
    return "\n".join(lines)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def overhead_report(overhead: Overhead) -> str:
    """End-to-end p50 minus the engine's p50 on the same searches, where the service's own
    share of the time went (medians of its JSON timings and of its Server-Timing steps), and
    the CPU time of each."""
    end_to_end = statistics.median(overhead.end_to_end) * 1000
    engine_ms = statistics.median(overhead.engine) * 1000
    server = {name: statistics.median(values) for name, values in overhead.server_ms.items()}
    beyond = end_to_end - engine_ms
    lines = [
        f"service overhead, one client, {len(overhead.engine)} searches each taken end to "
        f"end and on the engine alone in turns: p50 {end_to_end:.1f} ms - {engine_ms:.1f} "
        f"ms = {beyond:.1f} ms ({beyond / end_to_end:.0%})",
        f"  that is {beyond / engine_ms:.0%} of the engine's time (target <= "
        f"{OVERHEAD_TARGET:.0%}, the client's own work included)",
        f"  the service's own timings (p50): decode {server['decode_ms']:.1f} ms, embed "
        f"{server['embed_ms']:.1f} ms (batcher wait included), search "
        f"{server['search_ms']:.1f} ms, total {server['total_ms']:.1f} ms; the remaining "
        f"{end_to_end - server['total_ms']:.1f} ms are HTTP, multipart parsing and the client",
    ]
    steps = {name: _median(values) for name, values in overhead.steps_ms.items()}
    if "total" in steps:
        lines.append("  where the time went, step by step (p50 ms, the Server-Timing header):")
        lines += [f"    {name:<12} {steps.get(name, float('nan')):>7.2f}  {what}"
                  for name, what in STEPS.items()]  # fmt: skip
        lines += [
            f"    {'service':<12} {steps['total']:>7.2f}  the whole request, as the service saw it",
            f"    {'client, HTTP':<12} {end_to_end - steps['total']:>7.2f}  end to end minus the "
            "service's: the client, the connection, HTTP parsing before the app",
        ]
        service_only = steps["total"] - steps.get("engine", float("nan"))
        lines.append(
            f"  the service beyond its engine step: {service_only:.2f} ms = "
            f"{service_only / engine_ms:.0%} of the engine alone's time (target <= "
            f"{OVERHEAD_TARGET:.0%})"
        )
    cpu = {
        "service": overhead.service_cpu * 1000,
        "engine": statistics.mean(overhead.engine_cpu) * 1000,
        "client": statistics.mean(overhead.client_cpu) * 1000,
    }
    lines.append(
        f"  CPU per search (mean): the service's process {cpu['service']:.1f} ms, the engine "
        f"alone {cpu['engine']:.1f} ms, so the service's own work "
        f"{cpu['service'] - cpu['engine']:.1f} ms; the client {cpu['client']:.1f} ms"
    )
    return "\n".join(lines)


def batch_gain_report(gain: BatchGain, ratio: float, clients: int) -> str:
    kept = ratio / gain.ratio
    return "\n".join(
        [
            f"the engine alone on {gain.frames} query frames: one at a time "
            f"{gain.one_at_a_time * 1000:.0f} ms, in one batch {gain.batched * 1000:.0f} ms: "
            f"{gain.ratio:.2f}x, the most micro-batching can gain here",
            f"  its CPU per frame: {gain.one_at_a_time_cpu * 1000 / gain.frames:.1f} ms one at a "
            f"time, {gain.batched_cpu * 1000 / gain.frames:.1f} ms in one batch (compare the "
            "service's CPU per search above: what it spends beyond these is its own work)",
            f"the service at {clients} clients keeps {ratio:.2f}x / {gain.ratio:.2f}x = "
            f"{kept:.0%} of it (target >= {BATCH_GAIN_TARGET:.0%}); of the speed-up beyond 1x, "
            f"{(ratio - 1) / (gain.ratio - 1):.0%}",
        ]
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
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="micro-batching's optional extra wait"
    )
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
        with running_service(batched_settings, folder / "batched.log") as service:
            calls = max(len(queries), min(args.requests, 32))
            overhead = asyncio.run(paired_overhead(service, engine, queries, calls))
            gain = engine_batch_gain(engine, queries, args.max_batch_size)
            del engine  # its threads would compete with the service's
            batched = [
                asyncio.run(load_level(service, queries, clients, args.requests, args.seconds))
                for clients in args.levels
            ]
        top = max(args.levels)
        with running_service(settings | {"max_batch_size": 1}, folder / "single.log") as service:
            single = asyncio.run(load_level(service, queries, top, args.requests, args.seconds))
    batching = f"micro-batching (max_batch_size {args.max_batch_size}, max_wait_ms "
    log("\n" + table(batching + f"{args.max_wait_ms:g})", batched))
    log("\n" + table("batches of one (max_batch_size 1)", [single]))
    log("\n" + steps_table("where the time went under load (p50 ms per step)", batched))
    log(steps_table("the same, batches of one", [single]))
    at_top = next(r for r in batched if r.clients == top)
    ratio = at_top.throughput / single.throughput if single.throughput else float("nan")
    log(f"\nthroughput at {top} clients, micro-batching / batches of one: {ratio:.2f}x")
    log(batch_gain_report(gain, ratio, top))
    log(overhead_report(overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
