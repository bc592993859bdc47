"""Feast repo on real stores: apply, materialize and read `user_tower_v1` on SQLite (the embedded
default) and Redis, the SQL registry on PostgreSQL, and point-in-time correct historical retrieval."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
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
from serve_app.deployments.user_tower import SEEN_ITEMS, seen_items_of
from serve_app.events import EventLogWriter, ItemEmbeddings
from serve_app.features import FeatureShapes, OnlineFeatureReader, connect_redis
from serve_app.schemas import Event
from training.data import normalize_events
from training.feature_tables import (
    historical_user_features,
    user_profile_snapshots,
    write_user_profile_snapshots,
)
from training.features import EncodedLog, encode_log

pytestmark = pytest.mark.integration

T1 = pd.Timestamp("2026-02-01", tz="UTC")
SHAPES = FeatureShapes(n_categories=2, embedding_dim=4, history_length=3)


def _write_profiles(data_dir: Path, stamp: pd.Timestamp, u1_count: float) -> None:
    """Tables as `training.pipeline.write_feature_tables` writes them, values chosen by hand."""
    features = data_dir / "features"
    features.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "event_timestamp": stamp,
            "event_count": np.array([u1_count, 1.0], np.float32),
            "category_prefs": [np.array([0.4, 0.6], np.float32), np.array([0.0, 1.0], np.float32)],
            "base_embedding": [
                np.array([1, 2, 3, 4], np.float32),
                np.array([0, 0, 0, 1], np.float32),
            ],
            "recent_items": [["i1", "i2"], ["i2"]],
            "seen_items": [["i1", "i2"], ["i2"]],
        }
    ).to_parquet(features / "user_profile.parquet", index=False)
    pd.DataFrame(
        {
            "item_id": ["i1", "i2"],
            "event_timestamp": stamp,
            "category": ["c0", "c1"],
            "price": [9.5, 3.0],
            **{
                name: np.array([0.5, 0.25], np.float32)
                for name in ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days")
            },
            "log_price": np.log1p(np.array([9.5, 3.0])).astype(np.float32),
        }
    ).to_parquet(features / "item_profile.parquet", index=False)


def _project() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def embedded(tmp_path: Path) -> FeatureStoreConfig:
    _write_profiles(tmp_path, T1, 3.0)
    return FeatureStoreConfig(data_dir=tmp_path, project=_project())


@pytest.fixture
def on_redis(tmp_path: Path, redis_url: str) -> Iterator[FeatureStoreConfig]:
    _write_profiles(tmp_path, T1, 3.0)
    config = FeatureStoreConfig(data_dir=tmp_path, project=_project(), redis_url=redis_url)
    yield config
    build_store(config).teardown()  # removes this project's online rows from the shared Redis


def _reader(config: FeatureStoreConfig, redis_url: str, prefix: str) -> OnlineFeatureReader:
    return OnlineFeatureReader(
        build_store(config),
        connect_redis(redis_url, 0.5),
        key_prefix=prefix,
        store_on_redis=config.resolved_profile != "embedded",
    )


@pytest.mark.parametrize("profile", ["embedded", "on_redis"])
def test_user_tower_read_returns_materialized_profile_merged_with_realtime_state(
    profile: str, request: pytest.FixtureRequest, redis_url: str, key_prefix: str
) -> None:
    config: FeatureStoreConfig = request.getfixturevalue(profile)
    store = apply(config)
    assert {s.name for s in store.list_feature_services()} == {"user_tower_v1", "ranker_v1"}
    assert {v.name for v in store.list_feature_views()} == {
        "user_profile",
        "item_profile",
        "user_realtime",
        "item_realtime",
    }
    materialize_incremental(config, end=T1 + timedelta(hours=1))

    # One click on a new item i9 and one on i2 (already in the history: it keeps its place).
    writer = EventLogWriter(
        connect_redis(redis_url, 0.5),
        RealtimeConfig(key_prefix=key_prefix, history_length=3),
        EventLogConfig(stream_key=f"{key_prefix}:events"),
    )
    emb = ItemEmbeddings("v1", {"i9": 0, "i2": 1}, np.eye(2, 4, dtype=np.float32))
    now = datetime.now(UTC)
    writer.write(
        [
            Event(user_id="u1", item_id="i9", event_type="click", timestamp=now),
            Event(user_id="u1", item_id="i2", event_type="click", timestamp=now),
        ],
        emb,
    )

    got = _reader(config, redis_url, key_prefix).users(
        ["u1", "nobody"], SHAPES, model_version="v1", now=now.timestamp()
    )
    assert got.degraded is False
    assert got.event_count.tolist() == [3.0, 0.0]
    np.testing.assert_allclose(got.category_prefs, [[0.4, 0.6], [0.0, 0.0]])
    np.testing.assert_allclose(got.base_embedding[0], [1, 2, 3, 4])
    assert got.has_base_embedding.tolist() == [True, False]
    assert got.recent_items == (("i9", "i1", "i2"), ())
    # EMA rate 0.1 per click: 0.9 * (0.1 * e_i9) + 0.1 * e_i2
    np.testing.assert_allclose(got.delta_embedding[0], [0.09, 0.1, 0.0, 0.0], rtol=1e-6)
    assert got.count_5m.tolist() == [2, 0]


def test_materialize_incremental_loads_rows_stamped_after_the_previous_run(
    embedded: FeatureStoreConfig, redis_url: str, key_prefix: str
) -> None:
    apply(embedded)
    materialize_incremental(embedded, end=T1 + timedelta(hours=1))
    _write_profiles(embedded.data_dir, T1 + timedelta(hours=2), u1_count=5.0)
    reader = _reader(embedded, redis_url, key_prefix)
    assert reader.users(["u1"], SHAPES, model_version=None).event_count.tolist() == [3.0]
    materialize_incremental(embedded, end=T1 + timedelta(hours=3))
    assert reader.users(["u1"], SHAPES, model_version=None).event_count.tolist() == [5.0]


@pytest.mark.parametrize("profile", ["embedded", "on_redis"])
def test_seen_items_come_with_the_tower_features_in_one_feast_read(
    profile: str, request: pytest.FixtureRequest, redis_url: str, key_prefix: str
) -> None:
    config: FeatureStoreConfig = request.getfixturevalue(profile)
    apply(config)
    materialize_incremental(config, end=T1 + timedelta(hours=1))
    reader = _reader(config, redis_url, key_prefix)
    store = reader._store
    assert store is not None
    reads: list[list[str]] = []
    real_read = store.get_online_features

    def counted(*, features: list[str], entity_rows: list[dict[str, str]]) -> object:
        reads.append(list(features))
        return real_read(features=features, entity_rows=entity_rows)

    store.get_online_features = counted  # type: ignore[method-assign]  # a spy on the real store
    got = reader.users(["u2", "nobody", "u1"], SHAPES, model_version=None, extra_refs=SEEN_ITEMS)
    assert len(reads) == 1 and "user_profile:seen_items" in reads[0]
    assert seen_items_of(got) == [("i2",), (), ("i1", "i2")]
    assert got.event_count.tolist() == [1.0, 0.0, 3.0]
    # Not asked for: not read, and seen items count as unread.
    assert seen_items_of(reader.users(["u1"], SHAPES, model_version=None)) is None


def test_item_profile_view_is_served_online(embedded: FeatureStoreConfig) -> None:
    store = apply(embedded)
    materialize_incremental(embedded, end=T1 + timedelta(hours=1))
    got = store.get_online_features(
        features=["item_profile:category", "item_profile:price"],
        entity_rows=[{"item_id": "i2"}, {"item_id": "i1"}],
    ).to_dict()
    assert got["category"] == ["c1", "c0"]
    assert got["price"] == [3.0, 9.5]


def test_cluster_profile_keeps_the_registry_in_postgresql(tmp_path: Path, redis_url: str) -> None:
    pytest.importorskip("psycopg", reason="the SQL registry needs psycopg (pip install psycopg)")
    import sqlalchemy

    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    try:
        sqlalchemy.create_engine(url).connect().close()
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    _write_profiles(tmp_path, T1, 3.0)
    config = FeatureStoreConfig(
        profile="cluster",
        data_dir=tmp_path,
        project=_project(),
        redis_url=redis_url,
        registry_url=url,
    )
    store = apply(config)
    try:
        # A second process (another pod) sees the same registry with no local files.
        other = build_store(config.model_copy(update={"data_dir": tmp_path / "elsewhere"}))
        assert {s.name for s in other.list_feature_services()} == {"user_tower_v1", "ranker_v1"}
        assert not (tmp_path / "feast" / "registry.db").exists()
    finally:
        # Not store.teardown(): the SQL registry's teardown empties the tables of every project.
        store.registry.delete_project(config.project, commit=True)


# --- point in time ----------------------------------------------------------------------------

DAY = pd.Timedelta(days=1)
T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _pit_log() -> tuple[EncodedLog, np.ndarray]:
    items = np.array(["i0", "i1", "i2"])
    categories = np.array([0, 0, 1])  # i0, i1 in category 0; i2 in category 1
    rows = [
        ("u1", "i0", "click", 1),  # weight 1, category 0
        ("u2", "i2", "click", 2),
        ("u1", "i2", "purchase", 3),  # weight 3, category 1
        ("u1", "i1", "click", 5),
    ]
    events = normalize_events(
        pd.DataFrame(
            [
                {"user_id": u, "item_id": i, "event_type": t, "timestamp": T0 + d * DAY}
                for u, i, t, d in rows
            ]
        )
    )
    return encode_log(events, pd.Index(items), categories, 2), items


def test_historical_retrieval_never_returns_a_value_stamped_after_the_label(
    tmp_path: Path,
) -> None:
    log, items = _pit_log()
    snapshots = user_profile_snapshots(log, items, [T0 + 2 * DAY, T0 + 4 * DAY, T0 + 6 * DAY], 3)
    path = tmp_path / "features" / "user_profile.parquet"
    # The pipeline's end-of-log row (day 10, all events) is already there; snapshots merge into it.
    end = user_profile_snapshots(log, items, [T0 + 10 * DAY], 3)
    path.parent.mkdir(parents=True)
    end.to_parquet(path, index=False)
    write_user_profile_snapshots(snapshots, path)
    assert len(pd.read_parquet(path)) == 1 + 2 + 2 + 2  # u2 has no event before day 2

    _write_items_only(tmp_path)
    store = apply(FeatureStoreConfig(data_dir=tmp_path, project=_project()))
    labels = pd.DataFrame(
        [
            ("u1", 1.5),  # before any snapshot: nothing
            ("u1", 3.9),  # day-2 snapshot: the day-1 click
            ("u1", 4.0),  # day-4 snapshot (stamped at the label time: known then)
            ("u1", 5.5),  # still day 4: the day-6 snapshot holds the day-5 click, from after
            ("u2", 3.0),  # u2's first snapshot is day 4
            ("u2", 7.0),
            ("u1", 9.0),  # day 6, not the end-of-log row of day 10
        ],
        columns=["user_id", "day"],
    )
    entity_df = pd.DataFrame(
        {"user_id": labels["user_id"], "event_timestamp": T0 + labels["day"] * DAY}
    )
    got = historical_user_features(store, entity_df)

    assert got["user_id"].tolist() == labels["user_id"].tolist()
    counts = [None if pd.isna(c) else float(c) for c in got["event_count"]]
    assert counts == [None, 1.0, 2.0, 2.0, None, 1.0, 3.0]
    recents = [None if r is None else list(r) for r in got["recent_items"]]
    assert recents == [
        None,
        ["i0"],
        ["i2", "i0"],
        ["i2", "i0"],
        None,
        ["i2"],
        ["i1", "i2", "i0"],
    ]
    # u1 at day 4: click i0 (weight 1, category 0) and purchase i2 (weight 3, category 1)
    np.testing.assert_allclose(list(got["category_prefs"][2]), [0.25, 0.75])
    np.testing.assert_allclose(list(got["category_prefs"][6]), [0.4, 0.6])


def _write_items_only(data_dir: Path) -> None:
    pd.DataFrame(
        {
            "item_id": ["i0"],
            "event_timestamp": T0,
            "category": ["c0"],
            "price": [1.0],
            **{
                name: np.array([0.0], np.float32)
                for name in ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days")
            },
            "log_price": np.array([np.log1p(1.0)], np.float32),
        }
    ).to_parquet(data_dir / "features" / "item_profile.parquet", index=False)


def test_reader_marks_an_unapplied_registry_as_degraded_without_raising(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    config = FeatureStoreConfig(data_dir=tmp_path, project=_project())  # never applied
    got = _reader(config, redis_url, key_prefix).users(["u1"], SHAPES, model_version=None)
    assert got.degraded is True
    assert got.event_count.tolist() == [0.0]


def test_redis_client_for_reads_is_the_shared_server(redis_client: redis.Redis) -> None:
    assert redis_client.ping()


# --- batched materialization -----------------------------------------------------------------


def _write_history(data_dir: Path) -> None:
    """Profiles with several snapshots per entity, rows after the window and none for some: what
    Feast picks (latest per entity in the window) is not simply the last row."""
    rng = np.random.default_rng(7)
    features = data_dir / "features"
    features.mkdir(parents=True, exist_ok=True)
    users = [f"u{k}" for k in range(23)]
    stamps = [T1 - timedelta(days=2), T1, T1 + timedelta(days=3)]  # the last is past the window
    rows = [(u, s) for s in stamps for u in users if (hash(u) + s.day) % 4 != 0]
    rng.shuffle(rows)
    n = len(rows)
    pd.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "event_timestamp": [s for _, s in rows],
            "event_count": rng.integers(0, 50, n).astype(np.float32),
            "category_prefs": list(rng.dirichlet(np.ones(5), n).astype(np.float32)),
            "base_embedding": [
                rng.normal(size=4).astype(np.float32) if k % 5 else np.zeros(0, np.float32)
                for k in range(n)
            ],
            "recent_items": [
                [f"i{j}" for j in rng.choice(40, k % 4, replace=False)] for k in range(n)
            ],
            "seen_items": [
                [f"i{j}" for j in rng.choice(40, k % 6, replace=False)] for k in range(n)
            ],
        }
    ).to_parquet(features / "user_profile.parquet", index=False, row_group_size=7)
    m = 17
    pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(m)],
            "event_timestamp": [T1 - timedelta(hours=k) for k in range(m)],
            "category": [f"c{k % 3}" for k in range(m)],
            "price": rng.uniform(1, 100, m),
            **{
                name: rng.random(m).astype(np.float32)
                for name in (
                    "log_pop_all",
                    "log_pop_7d",
                    "log_pop_1d",
                    "ctr",
                    "age_days",
                    "log_price",
                )
            },
        }
    ).to_parquet(features / "item_profile.parquet", index=False)


def _online_rows(config: FeatureStoreConfig, redis_client: redis.Redis) -> dict[Any, Any]:
    """Every online row of the project's batch views, as stored (bytes), keyed without the project."""
    if config.resolved_profile == "embedded":
        import sqlite3

        conn = sqlite3.connect(config.feast_dir / "online.db")
        got: dict[Any, Any] = {}
        for view in ("user_profile", "item_profile"):
            table = f"{config.project}_{view}"
            for row in conn.execute(
                f'SELECT entity_key, feature_name, value, value_text, event_ts, created_ts FROM "{table}"'
            ):
                got[(view, row[0], row[1])] = row[2:]
        conn.close()
        return got
    # Feast's Redis key: serialized entity key + project name.
    keys = list(redis_client.scan_iter(match=f"*{config.project}".encode(), count=1000))
    return {k[: -len(config.project)]: redis_client.hgetall(k) for k in keys}


@pytest.mark.parametrize("profile", ["embedded", "on_redis"])
def test_batched_materialization_writes_what_feast_writes(
    profile: str, request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> None:
    """The chunked writer against Feast's own `FeatureStore.materialize` on the same tables: the
    same stored bytes, the same features read back, the same recorded intervals."""
    from feature_repo.materialize import Progress
    from feature_repo.store import BATCH_VIEW_NAMES, materialize

    ours: FeatureStoreConfig = request.getfixturevalue(profile)
    _write_history(ours.data_dir)
    # Feast's own run: another project over the same tables, its own registry and SQLite file.
    elsewhere = tmp_path / "feast_own"
    elsewhere.mkdir()
    (elsewhere / "features").symlink_to(ours.data_dir / "features")
    theirs = ours.model_copy(update={"project": _project(), "data_dir": elsewhere})
    client = redis.Redis.from_url(redis_url)
    try:
        start, end = T1 - timedelta(days=7), T1 + timedelta(hours=1)
        apply(ours)
        reports: list[Progress] = []
        materialize(ours, start, end, chunk_rows=5, progress=reports.append)
        feast_store = apply(theirs)
        feast_store.materialize(
            start_date=start, end_date=end, feature_views=list(BATCH_VIEW_NAMES)
        )

        assert {r.view for r in reports} == set(BATCH_VIEW_NAMES)
        final = {r.view: r for r in reports if r.rows_done == r.rows_total}
        table = pd.read_parquet(ours.data_dir / "features" / "user_profile.parquet")
        in_window = table[table["event_timestamp"] <= end]
        assert final["user_profile"].rows_total == in_window["user_id"].nunique()
        assert final["item_profile"].rows_total == 17

        mine, feasts = _online_rows(ours, client), _online_rows(theirs, client)
        assert len(mine) > 0 and mine == feasts

        def read(config: FeatureStoreConfig) -> dict[str, Any]:
            users = [{"user_id": f"u{k}"} for k in range(25)]
            refs = [
                f"user_profile:{c}"
                for c in (
                    "event_count",
                    "category_prefs",
                    "base_embedding",
                    "recent_items",
                    "seen_items",
                )
            ]
            return (
                build_store(config).get_online_features(features=refs, entity_rows=users).to_dict()
            )

        assert read(ours) == read(theirs)
        expected = in_window.sort_values("event_timestamp").groupby("user_id").last()
        got = read(ours)
        for user, count in zip(got["user_id"], got["event_count"], strict=True):
            want = expected["event_count"].get(user)
            assert (count is None and want is None) or count == pytest.approx(want)
        for name in BATCH_VIEW_NAMES:
            a, b = (
                build_store(ours).get_feature_view(name),
                build_store(theirs).get_feature_view(name),
            )
            assert a.most_recent_end_time == b.most_recent_end_time == end
            assert a.materialization_intervals == b.materialization_intervals
    finally:
        if profile == "on_redis":
            build_store(theirs).teardown()
