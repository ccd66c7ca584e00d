"""A micro-batcher: requests from many coroutines, run together on ONE worker thread.

The engine is fastest on batches and is not safe to call from several threads at once, while
requests arrive one image at a time on the event loop. :class:`MicroBatcher` bridges the two:

- :meth:`~MicroBatcher.submit` puts an item on a bounded asyncio queue and awaits its result. A
  full queue is refused at once with :class:`~server.errors.Overloaded` (503 + Retry-After):
  under overload, failing fast beats letting latency grow without bound.
- A collector coroutine takes the first waiting item, then keeps taking items until it holds
  ``max_batch_size`` of them or ``max_wait_s`` has passed since the first, and hands the batch
  to a single worker thread (``run_batch``). While the worker runs, new items queue up, so
  batches grow with the load by themselves.

``run_batch(items) -> results`` returns one result per item, in order. An exception it raises
fails every item of that batch; an exception *returned* as a result fails only that item.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.errors import NotReady, Overloaded

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger(__name__)


class BatchObserver:
    """What the batcher reports (the service's metrics implement it); does nothing itself."""

    def queue_depth(self, depth: int) -> None:
        """The number of items waiting, after each change."""

    def batch_done(self, size: int, seconds: float) -> None:
        """A batch of ``size`` items took ``seconds`` on the worker."""


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: "asyncio.Future[Result]"


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
        max_wait_s: float,
        queue_size: int,
        retry_after_s: int = 1,
        observer: BatchObserver | None = None,
        name: str = "batcher",
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
        self._queue: asyncio.Queue[_Pending[Item, Result]] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._worker: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the collector and the worker thread."""
        if self._collector is not None:
            raise RuntimeError(f"{self.name} is already started")
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._collector = asyncio.create_task(self._collect(), name=f"{self.name}-collector")

    async def stop(self) -> None:
        """Stop taking items: the batch on the worker finishes, waiting items fail with
        :class:`~server.errors.NotReady`."""
        if self._collector is None or self._queue is None or self._worker is None:
            return
        self._collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._collector
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            _fail(pending, NotReady("the service is shutting down"))
        self._worker.shutdown(wait=True)
        self._collector = self._queue = self._worker = None

    async def __aenter__(self) -> "MicroBatcher[Item, Result]":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def depth(self) -> int:
        """Items waiting for the worker (not counting the batch it runs)."""
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, item: Item) -> Result:
        """The result of ``item``, once its batch has run. Raises
        :class:`~server.errors.Overloaded` when the queue is full."""
        if self._queue is None:
            raise NotReady(f"{self.name} is not running")
        pending = _Pending(item, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Overloaded(
                f"the inference queue is full ({self.queue_size} images waiting); retry later",
                self.retry_after_s,
            ) from None
        self.observer.queue_depth(self._queue.qsize())
        return await pending.future

    async def _collect(self) -> None:
        """Forever: take a batch, run it on the worker, hand out its results."""
        assert self._queue is not None and self._worker is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(self._queue)
            self.observer.queue_depth(self._queue.qsize())
            # Items whose requests were cancelled while waiting (client gone) are not run.
            batch = [pending for pending in batch if not pending.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            items = [pending.item for pending in batch]
            running = loop.run_in_executor(self._worker, self.run_batch, items)
            # asyncio.wait, unlike awaiting `running`, does not cancel it when we are cancelled.
            try:
                await asyncio.wait([running])
            except asyncio.CancelledError:
                # Stopping: the worker finishes the batch anyway, so its results still go out.
                await asyncio.wait([running])
                self._settle(batch, running, started)
                raise
            self._settle(batch, running, started)

    def _settle(
        self,
        batch: list[_Pending[Item, Result]],
        done: "asyncio.Future[Sequence[Result | BaseException]]",
        started: float,
    ) -> None:
        """Hand a finished batch's results (or its error) to the waiting requests."""
        error = done.exception()
        if error is not None:
            logger.error("%s: a batch of %d failed", self.name, len(batch), exc_info=error)
            for pending in batch:
                _fail(pending, error)
            return
        self.observer.batch_done(len(batch), time.perf_counter() - started)
        _deliver(batch, done.result())

    async def _next_batch(
        self, queue: "asyncio.Queue[_Pending[Item, Result]]"
    ) -> list[_Pending[Item, Result]]:
        """The first waiting item and those that arrive within ``max_wait_s`` of it, at most
        ``max_batch_size``."""
        batch = [await queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch


def _deliver(
    batch: list[_Pending[Item, Result]], results: Sequence[Result | BaseException]
) -> None:
    if len(results) != len(batch):
        error = RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        for pending in batch:
            _fail(pending, error)
        return
    for pending, result in zip(batch, results, strict=True):
        if isinstance(result, BaseException):
            _fail(pending, result)
        elif not pending.future.done():
            pending.future.set_result(result)


def _fail(pending: _Pending[Item, Result], error: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
