"""Real-time write path on real Redis: state worked out by hand, idempotent retries, 1,000 concurrent
clicks for one user, counter windows, and behaviour with Redis stopped (a private server)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from feature_repo.config import FeatureStoreConfig
from feature_repo.store import apply, build_store, materialize_incremental
from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.contract import known_user_keys
from serve_app.errors import FeatureStoreUnavailable
from serve_app.events import EventLogWriter, ItemEmbeddings, ema_update
from serve_app.features import FeatureShapes, OnlineFeatureReader, connect_redis, user_state_key
from serve_app.schemas import Event
from tests.conftest import PrivateRedis

pytestmark = pytest.mark.integration

# Counters keep one-minute slots. Pin NOW ten seconds into the previous minute so that the offsets
# below (at most +40 s) never cross a slot boundary, whatever the wall clock says.
NOW = (datetime.now(UTC) - timedelta(minutes=1)).replace(second=10, microsecond=0)
SHAPES = FeatureShapes(n_categories=2, embedding_dim=2, history_length=3)
# Two items on the axes make the EMA easy to follow by hand.
EMB = ItemEmbeddings("v1", {"i1": 0, "i2": 1}, np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))


def _writer(url: str, prefix: str, history: int = 3) -> EventLogWriter:
    return EventLogWriter(
        connect_redis(url, 0.5),
        RealtimeConfig(key_prefix=prefix, history_length=history, ema_rate=0.1),
        EventLogConfig(stream_key=f"{prefix}:events"),
    )


def _reader(
    url: str, prefix: str, store: object = None, on_redis: bool = False
) -> OnlineFeatureReader:
    return OnlineFeatureReader(
        store,  # type: ignore[arg-type]
        connect_redis(url, 0.2),
        key_prefix=prefix,
        store_on_redis=on_redis,
        breaker_cooldown_seconds=0.3,
    )


def _ev(user: str, item: str, kind: str, seconds: float = 0.0) -> Event:
    return Event(
        user_id=user, item_id=item, event_type=kind, timestamp=NOW + timedelta(seconds=seconds)
    )


def test_events_update_user_and_item_state_as_worked_by_hand(
    redis_url: str, key_prefix: str
) -> None:
    events = [
        _ev("u1", "i1", "view", 0),
        _ev("u1", "i1", "click", 1),
        _ev("u1", "i2", "purchase", 2),
        _ev("u1", "i1", "click", 3),  # repeat: counted, but i1 keeps its place in the list
        _ev("u1", "i3", "skip", 4),  # weight 0: no EMA step; not positive: not in the list
    ]
    result = _writer(redis_url, key_prefix).write(events, EMB)
    assert result.accepted == 5 and result.duplicates == 0

    reader = _reader(redis_url, key_prefix)
    got = reader.users(["u1"], SHAPES, model_version="v1", now=NOW.timestamp() + 10)
    # view a=0.02: [.02, 0]; click i1 a=0.1: [.118, 0]; purchase i2 a=0.3: [.0826, .3];
    # click i1 a=0.1: [.17434, .27]; skip: unchanged.
    np.testing.assert_allclose(got.delta_embedding[0], [0.17434, 0.27], rtol=1e-6)
    assert got.recent_items == (("i2", "i1"),)
    assert (got.count_5m[0], got.count_1h[0]) == (5, 5)
    assert got.last_event_ts[0] == pytest.approx(NOW.timestamp() + 4)
    assert got.degraded is False

    items = reader.items(["i1", "i2", "i3", "i404"], now=NOW.timestamp() + 10)
    assert items.clicks_5m.tolist() == [2, 1, 0, 0]  # purchase counts as a positive
    assert items.views_5m.tolist() == [1, 0, 0, 0]
    assert items.clicks_1h.tolist() == [2, 1, 0, 0]

    log: Any = redis.Redis.from_url(redis_url).xrange(f"{key_prefix}:events")
    assert [e[1][b"event_type"].decode() for e in log] == [
        "view",
        "click",
        "purchase",
        "click",
        "skip",
    ]


def test_a_retried_event_is_logged_and_applied_once(redis_url: str, key_prefix: str) -> None:
    writer = _writer(redis_url, key_prefix)
    events = [_ev("u1", "i1", "click", 0), _ev("u1", "i2", "click", 1)]
    first = writer.write(events, EMB)
    retry = writer.write([Event.model_validate(e.model_dump()) for e in events], EMB)
    assert (first.accepted, retry.accepted, retry.duplicates) == (2, 0, 2)
    assert retry.event_ids == first.event_ids
    assert redis.Redis.from_url(redis_url).xlen(f"{key_prefix}:events") == 2
    got = _reader(redis_url, key_prefix).users(
        ["u1"], SHAPES, model_version="v1", now=NOW.timestamp() + 10
    )
    assert got.count_5m[0] == 2
    # Two EMA steps, not four: 0.9 * [0.1, 0] + [0, 0.1]
    np.testing.assert_allclose(got.delta_embedding[0], [0.09, 0.1], rtol=1e-6)


def test_a_retry_with_the_same_event_id_counts_once_though_its_server_time_differs(
    redis_url: str, key_prefix: str
) -> None:
    writer = _writer(redis_url, key_prefix)
    # What the ingress builds from a body without a timestamp: the server's time, different for
    # the retry. Without an event_id these are two events; with one, the same.
    body = {"user_id": "u1", "item_id": "i1", "event_type": "click", "event_id": "c-1"}
    first = writer.write([Event.model_validate(body)], EMB)
    retry_event = Event.model_validate(body).model_copy(
        update={"timestamp": NOW + timedelta(seconds=3)}
    )
    retry = writer.write([retry_event], EMB)
    assert (first.accepted, retry.accepted, retry.duplicates) == (1, 0, 1)
    assert redis.Redis.from_url(redis_url).xlen(f"{key_prefix}:events") == 1
    got = _reader(redis_url, key_prefix).users(["u1"], SHAPES, model_version="v1")
    assert got.count_5m[0] == 1
    np.testing.assert_allclose(got.delta_embedding[0], [0.1, 0.0], rtol=1e-6)  # one EMA step
    # The same body without event_id, sent twice, is two events (the documented limitation).
    plain = {k: v for k, v in body.items() if k != "event_id"}
    twice = [
        Event.model_validate(plain).model_copy(update={"timestamp": NOW + timedelta(seconds=s)})
        for s in (1, 2)
    ]
    assert writer.write(twice, EMB).accepted == 2


def test_a_cold_users_state_expires_sooner_than_a_known_users(
    redis_url: str, key_prefix: str
) -> None:
    day, month = 86_400, 30 * 86_400
    writer = EventLogWriter(
        connect_redis(redis_url, 0.5),
        RealtimeConfig(
            key_prefix=key_prefix, user_state_ttl_seconds=month, cold_user_ttl_seconds=day
        ),
        EventLogConfig(stream_key=f"{key_prefix}:events"),
    )
    emb = ItemEmbeddings("v1", EMB.item_index, EMB.vectors, known_user_keys(["known", "u9"]))
    writer.write([_ev("known", "i1", "click"), _ev("stranger", "i1", "click")], emb)
    client = redis.Redis.from_url(redis_url)
    known_ttl = client.ttl(user_state_key(key_prefix, "known"))
    cold_ttl = client.ttl(user_state_key(key_prefix, "stranger"))
    assert month - 60 < known_ttl <= month
    assert day - 60 < cold_ttl <= day
    # Once a bundle knows them (the next training run), their next event gives the long expiry.
    writer.write([_ev("stranger", "i2", "click", 1)], replace(emb, known_users=None))
    assert client.ttl(user_state_key(key_prefix, "stranger")) > day


def test_thousand_concurrent_clicks_for_one_user_all_count_and_state_equals_log_replay(
    redis_url: str, key_prefix: str
) -> None:
    n, history, dim = 1_000, 20, 8
    rng = np.random.default_rng(0)
    emb = ItemEmbeddings(
        "v1", {f"i{k}": k for k in range(n)}, rng.normal(size=(n, dim)).astype(np.float32)
    )
    writer = _writer(redis_url, key_prefix, history=history)
    events = [
        Event(
            user_id="hot",
            item_id=f"i{k % 300}",  # repeats too: distinctness of the list is exercised
            event_type="click",
            timestamp=NOW + timedelta(microseconds=k),
        )
        for k in range(n)
    ]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda e: writer.write([e], emb), events))
    assert sum(r.accepted for r in results) == n

    got = _reader(redis_url, key_prefix).users(
        ["hot"], FeatureShapes(2, dim, history), model_version="v1", now=NOW.timestamp() + 1
    )
    assert got.count_5m[0] == n and got.count_1h[0] == n

    # Replay the stream in its order with the pure functions: the state must be exactly that.
    log: Any = redis.Redis.from_url(redis_url).xrange(f"{key_prefix}:events")
    assert len(log) == n
    order = [entry[b"item_id"].decode() for _, entry in log]
    expected_recent: list[str] = []
    delta = None
    for item in order:
        if item not in expected_recent:
            expected_recent = [item, *expected_recent][:history]
        delta = ema_update(delta, emb.vectors[emb.item_index[item]], 0.1)
    assert got.recent_items[0] == tuple(expected_recent)
    assert delta is not None
    np.testing.assert_array_equal(got.delta_embedding[0], delta)


def test_counters_slide_with_time_and_forget_events_over_an_hour_old(
    redis_url: str, key_prefix: str
) -> None:
    writer = _writer(redis_url, key_prefix)
    writer.write(
        [
            _ev("u1", "i1", "view", -2 * 3600),  # two hours ago: in no window
            _ev("u1", "i1", "view", -30 * 60),  # half an hour ago: 1 h only
            _ev("u1", "i1", "click", -120),
            _ev("u1", "i2", "click", 0),
        ],
        EMB,
    )
    reader = _reader(redis_url, key_prefix)
    now = NOW.timestamp() + 30
    got = reader.users(["u1"], SHAPES, model_version="v1", now=now)
    assert (got.count_5m[0], got.count_1h[0]) == (2, 3)
    items = reader.items(["i1"], now=now)
    assert (items.views_5m[0], items.views_1h[0], items.clicks_5m[0]) == (0, 1, 1)
    later = reader.users(["u1"], SHAPES, model_version="v1", now=now + 10 * 60)
    assert (later.count_5m[0], later.count_1h[0]) == (0, 3)


def test_delta_of_another_bundle_is_ignored_and_restarted_in_the_new_space(
    redis_url: str, key_prefix: str
) -> None:
    writer = _writer(redis_url, key_prefix)
    writer.write([_ev("u1", "i1", "click", 0)], EMB)
    reader = _reader(redis_url, key_prefix)
    v2 = ItemEmbeddings("v2", EMB.item_index, EMB.vectors)
    stale = reader.users(["u1"], SHAPES, model_version="v2", now=NOW.timestamp())
    assert stale.delta_embedding[0].tolist() == [0.0, 0.0]
    writer.write([_ev("u1", "i2", "click", 1)], v2)
    fresh = reader.users(["u1"], SHAPES, model_version="v2", now=NOW.timestamp())
    np.testing.assert_allclose(fresh.delta_embedding[0], [0.0, 0.1], rtol=1e-6)


def test_with_redis_stopped_reads_degrade_fast_and_writes_raise(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    prefix = "rt"
    # Feast's online store on the same (private) Redis: the redis profile.
    features = tmp_path / "data" / "features"
    features.mkdir(parents=True)
    pd.DataFrame(
        {
            "user_id": ["u1"],
            "event_timestamp": pd.Timestamp("2026-02-01", tz="UTC"),
            "event_count": np.array([7.0], np.float32),
            "category_prefs": [np.array([1.0, 0.0], np.float32)],
            "base_embedding": [np.array([0.5, 0.5], np.float32)],
            "recent_items": [["i2"]],
            "seen_items": [["i2"]],
        }
    ).to_parquet(features / "user_profile.parquet", index=False)
    pd.DataFrame(
        columns=[
            "item_id",
            "event_timestamp",
            "category",
            "price",
            "log_pop_all",
            "log_pop_7d",
            "log_pop_1d",
            "ctr",
            "age_days",
            "log_price",
        ]
    ).to_parquet(features / "item_profile.parquet", index=False)
    config = FeatureStoreConfig(data_dir=tmp_path / "data", redis_url=private_redis.url)
    apply(config)
    materialize_incremental(config, end=datetime(2026, 2, 2, tzinfo=UTC))
    writer = _writer(private_redis.url, prefix)
    reader = _reader(private_redis.url, prefix, build_store(config), on_redis=True)
    writer.write([_ev("u1", "i1", "click")], EMB)
    up = reader.users(["u1"], SHAPES, model_version="v1", now=NOW.timestamp())
    assert up.degraded is False
    assert up.event_count.tolist() == [7.0] and up.recent_items == (("i1", "i2"),)

    private_redis.stop()
    started = time.perf_counter()
    down = reader.users(["u1"], SHAPES, model_version="v1", now=NOW.timestamp())
    again = reader.users(["u1"], SHAPES, model_version="v1", now=NOW.timestamp())
    items = reader.items(["i1"], now=NOW.timestamp())
    elapsed = time.perf_counter() - started
    assert down.degraded and again.degraded and items.degraded
    assert down.event_count.tolist() == [0.0] and down.recent_items == ((),)
    assert not down.delta_embedding.any() and np.isnan(down.last_event_ts[0])
    assert items.clicks_5m.tolist() == [0]
    assert elapsed < 1.0  # connection refused + breaker: no waiting out redis-py's retries
    with pytest.raises(FeatureStoreUnavailable, match="not accepted"):
        writer.write([_ev("u1", "i2", "click", 1)], EMB)

    private_redis.start()  # empty: no persistence
    time.sleep(0.35)  # breaker cooldown
    back = reader.users(["u1"], SHAPES, model_version="v1", now=NOW.timestamp())
    assert back.degraded is False
    assert writer.write([_ev("u1", "i2", "click", 1)], EMB).accepted == 1
