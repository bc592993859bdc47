"""Events through a Redis outage on a real (private) redis-server: spooled while it is stopped, replayed
in order when it is back, none lost, none twice, and the real-time features equal a serial replay of
what was sent (worked out with the pure functions, not read back from the writer)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.events import EventLogWriter, ItemEmbeddings, WriteResult, ema_update, event_id
from serve_app.features import FeatureShapes, OnlineFeatureReader, connect_redis
from serve_app.schemas import POSITIVE_EVENT_TYPES, Event
from serve_app.spool import EventSpool, SpooledLog, replay_forever
from tests.conftest import PrivateRedis

pytestmark = pytest.mark.integration

# The acceptance: 6 event batches/s across a 20 s Redis outage.
BATCHES_PER_SECOND = 6
EVENTS_PER_BATCH = 5
BEFORE_S, OUTAGE_S, AFTER_S = 3.0, 20.0, 4.0
HISTORY, DIM, N_ITEMS, N_USERS = 5, 4, 40, 12
RATE = 0.1
PREFIX = "rt"
STREAM = "rt:events"


class DurableRedis(PrivateRedis):
    """A private redis-server with an fsync'd append-only file: stopped and started again it keeps
    its data, as a restarted Redis pod with persistence does."""

    persistence = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def durable_redis(tmp_path: Path) -> Any:
    server = DurableRedis(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


def _embeddings() -> ItemEmbeddings:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    return ItemEmbeddings("v1", {f"i{k}": k for k in range(N_ITEMS)}, vectors)


def _writer(url: str) -> EventLogWriter:
    return EventLogWriter(
        connect_redis(url, 0.25),
        RealtimeConfig(key_prefix=PREFIX, history_length=HISTORY, ema_rate=RATE),
        EventLogConfig(stream_key=STREAM),
    )


def _batch(n: int, start: datetime) -> list[Event]:
    kinds = ("click", "view", "purchase", "add_to_cart", "click", "skip")
    return [
        Event(
            user_id=f"u{(n * EVENTS_PER_BATCH + k) % N_USERS}",
            item_id=f"i{(n * 7 + k * 3) % N_ITEMS}",
            event_type=kinds[(n + k) % len(kinds)],
            timestamp=start + timedelta(milliseconds=10 * (n * EVENTS_PER_BATCH + k)),
        )
        for k in range(EVENTS_PER_BATCH)
    ]


@dataclass
class Run:
    sent: list[Event] = field(default_factory=list)
    spooled: int = 0
    direct: int = 0
    write_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    restarted_at: float | None = None
    replay_done: float | None = None


def _expected_user_state(
    sent: list[Event], emb: ItemEmbeddings
) -> dict[str, tuple[int, tuple[str, ...], np.ndarray | None]]:
    """Per user: events, recent items, delta embedding, after a serial replay of `sent`."""
    from serve_app.config import RealtimeConfig
    from serve_app.events import event_alpha

    weights = RealtimeConfig().event_weights
    state: dict[str, tuple[int, tuple[str, ...], np.ndarray | None]] = {}
    for e in sent:
        count, recent, delta = state.get(e.user_id, (0, (), None))
        if e.event_type in POSITIVE_EVENT_TYPES and e.item_id not in recent:
            recent = (e.item_id, *recent)[:HISTORY]
        alpha = event_alpha(e.event_type, weights, RATE)
        if alpha > 0:
            delta = ema_update(delta, emb.vectors[emb.item_index[e.item_id]], alpha)
        state[e.user_id] = (count + 1, recent, delta)
    return state


def test_twenty_seconds_of_redis_outage_at_six_batches_a_second_lose_and_double_nothing(
    durable_redis: DurableRedis, tmp_path: Path
) -> None:
    emb = _embeddings()
    writer = _writer(durable_redis.url)
    spool = EventSpool.open(tmp_path / "spool", max_bytes=8 << 20)
    log: SpooledLog[WriteResult] = SpooledLog(spool, lambda evs: writer.write(evs, emb), 200)
    run = Run()
    # Counters keep one-minute slots; all events share a recent start so the 1 h window holds them.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    total = int((BEFORE_S + OUTAGE_S + AFTER_S) * BATCHES_PER_SECOND)

    def replayed(step: Any) -> None:
        if step.emptied:
            run.replay_done = time.perf_counter()

    async def scenario() -> None:
        wake = asyncio.Event()
        replayer = asyncio.create_task(replay_forever(log, wake, 0.1, replayed, probe=writer.ping))
        t0 = time.perf_counter()
        stopped = restarted = False
        for n in range(total):
            due = t0 + n / BATCHES_PER_SECOND
            await asyncio.sleep(max(0.0, due - time.perf_counter()))  # the open-loop schedule
            elapsed = time.perf_counter() - t0
            if not stopped and elapsed >= BEFORE_S:
                await asyncio.to_thread(durable_redis.stop)
                stopped = True
            if stopped and not restarted and elapsed >= BEFORE_S + OUTAGE_S:
                await asyncio.to_thread(durable_redis.start)
                run.restarted_at, restarted = time.perf_counter(), True
            batch = _batch(n, start)
            began = time.perf_counter()
            outcome = await asyncio.to_thread(log.write, batch)
            took = (time.perf_counter() - began) * 1000
            run.sent.extend(batch)
            if outcome.result is None:
                assert outcome.spooled == len(batch) and outcome.duplicates == 0
                run.spooled += outcome.spooled
                run.write_ms["spooled"].append(took)
                wake.set()
            else:
                assert outcome.result.accepted == len(batch)
                run.direct += len(batch)
                run.write_ms["redis"].append(took)
        deadline = time.perf_counter() + 30
        while spool.has_pending:  # the replay catches up with the new events queued behind it
            assert time.perf_counter() < deadline, "the spool was not replayed in time"
            await asyncio.sleep(0.02)
        replayer.cancel()

    asyncio.run(scenario())

    # Every batch answered: straight to Redis or spooled; the outage's batches were all spooled.
    assert run.direct + run.spooled == len(run.sent) == total * EVENTS_PER_BATCH
    assert run.spooled >= OUTAGE_S * BATCHES_PER_SECOND * EVENTS_PER_BATCH * 0.9
    assert spool.size_bytes == 0 and spool.path.stat().st_size == 0

    client: Any = redis.Redis.from_url(durable_redis.url)
    entries = client.xrange(STREAM)
    logged = [fields[b"event_id"].decode() for _, fields in entries]
    sent_ids = [event_id(e) for e in run.sent]
    lost = set(sent_ids) - set(logged)
    duplicated = len(logged) - len(set(logged))
    assert (len(lost), duplicated) == (0, 0)
    assert logged == sent_ids  # in the order sent: the spool kept it across the outage

    # Real-time features caught up: equal to a serial replay of everything sent.
    reader = OnlineFeatureReader(
        None,
        connect_redis(durable_redis.url, 0.5),
        key_prefix=PREFIX,
        store_on_redis=False,
        breaker_cooldown_seconds=0.3,
    )
    expected = _expected_user_state(run.sent, emb)
    users = sorted(expected)
    got = reader.users(
        users, FeatureShapes(2, DIM, HISTORY), model_version="v1", now=time.time() + 1
    )
    assert not got.degraded
    for row, user in enumerate(users):
        count, recent, delta = expected[user]
        assert got.count_1h[row] == count, user
        assert got.recent_items[row] == recent, user
        assert delta is not None
        np.testing.assert_array_equal(got.delta_embedding[row], delta)

    spooled_ms = np.array(run.write_ms["spooled"])
    replay_s = (run.replay_done or 0) - (run.restarted_at or 0)
    print(
        f"\nsent {len(run.sent)} events in {total} batches; {run.spooled} spooled, "
        f"{run.direct} straight to Redis; lost {len(lost)}, duplicated {duplicated}\n"
        f"spooled batch write: p50 {np.percentile(spooled_ms, 50):.2f} ms, "
        f"p99 {np.percentile(spooled_ms, 99):.2f} ms, max {spooled_ms.max():.2f} ms "
        f"(Redis: p50 {np.percentile(run.write_ms['redis'], 50):.2f} ms)\n"
        f"Redis answering again -> spool empty: {replay_s:.2f} s "
        f"({run.spooled / replay_s:.0f} events/s, probes every 0.1 s included)"
    )


def test_a_batch_cut_by_the_outage_and_a_replay_cut_by_a_crash_are_applied_once(
    durable_redis: DurableRedis, tmp_path: Path
) -> None:
    emb = _embeddings()
    writer = _writer(durable_redis.url)
    start = datetime.now(UTC) - timedelta(seconds=5)
    events = [e for n in range(8) for e in _batch(n, start)]  # 40 events
    # The first two reached Redis before it went away: the client saw a failure for all five.
    writer.write(events[:2], emb)
    durable_redis.stop()
    spool = EventSpool.open(tmp_path / "spool", max_bytes=1 << 20)
    log: SpooledLog[WriteResult] = SpooledLog(spool, lambda evs: writer.write(evs, emb), 10)
    for n in range(0, 40, 5):
        assert log.write(events[n : n + 5]).spooled == 5
    durable_redis.start()
    first = log.replay_step()
    assert first is not None and first.result is not None
    assert (first.result.accepted, first.result.duplicates) == (8, 2)
    chunk = spool.read(10)  # replayed into Redis, then the replica dies before the commit
    writer.write([r.event for r in chunk.records], emb)
    spool.close()

    successor = EventSpool.open(tmp_path / "spool", max_bytes=1 << 20)
    assert successor.slot == spool.slot and successor.pending == 30
    log = SpooledLog(successor, lambda evs: writer.write(evs, emb), 10)
    outcomes = []
    while (step := log.replay_step()) is not None:
        assert step.result is not None
        outcomes.append((step.result.accepted, step.result.duplicates))
    assert outcomes == [(0, 10), (10, 0), (10, 0)]
    client: Any = redis.Redis.from_url(durable_redis.url)
    logged = [f[b"event_id"].decode() for _, f in client.xrange(STREAM)]
    assert logged == [event_id(e) for e in events]
