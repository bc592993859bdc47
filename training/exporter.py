"""Event log exporter: drains the Redis Stream through a consumer group into date-partitioned Parquet.

Layout: `<out_dir>/date=YYYY-MM-DD/part-<first stream id>_<last stream id>.parquet`, columns
EXPORT_SCHEMA; `read_exported_events` returns them as a `training.data` events frame for the next run.
Exactly once into Parquet, at least once from the stream: a batch is written (tmp file fsync'd, atomic
rename, the directory fsync'd), then acknowledged. A crash before the write leaves the batch pending and it is read again on restart
(own pending entries first, then entries of dead consumers via XAUTOCLAIM); a crash between write and
ack re-reads entries whose event ids are already in their date partition, and those are skipped.
The stream entry format is `serve_app.schemas.STREAM_FIELDS` (a test writes with one, reads with this).
An entry it cannot decode (a field missing or malformed, a timestamp outside what Parquet holds: anything
written to the stream by hand or by another version) goes to a dead-letter stream (`<stream>:dead`, raw
fields as `raw:<name>` plus `error` and `stream_id`) in the same transaction that acknowledges it, and
is counted (`recserve_exporter_dead_letters_total`); the exporter keeps draining. The backlog of its
group and the dead-letter stream's length are sampled as gauges (the lag alerts read them).

Run: `python -m training.exporter --out data/events_log --once` (drain and exit) or without `--once`;
`--metrics-port 9108` serves its Prometheus metrics while it runs (`--metrics-pushgateway`,
`--metrics-textfile` publish them at the end of a `--once` run).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from serve_app.schemas import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    STREAM_FIELDS,
    EventType,
    is_safe_id,
)
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
    dead_letter_key: str | None = Field(
        None,
        min_length=1,
        description="stream of entries that could not be decoded; None: <stream_key>:dead",
    )
    dead_letter_maxlen: int = Field(
        100_000, ge=100, description="cap of the dead-letter stream (approximate)"
    )
    sample_interval_seconds: float = Field(
        5.0, gt=0.0, description="how often a running exporter samples its backlog gauges"
    )

    @property
    def dead_letter_stream(self) -> str:
        return self.dead_letter_key or f"{self.stream_key}:dead"


@dataclass(frozen=True)
class ExportStats:
    read: int = 0  # stream entries handled
    written: int = 0  # rows written to Parquet
    skipped: int = 0  # entries already exported (replayed after a crash) or deleted from the stream
    dead: int = 0  # entries that could not be decoded, moved to the dead-letter stream

    def __add__(self, other: ExportStats) -> ExportStats:
        return ExportStats(
            self.read + other.read,
            self.written + other.written,
            self.skipped + other.skipped,
            self.dead + other.dead,
        )


@dataclass(frozen=True)
class DeadLetter:
    """A stream entry that could not be decoded, its raw fields and why."""

    stream_id: bytes
    fields: dict[bytes, bytes]
    error: str

    def entry(self, stream_key: str) -> dict[bytes, bytes]:
        """Its dead-letter stream entry: where it came from, the error, every raw field."""
        head = {
            b"stream": stream_key.encode(),
            b"stream_id": self.stream_id,
            b"error": self.error.encode("utf-8", "replace")[:1024],
        }
        return head | {b"raw:" + k: v for k, v in self.fields.items()}


_EVENT_TYPES = frozenset(t.value for t in EventType)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_US = (EARLIEST_TIMESTAMP - _EPOCH) // timedelta(microseconds=1)
_MAX_US = (LATEST_TIMESTAMP - _EPOCH) // timedelta(microseconds=1)
_INTEGER = re.compile(r"-?[0-9]{1,19}")


def decode_entry(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """One stream entry as an EXPORT_SCHEMA row (without `stream_id`); ValueError naming the field
    that cannot be decoded."""
    text: dict[str, str] = {}
    for name in STREAM_FIELDS:
        raw = fields.get(name.encode())
        if raw is None:
            raise ValueError(f"field '{name}': missing")
        try:
            text[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"field '{name}': not UTF-8") from None
    for name in ("event_id", "user_id", "item_id"):
        if not is_safe_id(text[name]):
            raise ValueError(f"field '{name}': not an id")
    for name in ("session_id", "request_id"):
        if text[name] and not is_safe_id(text[name]):
            raise ValueError(f"field '{name}': not an id")
    if text["event_type"] not in _EVENT_TYPES:
        raise ValueError(f"field 'event_type': unknown type {text['event_type'][:32]!r}")
    stamp = text["timestamp_us"]
    if not _INTEGER.fullmatch(stamp) or not _MIN_US <= int(stamp) < _MAX_US:
        raise ValueError(f"field 'timestamp_us': not microseconds in [1970, 2262): {stamp[:32]!r}")
    position = text["position"]
    if position and (not _INTEGER.fullmatch(position) or not 0 <= int(position) < 2**31):
        raise ValueError(f"field 'position': not an int32 >= 0: {position[:32]!r}")
    return {
        "event_id": text["event_id"],
        "user_id": text["user_id"],
        "item_id": text["item_id"],
        "event_type": text["event_type"],
        "timestamp_us": int(stamp),
        "position": int(position) if position else -1,
        "session_id": text["session_id"],
        "request_id": text["request_id"],
    }


def decode_entries(entries: Sequence[Entry]) -> tuple[pd.DataFrame, list[DeadLetter]]:
    """Stream entries as an EXPORT_SCHEMA frame, and those that could not be decoded; entries
    deleted from the stream are left out of both."""
    rows: list[dict[str, Any]] = []
    dead: list[DeadLetter] = []
    for sid, fields in entries:
        if not fields:
            continue
        try:
            rows.append(decode_entry(fields) | {"stream_id": sid.decode()})
        except ValueError as exc:
            dead.append(DeadLetter(sid, dict(fields), str(exc)))
    if not rows:
        return EXPORT_SCHEMA.empty_table().to_pandas(), dead
    df = pd.DataFrame(rows)
    frame = pd.DataFrame(
        {
            "event_id": df["event_id"],
            "user_id": df["user_id"],
            "item_id": df["item_id"],
            "event_type": df["event_type"],
            "timestamp": pd.to_datetime(df["timestamp_us"].astype(np.int64), unit="us", utc=True),
            "position": df["position"].astype(np.int32),
            "session_id": df["session_id"],
            "request_id": df["request_id"],
            "stream_id": df["stream_id"],
        }
    )
    return frame, dead


@dataclass(frozen=True)
class Backlog:
    """The exporter group's backlog and the dead-letter stream, sampled from Redis."""

    unacknowledged: int  # entries of the stream the group has not acknowledged (pending + new)
    oldest_age_seconds: float  # stream age of the oldest of them; 0 when caught up
    dead_letters: int  # entries in the dead-letter stream


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file or sub-directory) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
            if not partition.exists():
                partition.mkdir(parents=True, exist_ok=True)
                fsync_directory(self._config.out_dir)  # the new partition's entry
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
            # The rename itself is durable only once the directory is: before the ack.
            fsync_directory(partition)
            known.update(rows["event_id"])
            written += len(rows)
        return written

    def _ack(self, ids: Sequence[bytes], dead: Sequence[DeadLetter]) -> None:
        """Move `dead` to the dead-letter stream and acknowledge `ids`, in one transaction: an
        entry is never acknowledged without its dead letter (a crash before it re-reads both)."""
        c = self._config
        pipe = self._client.pipeline(transaction=True)
        for letter in dead:
            fields: Any = letter.entry(c.stream_key)
            pipe.xadd(c.dead_letter_stream, fields, maxlen=c.dead_letter_maxlen, approximate=True)
        pipe.xack(c.stream_key, c.group, *ids)
        pipe.execute()

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
        frame, dead = decode_entries(entries)
        for letter in dead:
            logger.warning("entry %s dead-lettered: %s", letter.stream_id.decode(), letter.error)
        written = self._write(frame) if not frame.empty else 0
        self._ack([sid for sid, _ in entries], dead)
        if self._config.trim:
            self._trim()
        return ExportStats(
            read=len(entries),
            written=written,
            skipped=len(entries) - written - len(dead),
            dead=len(dead),
        )

    def backlog(self) -> Backlog:
        """The group's unacknowledged entries, the age of the oldest, the dead letters held."""
        c, client = self._config, self._client
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        dead = int(client.xlen(c.dead_letter_stream))
        if not client.exists(c.stream_key):
            return Backlog(0, 0.0, dead)
        info = next(
            (g for g in client.xinfo_groups(c.stream_key) if _text(g["name"]) == c.group), None
        )
        if info is None:  # not created yet: everything is behind
            first: Any = client.xrange(c.stream_key, count=1)
            age = (now_ms - _stream_id(first[0][0])[0]) / 1000 if first else 0.0
            return Backlog(int(client.xlen(c.stream_key)), max(0.0, age), dead)
        pending = int(info["pending"])
        oldest = [client.xpending(c.stream_key, c.group)["min"]] if pending else []
        after = client.xrange(c.stream_key, min=f"({_text(info['last-delivered-id'])}", count=1)
        oldest += [after[0][0]] if after else []
        lag = info.get("lag")
        undelivered = int(lag) if lag is not None else (1 if after else 0)
        age = (now_ms - min(_stream_id(i)[0] for i in oldest)) / 1000 if oldest else 0.0
        return Backlog(pending + undelivered, max(0.0, age), dead)

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

    def run(
        self,
        observe: Callable[[ExportStats], None] | None = None,
        sample: Callable[[Backlog], None] | None = None,
    ) -> None:
        """Export forever, waiting up to `block_ms` for new entries between batches; `sample`
        sees the backlog every `sample_interval_seconds`."""
        self.ensure_group()
        sampled = -math.inf
        while True:
            stats = self.export_batch(block_ms=self._config.block_ms)
            if stats.read:
                logger.info(
                    "exported %d rows (%d skipped, %d dead-lettered)",
                    stats.written,
                    stats.skipped,
                    stats.dead,
                )
                if observe is not None:
                    observe(stats)
            if (
                sample is not None
                and time.monotonic() - sampled >= self._config.sample_interval_seconds
            ):
                sampled = time.monotonic()
                sample(self.backlog())


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
    parser.add_argument(
        "--dead-letter-stream",
        default=None,
        help="where entries that cannot be decoded go (default: <stream>:dead)",
    )
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
        dead_letter_key=args.dead_letter_stream,
    )
    kwargs: dict[str, Any] = {"socket_timeout": max(10.0, config.block_ms / 1000 + 5)}
    exporter = StreamExporter(redis.Redis.from_url(config.redis_url, **kwargs), config)
    registry = CollectorRegistry()
    metrics = ExporterMetrics(registry)
    output = metrics_output(args, job="recserve-exporter")
    output.serve(registry)

    def observe(stats: ExportStats) -> None:
        metrics.batch(stats.read, stats.written, stats.skipped, time.time(), stats.dead)

    def sample(backlog: Backlog) -> None:
        metrics.backlog(backlog.unacknowledged, backlog.oldest_age_seconds, backlog.dead_letters)

    if args.once:
        stats = exporter.drain(observe)
        sample(exporter.backlog())
        print(
            f"read {stats.read} written {stats.written} skipped {stats.skipped} "
            f"dead-lettered {stats.dead}"
        )
        output.publish(registry)
    else:
        exporter.run(observe, sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
