"""Bench: how fast are the online read of `user_tower_v1` and the event write path, on SQLite and Redis?

Builds a feature store in a temp dir (synthetic user profiles, materialized), fills real-time state by
writing events, then measures: the full user read (`OnlineFeatureReader.users`: Feast batch view + the
real-time hashes) for 1 and 32 users, Feast's batch read alone, the event write path (events/s, wall
clock and per CPU-second of this process, i.e. one core), and a Feast push per event (the rejected
alternative for real-time state). Prints one table and writes JSON.

    .venv/bin/python bench/feature_store.py --users 10000 --reads 2000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from feast import FeatureStore
from feast.data_source import PushMode
from rich.console import Console
from rich.table import Table

from feature_repo.config import FeatureStoreConfig, Profile
from feature_repo.store import apply, build_store, materialize_incremental
from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.events import EventLogWriter, ItemEmbeddings
from serve_app.features import FeatureShapes, OnlineFeatureReader, connect_redis, user_batch_refs
from serve_app.schemas import Event, EventType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ helpers, as the other benchmarks
from bench.results_file import write_results  # noqa: E402

STAMP = pd.Timestamp("2026-02-01", tz="UTC")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=10_000, help="users in the profile table")
    parser.add_argument("--items", type=int, default=5_000, help="items with embeddings")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--categories", type=int, default=20, help="categories")
    parser.add_argument("--history", type=int, default=20, help="recent items per user")
    parser.add_argument("--reads", type=int, default=2_000, help="timed reads per case")
    parser.add_argument("--events", type=int, default=20_000, help="events per write case")
    parser.add_argument("--pushes", type=int, default=200, help="timed Feast pushes")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "feature_store.json"
    )
    return parser.parse_args(argv)


def _profiles(data_dir: Path, args: argparse.Namespace, rng: np.random.Generator) -> None:
    features = data_dir / "features"
    features.mkdir(parents=True, exist_ok=True)
    n = args.users
    prefs = rng.dirichlet(np.ones(args.categories), size=n).astype(np.float32)
    pd.DataFrame(
        {
            "user_id": [f"u{k}" for k in range(n)],
            "event_timestamp": STAMP,
            "event_count": rng.integers(0, 200, n).astype(np.float32),
            "category_prefs": list(prefs),
            "base_embedding": list(rng.normal(size=(n, args.dim)).astype(np.float32)),
            "recent_items": [
                [f"i{j}" for j in rng.choice(args.items, args.history, replace=False)]
                for _ in range(n)
            ],
            "seen_items": [
                [f"i{j}" for j in rng.choice(args.items, 5, replace=False)] for _ in range(n)
            ],
        }
    ).to_parquet(features / "user_profile.parquet", index=False)
    m = args.items
    pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(m)],
            "event_timestamp": STAMP,
            "category": [f"c{k % args.categories}" for k in range(m)],
            "price": rng.uniform(1, 100, m),
            **{
                name: rng.random(m).astype(np.float32)
                for name in ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days")
            },
            "log_price": rng.random(m).astype(np.float32),
        }
    ).to_parquet(features / "item_profile.parquet", index=False)


def _latency(fn: Callable[[int], object], count: int) -> dict[str, float]:
    for k in range(min(50, count)):  # warm connections, caches and the registry
        fn(k)
    times = np.empty(count)
    for k in range(count):
        start = time.perf_counter()
        fn(k)
        times[k] = time.perf_counter() - start
    ms = times * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _read_users(
    reader: OnlineFeatureReader, ids: Sequence[list[str]], shapes: FeatureShapes, k: int
) -> object:
    return reader.users(ids[k], shapes, model_version="bench")


def _read_batch_view(store: FeatureStore, ids: Sequence[list[str]], k: int) -> object:
    return store.get_online_features(
        features=list(user_batch_refs()), entity_rows=[{"user_id": u} for u in ids[k]]
    ).to_dict()


def _push_one(store: FeatureStore, dim: int, k: int) -> None:
    """Push one user's real-time row through Feast: the alternative to the Lua-updated hashes."""
    now = datetime.now(UTC)
    row = pd.DataFrame(
        {
            "user_id": [f"u{k}"],
            "event_timestamp": [now],
            "delta_embedding": [np.zeros(dim, np.float32)],
            "delta_model_version": ["bench"],
            "recent_items": [["i1"]],
            "count_5m": [1],
            "count_1h": [1],
            "last_event_ts": [now],
        }
    )
    store.push("user_realtime_push", row, to=PushMode.ONLINE)


def _events(args: argparse.Namespace, rng: np.random.Generator, offset: int) -> list[Event]:
    now = datetime.now(UTC)
    kinds = [EventType.VIEW] * 6 + [EventType.CLICK] * 3 + [EventType.PURCHASE]
    users = rng.integers(0, args.users, args.events)
    items = rng.integers(0, args.items, args.events)
    return [
        Event(
            user_id=f"u{users[k]}",
            item_id=f"i{items[k]}",
            event_type=kinds[k % len(kinds)],
            timestamp=now + timedelta(microseconds=offset + k),
        )
        for k in range(args.events)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=110)
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="bench_fs_"))
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    client = connect_redis(args.redis_url, 1.0)
    _profiles(root, args, rng)
    emb = ItemEmbeddings(
        "bench",
        {f"i{k}": k for k in range(args.items)},
        rng.normal(size=(args.items, args.dim)).astype(np.float32),
    )
    shapes = FeatureShapes(args.categories, args.dim, args.history)
    writer = EventLogWriter(
        client,
        RealtimeConfig(key_prefix=f"{prefix}:rt", history_length=args.history),
        EventLogConfig(stream_key=f"{prefix}:events"),
    )
    rows: list[dict[str, Any]] = []
    stores = []
    try:
        # --- event write path (also fills the real-time state the reads below decode) ---------
        for batch in (1, 100):
            events = _events(args, rng, offset=batch * 10_000_000)
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(events), batch):
                writer.write(events[i : i + batch], emb)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append(
                {
                    "case": f"event write, {batch} event(s) per call",
                    "store": "redis",
                    "events_per_s": len(events) / wall,
                    "events_per_cpu_s": len(events) / cpu,
                }
            )

        profiles: tuple[Profile, ...] = ("embedded", "redis")
        for profile in profiles:
            config = FeatureStoreConfig(
                data_dir=root,
                project=f"bench_{uuid.uuid4().hex[:8]}",
                profile=profile,
                redis_url=args.redis_url if profile == "redis" else None,
            )
            store = apply(config)
            stores.append(store)
            materialize_incremental(config, end=STAMP + timedelta(hours=1))
            reader = OnlineFeatureReader(
                build_store(config),
                client,
                key_prefix=f"{prefix}:rt",
                store_on_redis=profile == "redis",
            )
            name = "sqlite" if profile == "embedded" else "redis"
            for size in (1, 32):
                ids = [
                    [f"u{(k * size + j) % args.users}" for j in range(size)]
                    for k in range(args.reads)
                ]
                full = _latency(partial(_read_users, reader, ids, shapes), args.reads)
                check = reader.users(ids[0], shapes, model_version="bench")
                assert not check.degraded and check.has_base_embedding.all()
                rows.append({"case": f"user_tower_v1 read, {size} user(s)", "store": name, **full})
                batch_only = _latency(partial(_read_batch_view, store, ids), args.reads)
                rows.append(
                    {
                        "case": f"  Feast batch view only, {size} user(s)",
                        "store": name,
                        **batch_only,
                    }
                )
            push = _latency(partial(_push_one, store, args.dim), args.pushes)
            rows.append(
                {
                    "case": "Feast push, 1 event (rejected design)",
                    "store": name,
                    **push,
                    "events_per_s": 1e3 / push["p50_ms"],
                }
            )
    finally:
        for store in stores:
            if store.config.online_store.type == "redis":
                store.teardown()
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title="Feature store: online reads and the event write path")
    for column in ("case", "store", "p50 ms", "p99 ms", "events/s", "events/CPU-s"):
        table.add_column(column, justify="left" if column in ("case", "store") else "right")

    def fmt(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:,.{digits}f}"

    for row in rows:
        table.add_row(
            row["case"],
            row["store"],
            fmt(row.get("p50_ms"), 2),
            fmt(row.get("p99_ms"), 2),
            fmt(row.get("events_per_s"), 0),
            fmt(row.get("events_per_cpu_s"), 0),
        )
    console.print(table)
    write_results(args.out, "feature_store", args, rows)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
