"""Bench: how long does materializing the batch views take per million users/items, and how much Redis
memory does a million users take?

Writes `user_profile` / `item_profile` Parquet tables with the real schema at the `--size xl` shape
(1M users with 500-category preferences, a 64-d base embedding, recent and seen item lists; 1M items),
then materializes them with `feature_repo.materialize` into a private `redis-server` (its own port,
no persistence, so `INFO memory` before/after counts only these rows) and into SQLite; for reference
it times Feast's own `FeatureStore.materialize` on the first `--feast-users` users. Prints one table
and writes JSON; the per-million figures size the chart's Redis (helm/recserve/README.md).

    flock /tmp/recserve-heavy.lock .venv/bin/python bench/materialize.py --users 1000000 --items 1000000
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from rich.console import Console
from rich.table import Table

from feature_repo.config import FeatureStoreConfig
from feature_repo.materialize import Progress, materialize_view
from feature_repo.store import BATCH_VIEW_NAMES, EPOCH, apply

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ helpers, as the other benchmarks
from bench.results_file import write_results  # noqa: E402

STAMP = datetime(2026, 2, 1, tzinfo=UTC)
END = STAMP + timedelta(hours=1)
CHUNK = 100_000  # rows generated per Parquet row group


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--categories", type=int, default=500, help="xl: 500")
    parser.add_argument("--dim", type=int, default=64, help="base embedding dimension")
    parser.add_argument("--history", type=int, default=20, help="recent items kept per user")
    parser.add_argument(
        "--mean-seen", type=float, default=5.0, help="mean positively seen items per user"
    )
    parser.add_argument("--chunk-rows", type=int, default=20_000, help="rows per online write")
    parser.add_argument("--stores", default="redis,sqlite", help="comma-separated: redis, sqlite")
    parser.add_argument(
        "--feast-users",
        type=int,
        default=20_000,
        help="users for Feast's own materialize (0: skip)",
    )
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "materialize.json"
    )
    return parser.parse_args(argv)


def _lists(pool: pa.Array, counts: np.ndarray, rng: np.random.Generator) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    picks = rng.integers(0, len(pool), int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pool.take(pa.array(picks)))


def _floats(matrix: np.ndarray) -> pa.Array:
    n, width = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), pa.float32()))


def write_users(path: Path, args: argparse.Namespace, n: int, rng: np.random.Generator) -> None:
    """`user_profile` rows shaped as `training.feature_tables.user_profile_frame` writes them."""
    pool = pa.array([f"i{k}" for k in range(args.items)])
    writer: pq.ParquetWriter | None = None
    try:
        for lo in range(0, n, CHUNK):
            m = min(CHUNK, n - lo)
            seen = np.minimum(rng.geometric(1.0 / args.mean_seen, m), 200)
            prefs = np.zeros((m, args.categories), np.float32)
            # A user's positive weight spreads over the categories of what they saw.
            cats = rng.integers(0, args.categories, (m, 8))
            weights = rng.random((m, 8)).astype(np.float32)
            weights[np.arange(8)[None, :] >= np.minimum(seen, 8)[:, None]] = 0.0
            np.add.at(prefs, (np.repeat(np.arange(m), 8), cats.reshape(-1)), weights.reshape(-1))
            prefs /= prefs.sum(axis=1, keepdims=True)
            table = pa.table(
                {
                    "user_id": pa.array([f"u{k}" for k in range(lo, lo + m)]),
                    "event_timestamp": pa.array([STAMP] * m, pa.timestamp("ns", tz="UTC")),
                    "event_count": pa.array(seen.astype(np.float32)),
                    "category_prefs": _floats(prefs),
                    "base_embedding": _floats(rng.normal(size=(m, args.dim)).astype(np.float32)),
                    "recent_items": _lists(pool, np.minimum(seen, args.history), rng),
                    "seen_items": _lists(pool, seen, rng),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def write_items(path: Path, args: argparse.Namespace, n: int, rng: np.random.Generator) -> None:
    """`item_profile` rows shaped as `training.pipeline.write_feature_tables` writes them."""
    price = rng.uniform(1, 100, n)
    columns: dict[str, Any] = {
        "item_id": pa.array([f"i{k}" for k in range(n)]),
        "event_timestamp": pa.array([STAMP] * n, pa.timestamp("ns", tz="UTC")),
        "category": pa.array([f"c{k % args.categories}" for k in range(n)]),
        "price": pa.array(price),
    }
    for name in ("log_pop_all", "log_pop_7d", "log_pop_1d", "ctr", "age_days"):
        columns[name] = pa.array(rng.random(n).astype(np.float32))
    columns["log_price"] = pa.array(np.log1p(price).astype(np.float32))
    pq.write_table(pa.table(columns), path, row_group_size=CHUNK)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _tables(root: Path, args: argparse.Namespace, users: int, items: int) -> float:
    features = root / "features"
    features.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    write_users(features / "user_profile.parquet", args, users, rng)
    write_items(features / "item_profile.parquet", args, items, rng)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=120)
    root = Path(tempfile.mkdtemp(prefix="bench_mat_"))
    port = _free_port()
    server = subprocess.Popen(
        [args.redis_server, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=root,
    )
    redis_url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(redis_url)
    rows: list[dict[str, Any]] = []

    def progress(p: Progress) -> None:
        console.print(
            f"  {p.view}: {p.rows_done:,}/{p.rows_total:,} rows, {p.elapsed_seconds:.0f} s, "
            f"ETA {'-' if p.eta_seconds is None else f'{p.eta_seconds:.0f} s'}"
        )

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        generated = _tables(root / "xl", args, args.users, args.items)
        console.print(f"generated {args.users:,} users + {args.items:,} items in {generated:.0f} s")
        sizes = {"user_profile": args.users, "item_profile": args.items}
        for store_name in args.stores.split(","):
            config = FeatureStoreConfig(
                data_dir=root / "xl",
                project=f"bench_{uuid.uuid4().hex[:8]}",
                profile="redis" if store_name == "redis" else "embedded",
                redis_url=redis_url if store_name == "redis" else None,
            )
            store = apply(config)
            for view in BATCH_VIEW_NAMES:
                before = _used_memory(client)
                result = materialize_view(
                    store, view, EPOCH, END, args.chunk_rows, progress=progress
                )
                assert result.rows == sizes[view], (view, result.rows)
                row: dict[str, Any] = {
                    "path": "batched (feature_repo.materialize)",
                    "store": store_name,
                    "view": view,
                    "rows": result.rows,
                    "seconds": result.seconds,
                    "seconds_per_million": result.seconds * 1e6 / max(result.rows, 1),
                }
                if store_name == "redis":
                    grown = _used_memory(client) - before
                    row["redis_bytes_per_row"] = grown / max(result.rows, 1)
                    row["redis_mb_per_million"] = grown / max(result.rows, 1)
                rows.append(row)
                console.print(row)
            if store_name == "sqlite":
                size = (config.feast_dir / "online.db").stat().st_size
                rows[-1]["sqlite_file_mb"] = size / 2**20
            if store_name == "redis":
                store.teardown()

        if args.feast_users:
            # Feast's own materialize on a slice, and ours on the same slice.
            n = args.feast_users
            _tables(root / "slice", args, n, n)
            for store_name in args.stores.split(","):
                for path in ("feast", "batched"):
                    config = FeatureStoreConfig(
                        data_dir=root / "slice",
                        project=f"bench_{uuid.uuid4().hex[:8]}",
                        profile="redis" if store_name == "redis" else "embedded",
                        redis_url=redis_url if store_name == "redis" else None,
                    )
                    store = apply(config)
                    started = time.perf_counter()
                    if path == "feast":
                        store.materialize(
                            start_date=EPOCH, end_date=END, feature_views=list(BATCH_VIEW_NAMES)
                        )
                    else:
                        for view in BATCH_VIEW_NAMES:
                            materialize_view(store, view, EPOCH, END, args.chunk_rows, None)
                    seconds = time.perf_counter() - started
                    rows.append(
                        {
                            "path": f"{path} ({n:,} users + {n:,} items)",
                            "store": store_name,
                            "view": "both",
                            "rows": 2 * n,
                            "seconds": seconds,
                            "seconds_per_million": seconds * 1e6 / n,
                        }
                    )
                    console.print(rows[-1])
                    if store_name == "redis":
                        store.teardown()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title="Materialization of the batch views (per million = users or items)")
    for column in ("path", "store", "view", "rows", "s", "s / million", "Redis MB / million"):
        table.add_column(column, justify="left" if column in ("path", "store", "view") else "right")
    for row in rows:
        mb = row.get("redis_mb_per_million")
        table.add_row(
            row["path"],
            row["store"],
            row["view"],
            f"{row['rows']:,}",
            f"{row['seconds']:.1f}",
            f"{row['seconds_per_million']:.0f}",
            "" if mb is None else f"{mb:,.0f}",
        )
    console.print(table)
    write_results(args.out, "materialize", args, rows)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
