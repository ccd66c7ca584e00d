"""The micro-batcher: an item that finds the worker idle runs at once; items that arrive while
it is busy run together as its next batch; an optional wait gathers more; a full queue is
refused at once with 503 + Retry-After.

Time is a :class:`FakeClock` that moves only when a test says so, and the worker is held and
released with events: no test sleeps to let something happen.
"""

import asyncio
import queue
import threading

import pytest

from server.batcher import BatchObserver, MicroBatcher
from server.errors import NotReady, Overloaded

pytestmark = pytest.mark.anyio

WAIT_S = 10.0  # how long a test waits for the worker thread before it fails


class FakeClock:
    """A clock that moves only when :meth:`advance` is called. The worker's timed waits end
    when it is notified (an item arrives, the batcher stops) or when the clock is advanced;
    each wait it begins is announced on :attr:`waits`."""

    def __init__(self) -> None:
        self.time = 0.0
        self.waits: queue.SimpleQueue[float] = queue.SimpleQueue()  # each wait's timeout
        self._condition: threading.Condition | None = None

    def now(self) -> float:
        return self.time

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        self._condition = condition
        self.waits.put(timeout)
        condition.wait()

    def advance(self, seconds: float) -> None:
        assert self._condition is not None, "nobody waits on this clock"
        with self._condition:
            self.time += seconds
            self._condition.notify_all()

    async def next_wait(self) -> float:
        """The timeout of the worker's next wait on this clock, once it has begun it."""
        return await asyncio.to_thread(self.waits.get, timeout=WAIT_S)


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
        self.release.wait(timeout=WAIT_S)
        return [2 * item for item in items]

    def hold(self) -> None:
        """The next batch waits for :meth:`release` before it returns."""
        self.started.clear()
        self.release.clear()

    async def running(self) -> None:
        """Once the worker runs a held batch."""
        assert await asyncio.to_thread(self.started.wait, WAIT_S)


def batcher(run_batch, **options) -> MicroBatcher:
    settings = {"max_batch_size": 4, "queue_size": 16, "clock": FakeClock()} | options
    return MicroBatcher(run_batch, **settings)


async def submitted(batching: MicroBatcher, items) -> list[asyncio.Task]:
    """Submit ``items`` in order; returns once all of them are queued."""
    tasks = [asyncio.ensure_future(batching.submit(item)) for item in items]
    await asyncio.sleep(0)  # one turn of the loop: each task runs up to its await
    return tasks


async def queued_behind(
    batching: MicroBatcher, run: Doubler, first, items
) -> tuple[asyncio.Task, list[asyncio.Task]]:
    """Submit ``first`` and hold the worker on it, then queue ``items`` behind it; returns the
    tasks of ``first`` and of ``items``. ``run.release.set()`` lets the worker go on."""
    run.hold()
    held = asyncio.ensure_future(batching.submit(first))
    await run.running()
    return held, await submitted(batching, items)


async def test_an_item_that_finds_the_worker_idle_runs_at_once_alone():
    """No wait when nobody else is waiting: the result comes back although the clock never
    moves, and the worker never waited on it."""
    clock = FakeClock()
    run = Doubler()
    async with batcher(run, clock=clock) as batching:
        assert await batching.submit(21) == 42
        assert await batching.submit(5) == 10
    assert run.batches == [[21], [5]]
    assert clock.waits.empty()


async def test_items_arriving_while_the_worker_is_busy_run_together_next():
    """Item 0 holds the worker; items 1-6 queue meanwhile and go as the next batches, at most
    max_batch_size (4) each, without waiting on the clock."""
    clock = FakeClock()
    run = Doubler()
    async with batcher(run, clock=clock) as batching:
        first, rest = await queued_behind(batching, run, 0, range(1, 7))
        assert batching.depth == 6
        run.release.set()
        assert await asyncio.gather(first, *rest) == [0, 2, 4, 6, 8, 10, 12]
    assert run.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert clock.waits.empty()


async def test_every_batch_runs_on_the_one_worker_thread_off_the_event_loop():
    run = Doubler()
    async with batcher(run) as batching:
        await asyncio.gather(*(batching.submit(item) for item in range(10)))
    assert len(run.threads) == 1
    assert threading.get_ident() not in run.threads


async def test_with_max_wait_an_item_waits_for_company_until_its_deadline():
    """max_wait 5 ms: item 1 waits; item 2 arrives within the wait and joins it; the batch
    goes when the clock reaches 5 ms after item 1 arrived, not before."""
    clock = FakeClock()
    run = Doubler()
    async with batcher(run, clock=clock, max_wait_s=0.005) as batching:
        first = asyncio.ensure_future(batching.submit(1))
        assert await clock.next_wait() == pytest.approx(0.005)
        clock.time += 0.002  # item 2 arrives 2 ms later
        second = asyncio.ensure_future(batching.submit(2))
        assert await clock.next_wait() == pytest.approx(0.003)  # the rest of item 1's wait
        assert run.batches == []  # the worker is still waiting
        clock.advance(0.003)
        assert await asyncio.gather(first, second) == [2, 4]
    assert run.batches == [[1, 2]]


async def test_with_max_wait_a_full_batch_goes_without_waiting():
    clock = FakeClock()
    run = Doubler()
    run.hold()
    async with batcher(run, clock=clock, max_wait_s=3600, max_batch_size=2) as batching:
        first = asyncio.ensure_future(batching.submit(1))
        await clock.next_wait()
        second = asyncio.ensure_future(batching.submit(2))
        await run.running()  # the second item filled the batch: no further wait
        run.release.set()
        assert await asyncio.gather(first, second) == [2, 4]
    assert run.batches == [[1, 2]]


async def test_with_max_wait_an_item_that_waited_behind_a_busy_worker_does_not_wait_again():
    """The wait counts from an item's arrival: item 1 waited 10 ms behind item 0, more than
    max_wait (5 ms), so once the worker is free it runs at once."""
    clock = FakeClock()
    run = Doubler()
    async with batcher(run, clock=clock, max_wait_s=0.005, max_batch_size=2) as batching:
        first = asyncio.ensure_future(batching.submit(0))
        await clock.next_wait()
        run.hold()
        clock.advance(0.005)  # item 0 goes alone, and holds the worker
        await run.running()
        second = asyncio.ensure_future(batching.submit(1))
        await asyncio.sleep(0)
        clock.time += 0.010
        run.release.set()
        assert await asyncio.gather(first, second) == [0, 2]
    assert run.batches == [[0], [1]]
    assert clock.waits.empty()  # only item 0's wait, taken above


async def test_a_full_queue_is_refused_with_retry_after():
    """The worker holds item 0; items 1 and 2 fill a queue of 2; item 3 is refused at once."""
    run = Doubler()
    async with batcher(run, queue_size=2, max_batch_size=1, retry_after_s=3) as batching:
        held, waiting = await queued_behind(batching, run, 0, (1, 2))
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
        with pytest.raises(RuntimeError, match="engine exploded"):
            await batching.submit("a")
        assert await batching.submit("b") == "b"


async def test_an_exception_returned_as_a_result_fails_only_its_item():
    run = Doubler()

    def run_batch(items):
        return [ValueError(f"bad {item}") if item < 0 else item for item in run(items)]

    async with batcher(run_batch) as batching:
        held, together = await queued_behind(batching, run, 0, (1, -1))
        run.release.set()
        results = await asyncio.gather(held, *together, return_exceptions=True)
    assert run.batches == [[0], [1, -1]]
    assert results[:2] == [0, 2]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad -2"


async def test_a_wrong_number_of_results_fails_the_batch():
    async with batcher(lambda items: [1, 2]) as batching:
        with pytest.raises(RuntimeError, match="2 results for 1 items"):
            await batching.submit(1)


async def test_the_batch_run_says_when_the_worker_ran_the_item_and_with_how_many():
    run = Doubler()
    run.hold()
    async with batcher(run) as batching:
        held = asyncio.ensure_future(batching.submit_timed(0))
        await run.running()
        pair = [asyncio.ensure_future(batching.submit_timed(item)) for item in (1, 2)]
        await asyncio.sleep(0)
        run.release.set()
        (_, alone), (two, first_run), (four, second_run) = await asyncio.gather(held, *pair)
    assert (two, four) == (2, 4)
    assert alone.size == 1 and first_run == second_run and first_run.size == 2
    assert alone.started <= alone.finished <= first_run.started <= first_run.finished


async def test_a_cancelled_request_is_not_run():
    """Item 1 waits behind the held item 0; its request is cancelled (client gone): the worker
    never sees it."""
    run = Doubler()
    async with batcher(run, max_batch_size=1) as batching:
        held, (cancelled,) = await queued_behind(batching, run, 0, (1,))
        cancelled.cancel()
        run.release.set()
        assert await held == 0
        assert await batching.submit(2) == 4
    assert run.batches == [[0], [2]]


async def test_stopping_fails_waiting_items_and_refuses_new_ones():
    run = Doubler()
    batching = batcher(run, max_batch_size=1)
    await batching.start()
    held, (waiting,) = await queued_behind(batching, run, 0, (1,))
    stopping = asyncio.ensure_future(batching.stop())
    await asyncio.sleep(0)
    run.release.set()
    await stopping
    assert await held == 0  # the running batch finishes, and its result goes out
    with pytest.raises(NotReady):
        await waiting
    with pytest.raises(NotReady):
        await batching.submit(2)
    assert run.batches == [[0]]


async def test_stopping_ends_the_optional_wait():
    clock = FakeClock()
    run = Doubler()
    batching = batcher(run, clock=clock, max_wait_s=3600)
    await batching.start()
    waiting = asyncio.ensure_future(batching.submit(1))
    await clock.next_wait()
    await batching.stop()
    with pytest.raises(NotReady):
        await waiting
    assert run.batches == []


async def test_the_observer_sees_queue_depths_and_batch_sizes():
    recorder = Recorder()
    run = Doubler()
    async with batcher(run, observer=recorder) as batching:
        held, rest = await queued_behind(batching, run, 0, range(1, 7))
        run.release.set()
        await asyncio.gather(held, *rest)
    assert recorder.sizes == [1, 4, 2]
    assert max(recorder.depths) == 6
    assert recorder.depths[-1] == 0


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(list, max_batch_size=0, max_wait_s=0, queue_size=1)
