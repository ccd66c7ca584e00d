"""The micro-batcher: concurrent requests become batches on one worker thread; a full queue is
refused at once with 503 + Retry-After."""

import asyncio
import threading

import pytest

from server.batcher import BatchObserver, MicroBatcher
from server.errors import NotReady, Overloaded

pytestmark = pytest.mark.anyio


class Recorder(BatchObserver):
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.sizes: list[int] = []

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_done(self, size: int, seconds: float) -> None:
        self.sizes.append(size)


class Doubler:
    """run_batch that doubles numbers, records its batches and threads, and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(timeout=10)
        return [2 * item for item in items]


def batcher(run_batch, **options) -> MicroBatcher:
    settings = {"max_batch_size": 4, "max_wait_s": 0.05, "queue_size": 16} | options
    return MicroBatcher(run_batch, **settings)


async def test_concurrent_submissions_run_as_batches_on_one_worker_thread():
    """Six items submitted at once with batches of at most 4: one batch of 4, one of 2, every
    result back to its own submitter."""
    run = Doubler()
    async with batcher(run) as batching:
        results = await asyncio.gather(*(batching.submit(item) for item in range(6)))
    assert results == [0, 2, 4, 6, 8, 10]
    assert run.batches == [[0, 1, 2, 3], [4, 5]]
    assert len(run.threads) == 1
    assert threading.get_ident() not in run.threads  # never on the event loop's thread


async def test_items_arriving_within_the_wait_join_the_batch():
    run = Doubler()
    async with batcher(run, max_wait_s=1.0, max_batch_size=2) as batching:
        first = asyncio.ensure_future(batching.submit(1))
        await asyncio.sleep(0.01)
        assert await batching.submit(2) == 4
        assert await first == 2
    assert run.batches == [[1, 2]]


async def test_a_full_queue_is_refused_with_retry_after():
    """The worker holds item 0; items 1 and 2 fill a queue of 2; item 3 is refused at once."""
    run = Doubler()
    run.release.clear()
    async with batcher(run, queue_size=2, max_batch_size=1, retry_after_s=3) as batching:
        held = asyncio.ensure_future(batching.submit(0))
        await asyncio.to_thread(run.started.wait, 10)
        waiting = [asyncio.ensure_future(batching.submit(item)) for item in (1, 2)]
        await asyncio.sleep(0)
        assert batching.depth == 2
        with pytest.raises(Overloaded) as refused:
            await batching.submit(3)
        assert refused.value.headers == {"Retry-After": "3"}
        assert refused.value.status_code == 503
        run.release.set()
        assert await asyncio.gather(held, *waiting) == [0, 2, 4]
    assert run.batches == [[0], [1], [2]]


async def test_a_failing_batch_fails_its_items_and_the_next_batch_runs():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("engine exploded")
        return list(items)

    async with batcher(run_batch, max_batch_size=2) as batching:
        first = await asyncio.gather(
            batching.submit("a"), batching.submit("b"), return_exceptions=True
        )
        assert [str(error) for error in first] == ["engine exploded", "engine exploded"]
        assert await batching.submit("c") == "c"


async def test_an_exception_returned_as_a_result_fails_only_its_item():
    def run_batch(items):
        return [ValueError(f"bad {item}") if item < 0 else item for item in items]

    async with batcher(run_batch) as batching:
        results = await asyncio.gather(
            batching.submit(1), batching.submit(-1), return_exceptions=True
        )
    assert results[0] == 1
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -1"


async def test_a_wrong_number_of_results_fails_the_batch():
    async with batcher(lambda items: [1]) as batching:
        results = await asyncio.gather(
            batching.submit(1), batching.submit(2), return_exceptions=True
        )
    assert all("1 results for 2 items" in str(result) for result in results)


async def test_a_cancelled_request_is_not_run():
    """Item 1 waits behind the held item 0; its request is cancelled (client gone): the worker
    never sees it."""
    run = Doubler()
    run.release.clear()
    async with batcher(run, max_batch_size=1) as batching:
        held = asyncio.ensure_future(batching.submit(0))
        await asyncio.to_thread(run.started.wait, 10)
        cancelled = asyncio.ensure_future(batching.submit(1))
        await asyncio.sleep(0)
        cancelled.cancel()
        run.release.set()
        assert await held == 0
        assert await batching.submit(2) == 4
    assert run.batches == [[0], [2]]


async def test_stopping_fails_waiting_items_and_refuses_new_ones():
    run = Doubler()
    run.release.clear()
    batching = batcher(run, max_batch_size=1)
    await batching.start()
    held = asyncio.ensure_future(batching.submit(0))
    await asyncio.to_thread(run.started.wait, 10)
    waiting = asyncio.ensure_future(batching.submit(1))
    await asyncio.sleep(0)
    run.release.set()
    await batching.stop()
    assert await held == 0  # the running batch finishes
    with pytest.raises(NotReady):
        await waiting
    with pytest.raises(NotReady):
        await batching.submit(2)


async def test_the_observer_sees_queue_depths_and_batch_sizes():
    recorder = Recorder()
    async with batcher(Doubler(), observer=recorder) as batching:
        await asyncio.gather(*(batching.submit(item) for item in range(6)))
    assert recorder.sizes == [4, 2]
    assert max(recorder.depths) >= 2
    assert recorder.depths[-1] == 0


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(list, max_batch_size=0, max_wait_s=0, queue_size=1)
