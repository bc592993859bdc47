"""The Batcher groups concurrent submissions: bounded size and wait, batches in flight, backlog."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.batching import Batcher
from serve_app.config import BatchOptions
from serve_app.errors import Overloaded
from tests.manual_clock import Clock


class Recorder:
    """A batch function that records every batch and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.release.wait()
        self.running -= 1
        return [i * 10 for i in items]


async def until(condition: object, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_concurrent_submissions_share_a_batch_and_get_their_own_results() -> None:
    async def scenario() -> None:
        run = Recorder()
        batcher = Batcher(run, BatchOptions(max_batch_size=8, batch_wait_timeout_s=0.05))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        assert results == [0, 10, 20, 30, 40]
        assert run.batches == [[0, 1, 2, 3, 4]]

    asyncio.run(scenario())


def test_a_batch_never_exceeds_its_size_and_the_rest_follows() -> None:
    async def scenario() -> None:
        run = Recorder()
        batcher = Batcher(run, BatchOptions(max_batch_size=3, batch_wait_timeout_s=0.05))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
        assert results == [i * 10 for i in range(7)]
        assert [len(b) for b in run.batches] == [3, 3, 1]
        assert [i for b in run.batches for i in b] == list(range(7))  # arrival order kept

    asyncio.run(scenario())


def test_sizes_are_summed_when_items_are_batches_themselves() -> None:
    async def scenario() -> None:
        seen: list[list[list[int]]] = []

        async def run(calls: list[list[int]]) -> list[int]:
            seen.append(calls)
            return [len(c) for c in calls]

        batcher: Batcher[list[int], int] = Batcher(
            run, BatchOptions(max_batch_size=5, batch_wait_timeout_s=0.05), size=len
        )
        out = await asyncio.gather(*(batcher.submit([1] * n) for n in (2, 2, 2, 4)))
        assert out == [2, 2, 2, 4]
        assert [[len(c) for c in calls] for calls in seen] == [[2, 2], [2], [4]]

    asyncio.run(scenario())


def test_batches_in_flight_are_bounded_and_the_next_one_fills_meanwhile() -> None:
    async def scenario() -> None:
        run = Recorder()
        run.release.clear()
        batcher = Batcher(
            run,
            BatchOptions(max_batch_size=100, batch_wait_timeout_s=0.0, max_concurrent_batches=1),
        )
        first = asyncio.ensure_future(batcher.submit(0))
        await until(lambda: run.batches == [[0]])
        later = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.02)
        assert run.batches == [[0]] and batcher.queued == 5  # waiting for the running batch
        run.release.set()
        assert await first == 0 and await asyncio.gather(*later) == [10, 20, 30, 40, 50]
        assert run.batches == [[0], [1, 2, 3, 4, 5]] and run.most_running == 1

    asyncio.run(scenario())


def test_beyond_max_pending_a_submission_is_refused_at_once() -> None:
    async def scenario() -> None:
        run = Recorder()
        run.release.clear()
        options = BatchOptions(
            max_batch_size=2, batch_wait_timeout_s=0.0, max_concurrent_batches=1, max_pending=3
        )
        batcher = Batcher(run, options)
        running = asyncio.ensure_future(batcher.submit(0))
        await until(lambda: run.batches == [[0]])
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Overloaded):
            await batcher.submit(4)
        assert loop.time() - start < 0.05
        run.release.set()
        assert await running == 0 and await asyncio.gather(*waiting) == [10, 20, 30]
        assert await batcher.submit(5) == 50  # the backlog drained: accepted again

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_items_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        calls = 0

        async def run(items: list[int]) -> list[int]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ValueError("stage down")
            return items

        batcher = Batcher(run, BatchOptions(max_batch_size=4, batch_wait_timeout_s=0.02))
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(2), return_exceptions=True
        )
        assert all(isinstance(o, ValueError) for o in outcomes)
        assert await batcher.submit(3) == 3

    asyncio.run(scenario())


def test_an_abandoned_submission_is_left_out_of_its_batch() -> None:
    async def scenario() -> None:
        run = Recorder()
        run.release.clear()
        batcher = Batcher(
            run, BatchOptions(max_batch_size=10, batch_wait_timeout_s=0.0, max_concurrent_batches=1)
        )
        first = asyncio.ensure_future(batcher.submit(0))
        await until(lambda: len(run.batches) == 1)
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()  # the caller timed out while waiting
        run.release.set()
        assert await first == 0 and await kept == 20
        assert run.batches == [[0], [2]]

    asyncio.run(scenario())


def test_new_options_apply_to_the_next_batch() -> None:
    async def scenario() -> None:
        run = Recorder()
        batcher = Batcher(run, BatchOptions(max_batch_size=1, batch_wait_timeout_s=0.02))
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        batcher.configure(BatchOptions(max_batch_size=10, batch_wait_timeout_s=0.02))
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        assert [len(b) for b in run.batches] == [1, 1, 1, 3]

    asyncio.run(scenario())


class Gated:
    """A batch function whose every batch waits for its own release; `clock` is advanced by the test."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, items: list[int]) -> list[int]:
        gate = asyncio.Event()
        self.batches.append(list(items))
        self.gates.append(gate)
        await gate.wait()
        return [i * 10 for i in items]


async def one_batch(
    batcher: Batcher[int, int], run: Gated, clock: Clock, item: int, seconds: float
) -> int:
    """`item` alone through `batcher` (nothing else queued), its batch taking `seconds` on `clock`."""
    before = len(run.batches)
    done = asyncio.ensure_future(batcher.submit(item))
    await until(lambda: len(run.batches) == before + 1)
    clock.now += seconds
    run.gates[before].set()
    return await done


def test_under_a_standing_queue_a_request_that_would_wait_past_max_wait_is_refused() -> None:
    async def scenario() -> None:
        run, clock = Gated(), Clock()
        options = BatchOptions(
            max_batch_size=2,
            batch_wait_timeout_s=0.0,
            max_concurrent_batches=1,
            max_wait_s=0.14,
            standing_queue_s=0.1,
        )
        batcher = Batcher(run, options, clock=clock)
        assert batcher.item_seconds is None and batcher.expected_wait() == 0.0
        first = [asyncio.ensure_future(batcher.submit(i)) for i in (0, 1)]
        await until(lambda: run.batches == [[0, 1]])
        clock.now += 0.1  # two items in 0.1 s of busy time: 0.05 s each
        run.gates[0].set()
        assert await asyncio.gather(*first) == [0, 10]
        assert batcher.item_seconds == pytest.approx(0.05)

        held = asyncio.ensure_future(batcher.submit(2))  # runs alone, holding the next ones
        await until(lambda: len(run.batches) == 2)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (3, 4)]
        await asyncio.sleep(0)
        # (2 queued + itself) x 0.05 s = 0.15 s > 0.14 s, but the queue has not stood yet: a
        # burst is queued, not refused
        assert batcher.expected_wait() == pytest.approx(0.15) and not batcher.standing()
        waiting.append(asyncio.ensure_future(batcher.submit(5)))
        await asyncio.sleep(0)
        assert batcher.queued == 3
        clock.now += 0.2  # no batch cut for 0.2 s with work waiting: the queue stands
        assert batcher.standing()
        with pytest.raises(Overloaded):
            await batcher.submit(6)  # refused without waiting
        assert not any(w.done() for w in waiting)  # the ones let in keep their place
        run.gates[1].set()
        await until(lambda: len(run.batches) == 3)
        assert batcher.standing()  # that cut found 3 waiting: more than half of max_wait of work
        run.gates[2].set()
        await until(lambda: len(run.batches) == 4)
        assert not batcher.standing()  # the next found 1 waiting (< half of max_wait): calm again
        run.gates[3].set()
        assert await held == 20 and await asyncio.gather(*waiting) == [30, 40, 50]
        # the queue drained: a request finding nobody waiting is taken whatever the pace
        clock.now += 60.0
        late = asyncio.ensure_future(batcher.submit(7))
        await until(lambda: len(run.batches) == 5)
        run.gates[4].set()
        assert await late == 70

    asyncio.run(scenario())


def test_busy_seconds_per_item_follow_the_pace_of_overlapping_batches() -> None:
    async def scenario() -> None:
        run, clock = Gated(), Clock()
        options = BatchOptions(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
        batcher = Batcher(run, options, clock=clock)
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(12)]
        await until(lambda: len(run.batches) == 2)
        # each batch takes 0.1 s, but two run at once, one ending every 0.05 s: 0.05 s per item
        clock.now += 0.1
        run.gates[0].set()
        for ended in range(1, 11):
            await until(lambda ended=ended: len(run.batches) == min(ended + 2, 12))
            clock.now += 0.05
            run.gates[ended].set()
        await until(lambda: pending[10].done())
        assert batcher.item_seconds is not None
        assert 0.05 <= batcher.item_seconds < 0.06  # the pace, far from a batch's own 0.1 s
        clock.now += 0.05
        run.gates[11].set()
        await asyncio.gather(*pending)
        # idle time is not busy time: after a pause, the next batch's time starts at its start
        clock.now += 30.0
        after = asyncio.ensure_future(batcher.submit(9))
        await until(lambda: len(run.batches) == 13)
        clock.now += 0.05
        run.gates[12].set()
        await after
        assert batcher.item_seconds < 0.06

    asyncio.run(scenario())


def test_a_burst_reaching_an_idle_batcher_is_queued_whatever_came_before() -> None:
    async def scenario() -> None:
        run, clock = Gated(), Clock()
        options = BatchOptions(
            max_batch_size=4, batch_wait_timeout_s=0.0, max_concurrent_batches=1, max_wait_s=0.05
        )
        batcher = Batcher(run, options, clock=clock)
        await one_batch(batcher, run, clock, 0, 0.02)  # 0.02 s per item
        clock.now += 5.0  # quiet: no batch cut for far longer than standing_queue_s
        burst = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0)
        # 10 at once, up to ~0.2 s of work: a standing queue would refuse most, an idle one takes all
        assert not any(b.done() for b in burst)  # none refused
        for gate in range(1, 4):
            await until(lambda gate=gate: len(run.batches) == gate + 1)
            run.gates[gate].set()
        assert await asyncio.gather(*burst) == [i * 10 for i in range(1, 11)]

    asyncio.run(scenario())


def test_one_stalled_batch_does_not_make_the_pace_and_refuse_what_follows() -> None:
    async def scenario() -> None:
        run, clock = Gated(), Clock()
        options = BatchOptions(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=1)
        batcher = Batcher(run, options, clock=clock)
        for i in range(5):  # 0.01 s per item
            await one_batch(batcher, run, clock, i, 0.01)
        assert batcher.item_seconds == pytest.approx(0.01)
        await one_batch(batcher, run, clock, 5, 3.0)  # a version loading: 3 s for one item
        # counted as twice the pace at most: 0.012 s, not the 0.61 s a plain mean would give (which
        # would refuse a second request queued behind one at any max_wait_s below 1.2 s)
        assert batcher.item_seconds == pytest.approx(0.012)
        for i in range(6, 16):  # a pace that really doubles is followed within a few batches
            await one_batch(batcher, run, clock, i, 0.02)
        assert batcher.item_seconds == pytest.approx(0.02, rel=0.05)

    asyncio.run(scenario())


def test_a_queue_behind_a_stalled_batch_is_not_refused_and_must_stand_anew_after() -> None:
    async def scenario() -> None:
        run, clock = Gated(), Clock()
        options = BatchOptions(
            max_batch_size=1,
            batch_wait_timeout_s=0.0,
            max_concurrent_batches=1,
            max_wait_s=0.05,
            standing_queue_s=0.1,
        )
        batcher = Batcher(run, options, clock=clock)
        for i in range(5):  # batches of 0.01 s, 0.01 s per item
            await one_batch(batcher, run, clock, i, 0.01)
        # A stage was killed: this batch is held to its deadline.
        held = asyncio.ensure_future(batcher.submit(100))
        await until(lambda: len(run.batches) == 6)
        accepted = [asyncio.ensure_future(batcher.submit(i)) for i in range(101, 107)]
        await asyncio.sleep(0)
        clock.now += 0.5
        # 0.5 s without a cut and 7 x 0.01 s > max_wait_s of work: without the stall it would stand
        assert batcher.stalled() and not batcher.standing()
        accepted.append(asyncio.ensure_future(batcher.submit(107)))
        await asyncio.sleep(0)
        assert batcher.queued == 7  # queued, not refused: the fallbacks answer it
        clock.now += 0.3  # still held, no one asking
        run.gates[5].set()  # the deadline: the stalled batch ends
        await until(lambda: len(run.batches) == 7)
        assert not batcher.stalled() and not batcher.standing()  # it must stand anew
        refused_after = None
        for step in range(1, 16):  # batches of 0.01 s again, each replaced by a new request
            clock.now += 0.01
            run.gates[5 + step].set()
            await until(lambda step=step: len(run.batches) == 7 + step)
            submitted = asyncio.ensure_future(batcher.submit(107 + step))
            await asyncio.sleep(0)
            if submitted.done() and isinstance(submitted.exception(), Overloaded):
                refused_after = step
                break
            accepted.append(submitted)
        # refused once the queue had stood standing_queue_s (0.1 s) past the stall's end, not before
        assert refused_after is not None and refused_after * 0.01 > 0.1 - 1e-9
        while not all(a.done() for a in accepted):
            for gate in run.gates:
                gate.set()
            await asyncio.sleep(0.001)
        assert await held == 1000
        answered = await asyncio.gather(*accepted)
        assert answered == [i * 10 for i in range(101, 108 + refused_after - 1)]

    asyncio.run(scenario())
