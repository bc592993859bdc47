"""Event log exporter: drains the Redis Stream through a consumer group into date-partitioned Parquet.

Layout: `<out_dir>/date=YYYY-MM-DD/part-<first stream id>_<last stream id>.parquet`, columns
EXPORT_SCHEMA; `read_exported_events` returns them as a `training.data` events frame for the next run.
Exactly once into Parquet, at least once from the stream: a batch is written (tmp file + atomic rename),
then acknowledged. A crash before the write leaves the batch pending and it is read again on restart
(own pending entries first, then entries of dead consumers via XAUTOCLAIM); a crash between write and
ack re-reads entries whose event ids are already in their date partition, and those are skipped.
The stream entry format is `serve_app.events.STREAM_FIELDS` (a test writes with one, reads with this).

Run: `python -m training.exporter --out data/events_log --once` (drain and exit) or without `--once`;
`--metrics-port 9108` serves its Prometheus metrics while it runs (`--metrics-pushgateway`,
`--metrics-textfile` publish them at the end of a `--once` run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from training.data import normalize_events
from training.job_metrics import ExporterMetrics, add_metrics_arguments, metrics_output

logger = logging.getLogger(__name__)

EXPORT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", pa.timestamp("ns", tz="UTC")),
        ("position", pa.int32()),
        ("session_id", pa.string()),
        ("request_id", pa.string()),
        ("stream_id", pa.string()),
    ]
)
Entry = tuple[bytes, dict[bytes, bytes] | None]


class ExporterConfig(BaseModel):
    """Where to read (stream, group, consumer) and write (out_dir), and how much at a time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_key: str = Field("recserve:events", description="serve_app EventLogConfig.stream_key")
    group: str = "exporter"
    consumer: str = Field(
        "exporter-1", description="stable per replica: a restart reclaims its own"
    )
    out_dir: Path = Path("data/events_log")
    batch_size: int = Field(1_000, ge=1)
    block_ms: int = Field(1_000, ge=0, description="wait for new entries this long per read")
    claim_idle_ms: int = Field(
        60_000, ge=0, description="take over another consumer's entries pending this long"
    )
    trim: bool = Field(True, description="delete exported entries every group has acknowledged")
    cached_dates: int = Field(3, ge=1, description="date partitions whose event ids stay in memory")


@dataclass(frozen=True)
class ExportStats:
    read: int = 0  # stream entries handled
    written: int = 0  # rows written to Parquet
    skipped: int = 0  # entries already exported (replayed after a crash) or deleted from the stream

    def __add__(self, other: ExportStats) -> ExportStats:
        return ExportStats(
            self.read + other.read, self.written + other.written, self.skipped + other.skipped
        )


def decode_entries(entries: Sequence[Entry]) -> pd.DataFrame:
    """Stream entries as an EXPORT_SCHEMA frame; entries deleted from the stream are left out."""
    rows = [
        {k.decode(): v.decode() for k, v in fields.items()} | {"stream_id": sid.decode()}
        for sid, fields in entries
        if fields
    ]
    if not rows:
        return EXPORT_SCHEMA.empty_table().to_pandas()
    df = pd.DataFrame(rows)
    position = pd.to_numeric(df["position"].replace("", "-1"))
    return pd.DataFrame(
        {
            "event_id": df["event_id"],
            "user_id": df["user_id"],
            "item_id": df["item_id"],
            "event_type": df["event_type"],
            "timestamp": pd.to_datetime(df["timestamp_us"].astype(np.int64), unit="us", utc=True),
            "position": position.astype(np.int32),
            "session_id": df["session_id"],
            "request_id": df["request_id"],
            "stream_id": df["stream_id"],
        }
    )


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class StreamExporter:
    """One consumer of the group; `export_batch` handles at most `batch_size` entries."""

    def __init__(self, client: redis.Redis, config: ExporterConfig) -> None:
        self._client = client
        self._config = config
        self._own_pending_done = False
        self._known: OrderedDict[str, set[str]] = OrderedDict()
        config.out_dir.mkdir(parents=True, exist_ok=True)
        # A crash during a write leaves a tmp file that no reader ever opens: clear them.
        for stale in config.out_dir.glob("date=*/.tmp-*"):
            stale.unlink()

    def ensure_group(self) -> None:
        try:
            self._client.xgroup_create(
                self._config.stream_key, self._config.group, "0", mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, block_ms: int | None) -> list[Entry]:
        c = self._config
        if not self._own_pending_done:
            reply: Any = self._client.xreadgroup(
                c.group, c.consumer, {c.stream_key: "0"}, count=c.batch_size
            )
            entries = list(reply[0][1]) if reply else []
            if entries:
                return entries
            self._own_pending_done = True
        claimed: Any = self._client.xautoclaim(
            c.stream_key, c.group, c.consumer, c.claim_idle_ms, "0-0", count=c.batch_size
        )
        if claimed[1]:
            return list(claimed[1])
        reply = self._client.xreadgroup(
            c.group, c.consumer, {c.stream_key: ">"}, count=c.batch_size, block=block_ms
        )
        return list(reply[0][1]) if reply else []

    def _known_ids(self, partition: Path) -> set[str]:
        key = partition.name
        if key not in self._known:
            ids: set[str] = set()
            for part in partition.glob("part-*.parquet"):
                ids.update(pq.read_table(part, columns=["event_id"]).column(0).to_pylist())
            self._known[key] = ids
            while len(self._known) > self._config.cached_dates:
                self._known.popitem(last=False)
        self._known.move_to_end(key)
        return self._known[key]

    def _write(self, frame: pd.DataFrame) -> int:
        written = 0
        dates = frame["timestamp"].dt.strftime("%Y-%m-%d")
        for date, rows in frame.groupby(dates, sort=True):
            partition = self._config.out_dir / f"date={date}"
            partition.mkdir(parents=True, exist_ok=True)
            known = self._known_ids(partition)
            rows = rows[~rows["event_id"].isin(known)].drop_duplicates("event_id")
            if rows.empty:
                continue
            first, last = rows["stream_id"].iloc[0], rows["stream_id"].iloc[-1]
            target = partition / f"part-{first}_{last}.parquet"
            tmp = partition / f".tmp-{target.name}"
            table = pa.Table.from_pandas(rows, schema=EXPORT_SCHEMA, preserve_index=False)
            pq.write_table(table, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            tmp.replace(target)
            known.update(rows["event_id"])
            written += len(rows)
        return written

    def _ack(self, ids: Sequence[bytes]) -> None:
        self._client.xack(self._config.stream_key, self._config.group, *ids)

    def _trim(self) -> None:
        # Only entries every group has acknowledged go: below the oldest pending entry of any group,
        # and never past what any group has been delivered.
        floor: tuple[int, int] | None = None
        for group in self._client.xinfo_groups(self._config.stream_key):
            mark = _stream_id(group["last-delivered-id"])
            if group["pending"]:
                summary = self._client.xpending(self._config.stream_key, group["name"])
                mark = min(mark, _stream_id(summary["min"]))
            floor = mark if floor is None else min(floor, mark)
        if floor is not None and floor > (0, 0):
            self._client.xtrim(
                self._config.stream_key, minid=f"{floor[0]}-{floor[1]}", approximate=False
            )

    def export_batch(self, block_ms: int | None = None) -> ExportStats:
        """Read, write and acknowledge one batch; an empty stats when nothing was waiting."""
        entries = self._read(block_ms)
        if not entries:
            return ExportStats()
        frame = decode_entries(entries)
        written = self._write(frame) if not frame.empty else 0
        self._ack([sid for sid, _ in entries])
        if self._config.trim:
            self._trim()
        return ExportStats(read=len(entries), written=written, skipped=len(entries) - written)

    def drain(self, observe: Callable[[ExportStats], None] | None = None) -> ExportStats:
        """Export until nothing is pending or new (does not wait for more); `observe` sees
        every batch."""
        self.ensure_group()
        total = ExportStats()
        while True:
            stats = self.export_batch(block_ms=None)
            if stats.read == 0:
                return total
            if observe is not None:
                observe(stats)
            total = total + stats

    def run(self, observe: Callable[[ExportStats], None] | None = None) -> None:
        """Export forever, waiting up to `block_ms` for new entries between batches."""
        self.ensure_group()
        while True:
            stats = self.export_batch(block_ms=self._config.block_ms)
            if stats.read:
                logger.info("exported %d rows (%d skipped)", stats.written, stats.skipped)
                if observe is not None:
                    observe(stats)


def read_exported_events(directory: Path) -> pd.DataFrame:
    """Every exported event as a `training.data.normalize_events` frame (time order)."""
    parts = sorted(directory.glob("date=*/part-*.parquet"))
    if not parts:
        return normalize_events(
            pd.DataFrame(columns=["user_id", "item_id", "event_type", "timestamp"])
        )
    frame = pd.concat(
        [pq.read_table(p, schema=EXPORT_SCHEMA).to_pandas() for p in parts], ignore_index=True
    )
    return normalize_events(frame.drop_duplicates("event_id"))


def main(argv: Sequence[str] | None = None) -> int:
    defaults = ExporterConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", default=defaults.redis_url)
    parser.add_argument("--stream", default=defaults.stream_key)
    parser.add_argument("--group", default=defaults.group)
    parser.add_argument("--consumer", default=defaults.consumer)
    parser.add_argument("--out", type=Path, default=defaults.out_dir)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--claim-idle-ms", type=int, default=defaults.claim_idle_ms)
    parser.add_argument("--no-trim", action="store_true", help="keep exported entries")
    parser.add_argument("--once", action="store_true", help="drain what is there, then exit")
    add_metrics_arguments(parser, serve=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = ExporterConfig(
        redis_url=args.redis_url,
        stream_key=args.stream,
        group=args.group,
        consumer=args.consumer,
        out_dir=args.out,
        batch_size=args.batch_size,
        claim_idle_ms=args.claim_idle_ms,
        trim=not args.no_trim,
    )
    kwargs: dict[str, Any] = {"socket_timeout": max(10.0, config.block_ms / 1000 + 5)}
    exporter = StreamExporter(redis.Redis.from_url(config.redis_url, **kwargs), config)
    registry = CollectorRegistry()
    metrics = ExporterMetrics(registry)
    output = metrics_output(args, job="recserve-exporter")
    output.serve(registry)

    def observe(stats: ExportStats) -> None:
        metrics.batch(stats.read, stats.written, stats.skipped, time.time())

    if args.once:
        stats = exporter.drain(observe)
        print(f"read {stats.read} written {stats.written} skipped {stats.skipped}")
        output.publish(registry)
    else:
        exporter.run(observe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
