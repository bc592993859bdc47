"""Batcher: groups concurrent awaits into batches, bounded in size, wait, concurrency and backlog.

The Ingress groups requests into batches before the first hop, and every stage merges the batches
that reach it while it is busy, so that each handle hop carries many requests (a hop costs
milliseconds of CPU in Python; a batch pays it once). Pure asyncio: no Ray in here.

A batch is cut when it reaches `max_batch_size` (summed `size` of its items) or `batch_wait_timeout_s`
after its first item, and only while fewer than `max_concurrent_batches` run: under load the next batch
fills while the others run, so batches grow with the load and a hop's cost is paid once per batch.
Beyond `max_pending` waiting items a `submit` raises `Overloaded` at once. So it does, under a
standing queue, for an item that would wait longer than `max_wait_s` (the items queued ahead of it
times the measured busy seconds per item). A bound on the wait rather than the count is what keeps
latency under overload: how many items fit in a wait changes with batch sizes, placement and node,
the seconds per item are measured. A queue *stands* when, for `standing_queue_s`, the batcher was
never idle and every batch cut found more than half of `max_wait_s` of work waiting (arrivals outpace
the batches); a burst that clears sooner, or that comes to an idle batcher, is queued, not refused (the idea of CoDel, as RPC servers use it: a short bound on the wait
only while the queue does not drain). Nor is a queue behind a *stalled* batch refused: one running
longer than `STALL_FACTOR` times the recent batches' mean duration is waiting on something that failed
(a stage replica killed, its deadline not yet out), not on the pace, and the fallbacks answer the
queue as soon as it ends; the queue must then stand anew before the bound refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from serve_app.config import BatchOptions
from serve_app.errors import Overloaded

logger = logging.getLogger(__name__)

# Weight of the newest batch in the running means (busy seconds per item, a batch's duration): a few
# batches follow a change of load (bigger batches cost less per item), one slow batch does not swing it.
MEAN_WEIGHT = 0.2
# A batch counts at most this many times the running mean: a version loading, a GC pause or a stage
# timing out stalls one batch for seconds, which is not the pace (a real change of pace still moves the
# mean by MEAN_WEIGHT x (this - 1) per batch, doubling within a few batches).
MEAN_MAX_STEP = 2.0
# A batch running this many times the mean duration of the recent ones is stalled: overload slows the
# batches gradually (the mean follows), a failed stage holds one until its deadline (0.5 s against
# milliseconds).
STALL_FACTOR = 4.0

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """`await submit(item)` returns `run(batch)[position of item]`; `run` must return one result per
    item, in order (an exception fails every item of the batch)."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        options: BatchOptions,
        *,
        size: Callable[[T], int] = lambda _: 1,
        on_batch: Callable[[int], None] | None = None,
        name: str = "batch",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._options = options
        self._size = size
        self._on_batch = on_batch
        self._name = name
        self._clock = clock
        self._item_seconds: float | None = None  # busy seconds per item, running mean
        self._batch_seconds: float | None = None  # a batch's own duration, running mean
        self._started: list[float] = []  # when each running batch started
        self._busy_mark = 0.0  # busy time is accounted up to here
        self._calm_at = clock()  # the last batch cut that found little work waiting
        self._queue: deque[tuple[T, asyncio.Future[R], int]] = deque()
        self._queued = 0  # summed size of the queued items
        self._running = 0
        self._changed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def options(self) -> BatchOptions:
        return self._options

    @property
    def queued(self) -> int:
        """Items waiting for a batch (summed size)."""
        return self._queued

    @property
    def item_seconds(self) -> float | None:
        """Busy seconds per item (wall time with a batch running, over the items done), a running
        mean over the recent batches; None before the first batch ends."""
        return self._item_seconds

    def expected_wait(self, size: int = 1) -> float:
        """Seconds an item of `size` submitted now would wait by the measured pace (0 if unknown)."""
        if self._item_seconds is None:
            return 0.0
        return (self._queued + size) * self._item_seconds

    def standing(self) -> bool:
        """Whether the queue has stood for longer than standing_queue_s: no idle moment, no stalled
        batch and more than half of max_wait_s of work at every batch cut."""
        # Behind a stalled batch the wait is on a failure, not on the pace (and after it the queue
        # must stand anew: _account).
        if self.stalled():
            return False
        return self._clock() - self._calm_at > self._options.standing_queue_s

    def stalled(self) -> bool:
        """Whether a running batch has run STALL_FACTOR times the recent batches' mean duration."""
        return bool(self._started) and self._is_stall(self._clock() - min(self._started))

    def _is_stall(self, seconds: float) -> bool:
        """Whether a batch running `seconds` has run STALL_FACTOR times the recent batches' mean."""
        return self._batch_seconds is not None and seconds > STALL_FACTOR * self._batch_seconds

    def configure(self, options: BatchOptions) -> None:
        """New limits, from the next batch on."""
        self._options = options
        self._changed.set()

    async def submit(self, item: T) -> R:
        size = self._size(item)
        limit = self._options.max_pending
        if limit is not None and self._queued + size > limit and self._queued > 0:
            raise Overloaded(f"{self._queued} requests already waiting, retry")
        if self._queued == 0 and self._running == 0:
            self._calm_at = self._clock()  # idle: whatever came before, nothing stands now
        max_wait = self._options.max_wait_s
        if max_wait is not None and self._queued > 0:
            wait = self.expected_wait(size)
            if wait > max_wait and self.standing():
                raise Overloaded(f"{self._queued} requests already waiting (~{wait:.3f} s), retry")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, size))
        self._queued += size
        self._changed.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._cut_batches())
        return await future

    async def _wait_change(self, timeout: float | None) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _cut_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue or self._running >= self._options.max_concurrent_batches:
                await self._wait_change(None)
            options = self._options
            deadline = loop.time() + options.batch_wait_timeout_s
            while self._queued < options.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._wait_change(remaining)
            if options.max_wait_s is None or self.expected_wait(0) <= options.max_wait_s / 2:
                self._calm_at = self._clock()
            batch = self._take(options.max_batch_size)
            if not batch:
                continue
            if self._running == 0:
                self._busy_mark = self._clock()  # idle until now: not busy time
            self._running += 1
            started = self._clock()
            self._started.append(started)
            task = loop.create_task(self._execute(batch, started))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, limit: int) -> list[tuple[T, asyncio.Future[R]]]:
        """Up to `limit` (summed size) from the queue, at least one item; abandoned ones dropped."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        total = 0
        while self._queue:
            item, future, size = self._queue[0]
            if batch and total + size > limit:
                break
            self._queue.popleft()
            self._queued -= size
            if future.done():  # the caller gave up (timeout, disconnect): no work for it
                continue
            batch.append((item, future))
            total += size
        return batch

    async def _execute(self, batch: list[tuple[T, asyncio.Future[R]]], started: float) -> None:
        try:
            if self._on_batch is not None:
                self._on_batch(sum(self._size(item) for item, _ in batch))
            try:
                results = await self._run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"{self._name}: {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._started.remove(started)  # at most max_concurrent_batches entries
            self._account(len(batch), started)
            self._running -= 1
            self._changed.set()

    def _account(self, items: int, started: float) -> None:
        """A batch of `items` started at `started` ended: the busy time since the last end (or since
        the batcher went busy) over its items is the newest measure of seconds per item. With
        batches overlapping, each end takes the time since the one before, so the measure is the
        pace, not a batch's own duration (kept beside it, to tell a stalled batch)."""
        now = self._clock()
        if self._is_stall(now - started):
            # A stall ended: what queued behind it must stand anew to be refused.
            self._calm_at = now
        self._item_seconds = _mean_step(
            self._item_seconds, max(now - self._busy_mark, 0.0) / max(items, 1)
        )
        self._batch_seconds = _mean_step(self._batch_seconds, max(now - started, 0.0))
        self._busy_mark = now

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()


def _mean_step(mean: float | None, sample: float) -> float:
    """The running mean after `sample`, which counts at most MEAN_MAX_STEP times the mean."""
    if mean is None:
        return sample
    sample = min(sample, MEAN_MAX_STEP * mean)
    return mean + MEAN_WEIGHT * (sample - mean)
