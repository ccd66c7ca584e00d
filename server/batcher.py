"""A micro-batcher: requests from many coroutines, run together on ONE worker thread.

The engine is fastest on batches and is not safe to call from several threads at once, while
requests arrive one image at a time on the event loop. :class:`MicroBatcher` bridges the two:

- :meth:`~MicroBatcher.submit` puts an item on a bounded queue and awaits its result. A full
  queue is refused at once with :class:`~server.errors.Overloaded` (503 + Retry-After): under
  overload, failing fast beats letting latency grow without bound.
- The worker thread takes its batches itself. An item that finds it idle runs at once, alone:
  nobody else is waiting, and waiting for company would only add latency. Items that arrive
  while it runs a batch queue up, and the moment it is done it takes them all, up to
  ``max_batch_size``, as its next batch. Batches so grow with the load by themselves, and the
  engine never waits for the event loop between two batches (the loop, busy with other
  requests' HTTP work, would otherwise leave it idle until it gets round to handing one over).
- ``max_wait_s`` > 0 is an optional extra wait, for engines whose batches cost little more
  than one image (GPUs): a batch that is not full waits for more items until ``max_wait_s``
  after its oldest item arrived, so an item never waits longer than that for company.

``run_batch(items) -> results`` returns one result per item, in order. An exception it raises
fails every item of that batch; an exception *returned* as a result fails only that item.
Results go back to the event loop in one callback per batch.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from server.errors import NotReady, Overloaded

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger(__name__)


class BatchObserver:
    """What the batcher reports (the service's metrics implement it); does nothing itself.
    Called from the event loop and from the worker thread: implementations are thread-safe."""

    def queue_depth(self, depth: int) -> None:
        """The number of items waiting, after each change."""

    def batch_done(self, size: int, seconds: float) -> None:
        """A batch of ``size`` items took ``seconds`` on the worker."""


class Clock(Protocol):
    """The time the batcher's optional wait is measured in (tests inject one they move)."""

    def now(self) -> float:
        """Seconds, from any fixed origin."""
        ...

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        """Wait on ``condition`` (held by the caller) until it is notified or ``timeout``
        seconds of this clock have passed."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and the condition's own timed wait."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        condition.wait(timeout)


@dataclass(frozen=True)
class BatchRun:
    """The batch an item ran in: its size, and when the worker started and finished it
    (``time.perf_counter`` seconds)."""

    size: int
    started: float
    finished: float


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: "asyncio.Future[tuple[Result, BatchRun]]"
    arrived: float  # the clock's time


class MicroBatcher(Generic[Item, Result]):
    """Runs ``run_batch`` on batches of submitted items, on one worker thread.

    Use ``async with MicroBatcher(...)`` (or :meth:`start` and :meth:`stop`) inside the event
    loop that submits.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result | BaseException]],
        *,
        max_batch_size: int,
        queue_size: int,
        max_wait_s: float = 0.0,
        retry_after_s: int = 1,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        clock: Clock | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, queue_size >= 1 and max_wait_s >= 0, got "
                f"{max_batch_size}, {queue_size}, {max_wait_s}"
            )
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self.observer = observer or BatchObserver()
        self.name = name
        self._clock: Clock = clock or MonotonicClock()
        self._waiting: deque[_Pending[Item, Result]] = deque()
        self._ready = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: threading.Thread | None = None

    async def start(self) -> None:
        """Start the worker thread."""
        if self._worker is not None:
            raise RuntimeError(f"{self.name} is already started")
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._worker.start()

    async def stop(self) -> None:
        """Stop taking items: the batch on the worker finishes (its results still go out),
        waiting items fail with :class:`~server.errors.NotReady`."""
        if self._worker is None:
            return
        with self._ready:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._ready.notify_all()
        for pending in waiting:
            _fail(pending, NotReady("the service is shutting down"))
        self.observer.queue_depth(0)
        # Off the loop: the running batch's results come back through it. They are scheduled
        # before the thread ends, so they are handed out before this returns.
        await asyncio.to_thread(self._worker.join)
        self._worker = self._loop = None

    async def __aenter__(self) -> "MicroBatcher[Item, Result]":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def depth(self) -> int:
        """Items waiting for the worker (not counting the batch it runs)."""
        return len(self._waiting)

    async def submit(self, item: Item) -> Result:
        """The result of ``item``, once its batch has run. Raises
        :class:`~server.errors.Overloaded` when the queue is full."""
        result, _ = await self.submit_timed(item)
        return result

    async def submit_timed(self, item: Item) -> tuple[Result, BatchRun]:
        """:meth:`submit`, with the :class:`BatchRun` that gave the result."""
        future: asyncio.Future[tuple[Result, BatchRun]] = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._worker is None or self._stopping:
                raise NotReady(f"{self.name} is not running")
            if len(self._waiting) >= self.queue_size:
                raise Overloaded(
                    f"the inference queue is full ({self.queue_size} images waiting); retry later",
                    self.retry_after_s,
                )
            self._waiting.append(_Pending(item, future, self._clock.now()))
            depth = len(self._waiting)
            self._ready.notify()
        self.observer.queue_depth(depth)
        return await future

    # -- the worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        """Forever until stopped: take a batch, run it, send its results to the loop."""
        while (batch := self._take_batch()) is not None:
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[_Pending[Item, Result]] | None:
        """The waiting items, up to ``max_batch_size``, as soon as there is one (after the
        optional wait); None once stopping. Items whose requests were cancelled while they
        waited (client gone) are dropped, so the batch may come back empty."""
        with self._ready:
            while not self._waiting and not self._stopping:
                self._ready.wait()
            if self.max_wait_s > 0 and self._waiting:
                deadline = self._waiting[0].arrived + self.max_wait_s
                while len(self._waiting) < self.max_batch_size and not self._stopping:
                    remaining = deadline - self._clock.now()
                    if remaining <= 0:
                        break
                    self._clock.wait(self._ready, remaining)
            if self._stopping:
                return None
            count = min(len(self._waiting), self.max_batch_size)
            taken = [self._waiting.popleft() for _ in range(count)]
            depth = len(self._waiting)
        self.observer.queue_depth(depth)
        # A benign race: a request cancelled right after this check runs anyway, and its
        # result is dropped on delivery.
        return [pending for pending in taken if not pending.future.done()]

    def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        results: Sequence[Result | BaseException] = ()
        try:
            results = self.run_batch([pending.item for pending in batch])
        except BaseException as raised:  # handed to every request of the batch
            error = raised
        run = BatchRun(len(batch), started, time.perf_counter())
        self.observer.batch_done(run.size, run.finished - run.started)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._settle, batch, results, error, run)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.warning("%s: a batch finished after its event loop closed", self.name)

    def _settle(
        self,
        batch: list[_Pending[Item, Result]],
        results: Sequence[Result | BaseException],
        error: BaseException | None,
        run: BatchRun,
    ) -> None:
        """In the event loop: hand a finished batch's results (or its error) out."""
        if error is not None:
            logger.error("%s: a batch of %d failed", self.name, len(batch), exc_info=error)
            for pending in batch:
                _fail(pending, error)
            return
        if len(results) != len(batch):
            mismatch = RuntimeError(
                f"run_batch returned {len(results)} results for {len(batch)} items"
            )
            for pending in batch:
                _fail(pending, mismatch)
            return
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                _fail(pending, result)
            elif not pending.future.done():
                pending.future.set_result((result, run))


def _fail(pending: _Pending[Item, Result], error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
