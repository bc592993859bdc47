"""Bench: what does the event spool cost: an fsync'd append per batch, recovery at start, and replay?

Appends batches of 1, 10 and 100 events to a spool in a temp dir (on the same file system as
`--dir`, default the system temp dir: fsync cost depends on it) and times each append; reopens a spool
of `--recover-events` events (what a restarted replica reads before serving); replays a spool of
`--replay-events` into Redis through the real write path (`EventLogWriter`, one pipeline per replay
batch) under a key prefix of its own, which it deletes afterwards. Prints one table and writes JSON.

    .venv/bin/python bench/event_spool.py --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.events import EventLogWriter, ItemEmbeddings, WriteResult, event_id
from serve_app.features import connect_redis
from serve_app.schemas import Event
from serve_app.spool import EventSpool, SpooledLog, encode_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ helpers, as the other benchmarks
from bench.results_file import write_results  # noqa: E402

KINDS = ("view", "click", "view", "add_to_cart", "view", "purchase")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--appends", type=int, default=500, help="timed appends per batch size")
    parser.add_argument("--recover-events", type=int, default=100_000)
    parser.add_argument("--replay-events", type=int, default=20_000)
    parser.add_argument(
        "--replay-batch", type=int, default=500, help="events per replay round trip"
    )
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None, help="where the temp spools go")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "event_spool.json"
    )
    return parser.parse_args(argv)


def _events(n: int, offset: int, items: int) -> list[Event]:
    start = datetime.now(UTC) - timedelta(minutes=30)
    return [
        Event(
            user_id=f"u{(offset + k) % 2_000}",
            item_id=f"i{(offset + k * 7) % items}",
            event_type=KINDS[k % len(KINDS)],
            timestamp=start + timedelta(microseconds=offset + k),
            request_id=f"r{(offset + k) // 10}",
            position=k % 10,
        )
        for k in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=110)
    root = Path(tempfile.mkdtemp(prefix="bench_spool_", dir=args.dir))
    rows: list[dict[str, Any]] = []
    line_bytes = len(encode_record(event_id(_events(1, 0, args.items)[0]), _events(1, 0, 10)[0]))
    try:
        # --- appends: one fsync'd write per batch -------------------------------------------------
        for size in (1, 10, 100):
            spool = EventSpool.open(root / f"append-{size}", max_bytes=1 << 40)
            batches = [_events(size, b * size, args.items) for b in range(args.appends)]
            records = [[(event_id(e), e) for e in batch] for batch in batches]
            times = []
            for batch in records:
                began = time.perf_counter()
                spool.append(batch)
                times.append((time.perf_counter() - began) * 1000)
            spool.close()
            ms = np.array(times)
            rows.append(
                {
                    "case": f"append {size} event(s), fsync'd",
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                    "events_per_s": size * len(ms) / (ms.sum() / 1000),
                }
            )

        # --- recovery: a restarted replica reads its spool before serving ---------------------
        spool = EventSpool.open(root / "recover", max_bytes=1 << 40)
        for offset in range(0, args.recover_events, 1_000):
            batch = _events(1_000, offset, args.items)
            spool.append([(event_id(e), e) for e in batch])
        size_bytes = spool.size_bytes
        spool.close()
        began = time.perf_counter()
        reopened = EventSpool.open(root / "recover", max_bytes=1 << 40)
        took = time.perf_counter() - began
        assert reopened.pending == args.recover_events
        reopened.close()
        rows.append(
            {
                "case": f"open a spool of {args.recover_events:,} events ({size_bytes / 2**20:.0f} MiB)",
                "p50_ms": took * 1000,
                "events_per_s": args.recover_events / took,
            }
        )

        # --- replay into Redis through the write path -----------------------------------------
        prefix = f"bench:{uuid.uuid4().hex[:8]}"
        client = connect_redis(args.redis_url, 2.0)
        rng = np.random.default_rng(0)
        emb = ItemEmbeddings(
            "bench",
            {f"i{k}": k for k in range(args.items)},
            rng.normal(size=(args.items, args.dim)).astype(np.float32),
        )
        writer = EventLogWriter(
            client,
            RealtimeConfig(key_prefix=f"{prefix}:rt"),
            EventLogConfig(stream_key=f"{prefix}:events"),
        )
        try:
            spool = EventSpool.open(root / "replay", max_bytes=1 << 40)
            events = _events(args.replay_events, 10**9, args.items)
            for n in range(0, len(events), 100):
                spool.append([(event_id(e), e) for e in events[n : n + 100]])
            log: SpooledLog[WriteResult] = SpooledLog(
                spool, lambda evs: writer.write(evs, emb), args.replay_batch
            )
            applied, began = 0, time.perf_counter()
            while (step := log.replay_step()) is not None:
                assert step.result is not None
                applied += step.result.accepted
            took = time.perf_counter() - began
            assert applied == len(events) == client.xlen(f"{prefix}:events")
            rows.append(
                {
                    "case": f"replay {len(events):,} events, {args.replay_batch} per round trip",
                    "p50_ms": took * 1000,
                    "events_per_s": len(events) / took,
                }
            )
        finally:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title=f"Event spool ({line_bytes} bytes an event line)")
    for column in ("case", "p50 ms (total)", "p99 ms", "events/s"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in rows:
        p99 = row.get("p99_ms")
        table.add_row(
            row["case"],
            f"{row['p50_ms']:,.2f}",
            "" if p99 is None else f"{p99:,.2f}",
            f"{row['events_per_s']:,.0f}",
        )
    console.print(table)
    write_results(args.out, "event_spool", args, rows, event_line_bytes=line_bytes)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
