"""benchmarks/serve.py: the load generator's bounds and figures, and one tiny run end to end.

The smoke run serves the service tests' random tiny model (PyTorch backend: no ONNX export to
wait for) to a handful of requests: it proves the plumbing, not the speed.
"""

import asyncio
import time

import httpx
import pytest

from benchmarks import serve
from tests.server.support import write_model_folder


def test_every_request_is_sent_once_across_the_clients():
    sent = []

    async def send(index: int) -> None:
        sent.append(index)
        await asyncio.sleep(0)  # let the other clients take turns

    asyncio.run(serve.run_clients(send, clients=4, requests=10, seconds=60))

    assert sorted(sent) == list(range(10))


def test_no_request_starts_after_the_time_limit():
    sent = []

    async def send(index: int) -> None:
        sent.append(index)
        await asyncio.sleep(0.01)

    start = time.perf_counter()
    seconds = asyncio.run(serve.run_clients(send, clients=2, requests=10_000, seconds=0.1))

    # 2 clients x 10 ms per request: about 20 requests in 0.1 s, and nowhere near 10 000.
    assert 2 <= len(sent) < 100
    assert seconds == pytest.approx(time.perf_counter() - start, abs=0.05)
    assert seconds < 1.0


def test_latency_percentiles_and_throughput():
    result = serve.LevelResult(clients=2, latencies=[0.010, 0.020, 0.030, 0.040], seconds=2.0)

    # numpy's linear interpolation: the median of 10, 20, 30, 40 ms is 25 ms; the 99th
    # percentile lies 0.97 of the way from 30 to 40 ms.
    assert result.percentile_ms(50) == pytest.approx(25.0)
    assert result.percentile_ms(99) == pytest.approx(39.7)
    assert result.throughput == pytest.approx(2.0)  # 4 answers in 2 s


def test_batches_of_one_are_not_a_comparison():
    with pytest.raises(SystemExit):
        serve.parse_args(["--max-batch-size", "1"])


def test_a_tiny_run_prints_both_tables_the_ratio_the_steps_and_the_overhead(tmp_path, capsys):
    model_dir = write_model_folder(tmp_path / "model")
    argv = ["--model-dir", str(model_dir), "--backend", "torch", "--threads", "1"]
    argv += ["--levels", "1", "2", "--requests", "3", "--frames", "3"]

    assert serve.main(argv) == 0

    output = capsys.readouterr().out
    tables = [section.splitlines() for section in output.split("\n\n")]
    loads = [lines for lines in tables if lines[0].startswith(("micro-batching", "batches of"))]
    rows = [line.split() for lines in loads for line in lines[2:] if line[:7].strip().isdigit()]
    # clients, answered, errors: 3 searches at 1 and 2 clients batched, 3 at 2 unbatched.
    assert [row[:3] for row in rows] == [["1", "3", "0"], ["2", "3", "0"], ["2", "3", "0"]]
    assert rows[2][6] == "1.00"  # batches of one: the mean batch is 1
    assert all(float(row[7]) > 0 for row in rows)  # the service's CPU per search
    steps = next(lines for lines in tables if lines[0].startswith("where the time went"))
    assert steps[1].split() == [
        "clients", "receive", "decode", "queue", "engine", "wake", "search", "respond", "total",
    ]  # fmt: skip
    assert "micro-batching / batches of one" in output
    assert "the most micro-batching can gain here" in output
    assert "of it (target >= 90%)" in output
    assert "service overhead, one client" in output
    assert "where the time went, step by step" in output
    assert "the service beyond its engine step" in output


def test_the_steps_of_a_server_timing_header_are_read_in_milliseconds():
    response = httpx.Response(200, headers={"Server-Timing": "decode;dur=0.5, total;dur=12.25"})
    assert serve.server_timing(response) == {"decode": 0.5, "total": 12.25}
    assert serve.server_timing(httpx.Response(200)) == {}


def test_the_engine_batch_gain_is_timed_on_the_same_frames_both_ways():
    class CountingEngine:
        """Records the batch size of every detect call; one batch takes as long as one image."""

        def __init__(self) -> None:
            self.batch_size, self.calls = 1, []

        def detect(self, images):
            self.calls.append((len(images), self.batch_size))
            time.sleep(0.01 * -(-len(images) // self.batch_size))

    queries = [serve.SearchQuery(f"q{i}", b"", None, (0, 0, 1, 1)) for i in range(3)]
    engine = CountingEngine()
    gain = serve.engine_batch_gain(engine, queries, frames=4, repeat=2)

    assert engine.calls == [(4, 1), (4, 4)] * 2 and engine.batch_size == 1
    assert gain.frames == 4 and gain.ratio == pytest.approx(4.0, rel=0.5)
