"""The event spool without Redis: append, bound, replay order, a crash in the middle of a replay, a torn
tail, damaged records. The stand-in for Redis dedupes by event id the way the write script does."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serve_app.errors import FeatureStoreUnavailable, SpoolFull
from serve_app.events import event_id
from serve_app.schemas import Event
from serve_app.spool import (
    EventSpool,
    SpooledLog,
    decode_record,
    encode_record,
    replay_forever,
    replay_orphans,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _ev(k: int, user: str = "u1") -> Event:
    return Event(
        user_id=user,
        item_id=f"i{k}",
        event_type="click",
        timestamp=T0 + timedelta(milliseconds=k),
        position=k % 7,
        context={"device": "web"},
    )


@dataclass
class FakeLog:
    """Redis as the write script sees it: an id applied once (SET NX), in arrival order; `up`
    switches it off; `cut_after` applies that many of the next batch and then fails."""

    up: bool = True
    cut_after: int | None = None
    applied: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    calls: int = 0

    def apply(self, events: list[Event]) -> tuple[int, int]:
        self.calls += 1
        if not self.up:
            raise FeatureStoreUnavailable("down")
        new = 0
        for n, event in enumerate(events):
            if self.cut_after is not None and n == self.cut_after:
                self.cut_after = None
                raise FeatureStoreUnavailable("connection lost")
            eid = event_id(event)
            if eid not in self.seen:
                self.seen.add(eid)
                self.applied.append(event.item_id)
                new += 1
        return new, len(events) - new


def _log(spool: EventSpool, fake: FakeLog, batch: int = 3) -> SpooledLog[tuple[int, int]]:
    return SpooledLog(spool, fake.apply, replay_batch=batch)


def _drain(log: SpooledLog[tuple[int, int]]) -> int:
    steps = 0
    while log.replay_step() is not None:
        steps += 1
        assert steps < 1_000
    return steps


def test_a_record_is_one_json_line_that_round_trips_and_carries_its_event_id() -> None:
    event = _ev(3)
    line = encode_record(event_id(event), event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    body = json.loads(line)
    assert body["id"] == event_id(event) and body["event"]["item_id"] == "i3"
    record = decode_record(line)
    assert record.event == event and record.event_id == event_id(event)
    # One changed byte of the event no longer matches its id.
    with pytest.raises(ValueError, match="event id"):
        decode_record(line.replace(b'"i3"', b'"i4"'))
    with pytest.raises(ValueError):
        decode_record(line[:-10])


def test_appends_are_fsynced_lines_in_order_and_a_held_id_is_not_spooled_twice(
    tmp_path: Path,
) -> None:
    spool = EventSpool.open(tmp_path, max_bytes=1 << 20)
    events = [_ev(k) for k in range(5)]
    assert spool.append([(event_id(e), e) for e in events[:3]]) == (3, 0)
    # A retry of event 2 and two new ones: the retry is recognised.
    assert spool.append([(event_id(e), e) for e in events[2:]]) == (2, 1)
    lines = spool.path.read_bytes().splitlines(keepends=True)
    assert [decode_record(x).event.item_id for x in lines] == ["i0", "i1", "i2", "i3", "i4"]
    assert spool.size_bytes == sum(len(x) for x in lines) and spool.pending == 5
    chunk = spool.read(10)
    assert [r.event for r in chunk.records] == events and chunk.end == spool.size_bytes
    spool.close()


def test_a_batch_past_the_bound_is_refused_whole_and_a_smaller_one_still_fits(
    tmp_path: Path,
) -> None:
    bound = 64 * 1024
    spool = EventSpool.open(tmp_path, max_bytes=bound)

    def size_of(batch: list[Event]) -> int:
        return sum(len(encode_record(event_id(e), e)) for e in batch)

    k, expected = 0, 0
    while True:  # whole batches of 10 while they fit, sizes worked out from the encoding
        batch = [_ev(k + n) for n in range(10)]
        if expected + size_of(batch) > bound:
            break
        spool.append([(event_id(e), e) for e in batch])
        expected += size_of(batch)
        k += 10
    assert spool.size_bytes == expected == spool.path.stat().st_size
    with pytest.raises(SpoolFull, match="spool full"):
        spool.append([(event_id(e), e) for e in batch])
    assert spool.size_bytes == expected == spool.path.stat().st_size  # nothing of it written
    fits = [e for n, e in enumerate(batch) if expected + size_of(batch[: n + 1]) <= bound]
    assert fits, "the bound leaves room for at least one event"
    assert spool.append([(event_id(e), e) for e in fits]) == (len(fits), 0)
    spool.close()


def test_spooled_while_down_replayed_in_order_and_later_events_queue_behind_the_spool(
    tmp_path: Path,
) -> None:
    fake = FakeLog()
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake)
    assert log.write([_ev(0), _ev(1)]).result == (2, 0)
    fake.up = False
    down = log.write([_ev(2), _ev(3)])
    assert (down.result, down.spooled) == (None, 2)
    fake.up = True
    # Redis is back but the spool holds events: new ones go behind them, not around them.
    calls = fake.calls
    behind = log.write([_ev(4)])
    assert behind.spooled == 1 and fake.calls == calls
    assert _drain(log) == 1  # 3 events in one replay batch of 3
    assert fake.applied == ["i0", "i1", "i2", "i3", "i4"]
    assert log.spool.size_bytes == 0 and log.spool.path.stat().st_size == 0
    assert log.write([_ev(5)]).result == (1, 0)  # straight to Redis again
    assert fake.applied[-1] == "i5"


def test_a_batch_cut_off_by_the_outage_is_spooled_whole_and_applied_once(
    tmp_path: Path,
) -> None:
    fake = FakeLog(cut_after=2)
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake)
    outcome = log.write([_ev(k) for k in range(5)])  # i0, i1 reach Redis, then it fails
    assert outcome.spooled == 5
    steps = []
    while (step := log.replay_step()) is not None:
        steps.append(step.result)
    assert fake.applied == ["i0", "i1", "i2", "i3", "i4"]
    assert steps == [(1, 2), (2, 0)]  # replay batches of 3: i0, i1 recognised as seen


def test_a_crash_in_the_middle_of_a_replay_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    fake = FakeLog(up=False)
    spool = EventSpool.open(tmp_path, 1 << 20)
    log = _log(spool, fake)
    for b in range(4):
        log.write([_ev(3 * b + k) for k in range(3)])
    fake.up = True
    assert log.replay_step() is not None  # batch 1 replayed and committed
    chunk = spool.read(3)  # batch 2 applied, then the process dies before the commit
    fake.apply([r.event for r in chunk.records])
    spool.close()

    reopened = EventSpool.open(tmp_path, 1 << 20)
    assert reopened.slot == spool.slot and reopened.pending == 9
    _drain(_log(reopened, fake))
    assert fake.applied == [f"i{k}" for k in range(12)]
    assert len(fake.applied) == len(set(fake.applied)) == 12


def test_replay_resumes_after_redis_fails_again_in_the_middle(tmp_path: Path) -> None:
    fake = FakeLog(up=False)
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake)
    log.write([_ev(k) for k in range(6)])
    fake.up, fake.cut_after = True, 1
    with pytest.raises(FeatureStoreUnavailable):
        log.replay_step()  # i0 applied, then Redis went away again: the cursor stays
    _drain(log)
    assert fake.applied == [f"i{k}" for k in range(6)]


def test_a_torn_tail_line_is_dropped_at_open_and_the_whole_ones_replayed(tmp_path: Path) -> None:
    spool = EventSpool.open(tmp_path, 1 << 20)
    spool.append([(event_id(e), e) for e in (_ev(0), _ev(1))])
    path = spool.path
    spool.close()
    torn = encode_record(event_id(_ev(2)), _ev(2))[:40]
    with open(path, "ab") as out:  # a crash in the middle of an append
        out.write(torn)
    reopened = EventSpool.open(tmp_path, 1 << 20)
    assert reopened.torn_bytes == len(torn) and reopened.pending == 2
    reopened.append([(event_id(_ev(3)), _ev(3))])
    fake = FakeLog()
    _drain(_log(reopened, fake))
    assert fake.applied == ["i0", "i1", "i3"]


def test_a_damaged_line_in_the_middle_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = EventSpool.open(tmp_path, 1 << 20)
    spool.append([(event_id(e), e) for e in (_ev(0), _ev(1), _ev(2))])
    path = spool.path
    spool.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"i1"', b'"X1"')  # a flipped byte: no longer its event id
    path.write_bytes(b"".join(lines))
    fake = FakeLog()
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake, batch=10)
    step = log.replay_step()
    assert step is not None and (step.events, step.corrupt, step.emptied) == (2, 1, True)
    assert fake.applied == ["i0", "i2"]


def test_a_cursor_past_the_end_after_a_crash_in_truncation_restarts_at_zero(
    tmp_path: Path,
) -> None:
    spool = EventSpool.open(tmp_path, 1 << 20)
    spool.append([(event_id(_ev(0)), _ev(0))])
    spool.close()
    (tmp_path / "slot-0.cursor").write_text(json.dumps({"offset": 10_000}))
    reopened = EventSpool.open(tmp_path, 1 << 20)
    # A file shorter than its cursor was emptied: all it holds came after, none is skipped.
    assert reopened.pending == 1
    fake = FakeLog()
    _drain(_log(reopened, fake))
    assert fake.applied == ["i0"] and reopened.size_bytes == 0


def test_two_replicas_on_one_directory_hold_separate_slots(tmp_path: Path) -> None:
    first = EventSpool.open(tmp_path, 1 << 20)
    second = EventSpool.open(tmp_path, 1 << 20)
    assert (first.slot, second.slot) == (0, 1) and first.path != second.path
    first.append([(event_id(_ev(0)), _ev(0))])
    first.close()
    successor = EventSpool.open(tmp_path, 1 << 20)  # the dead replica's slot, with its events
    assert successor.slot == 0 and successor.pending == 1
    successor.close()
    second.close()


def test_the_replay_task_drains_when_woken_and_probes_while_redis_is_down(
    tmp_path: Path,
) -> None:
    fake = FakeLog(up=False)
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake)

    async def scenario() -> None:
        wake = asyncio.Event()
        steps: list[int] = []
        task = asyncio.create_task(
            replay_forever(log, wake, 0.01, lambda s: steps.append(s.events))
        )
        log.write([_ev(k) for k in range(7)])
        wake.set()
        await _until(lambda: fake.calls >= 3)  # probing, not applying
        assert fake.applied == []
        fake.up = True
        await _until(lambda: not log.spool.has_pending)
        assert steps == [3, 3, 1] and fake.applied == [f"i{k}" for k in range(7)]
        task.cancel()

    asyncio.run(scenario())


def test_while_redis_is_down_the_replay_probes_with_a_ping_not_with_chunks(
    tmp_path: Path,
) -> None:
    fake = FakeLog(up=False)
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake)
    pings = 0

    def ping() -> None:
        nonlocal pings
        pings += 1
        if not fake.up:
            raise FeatureStoreUnavailable("down")

    async def scenario() -> None:
        wake = asyncio.Event()
        task = asyncio.create_task(replay_forever(log, wake, 0.01, probe=ping))
        log.write([_ev(k) for k in range(4)])  # one failed write: the spool holds 4
        wake.set()
        await _until(lambda: pings >= 5)
        assert fake.calls == 2  # the failed write and the first replay attempt; then pings only
        fake.up = True
        await _until(lambda: not log.spool.has_pending)
        assert fake.applied == ["i0", "i1", "i2", "i3"]
        task.cancel()

    asyncio.run(scenario())


async def _until(condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_the_spool_of_a_departed_replica_is_replayed_by_a_live_one(tmp_path: Path) -> None:
    live = EventSpool.open(tmp_path, 1 << 20)
    departed = EventSpool.open(tmp_path, 1 << 20)
    departed.append([(event_id(e), e) for e in (_ev(0), _ev(1), _ev(2))])
    fake = FakeLog()
    steps: list[int] = []
    # While its replica lives, its slot is its own.
    assert replay_orphans(tmp_path, live.slot, fake.apply, 2, lambda s: steps.append(s.events)) == 0
    departed.close()  # the replica is gone (its flock released with its process)
    assert replay_orphans(tmp_path, live.slot, fake.apply, 2, lambda s: steps.append(s.events)) == 3
    assert fake.applied == ["i0", "i1", "i2"] and steps == [2, 1]
    assert (tmp_path / "slot-1.jsonl").stat().st_size == 0
    fake.up = False  # Redis down: a slot stays for the next call
    other = EventSpool.claim(tmp_path, 1, 1 << 20)
    assert other is not None
    other.append([(event_id(_ev(3)), _ev(3))])
    other.close()
    assert replay_orphans(tmp_path, live.slot, fake.apply, 2) == 0
    assert EventSpool.claim(tmp_path, 1, 1 << 20) is not None  # released again
    live.close()


def test_a_retry_older_than_the_remembered_ids_is_spooled_again_and_applied_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serve_app.spool

    monkeypatch.setattr(serve_app.spool, "RECENT_IDS", 2)
    fake = FakeLog(up=False)
    log = _log(EventSpool.open(tmp_path, 1 << 20), fake)
    assert log.write([_ev(0)]).spooled == 1
    assert log.write([_ev(1), _ev(2)]).spooled == 2
    assert log.write([_ev(2)]).duplicates == 1  # still remembered
    assert log.write([_ev(0)]).spooled == 1  # forgotten: spooled again
    fake.up = True
    _drain(log)
    assert fake.applied == ["i0", "i1", "i2"]  # Redis's seen marker skipped the second i0
