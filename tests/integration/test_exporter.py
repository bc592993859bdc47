"""Stream -> Parquet exporter on real Redis: partitions training can read, and no loss and no
duplicate across a failure between write and ack, or a SIGKILL of the exporter process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis

from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.events import EventLogWriter, event_id
from serve_app.features import connect_redis
from serve_app.schemas import Event
from training.data import EVENT_COLUMNS
from training.exporter import ExporterConfig, StreamExporter, read_exported_events

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DAY1 = datetime(2026, 3, 1, 23, 59, 0, tzinfo=UTC)


def _events(n: int, start: datetime = DAY1, step: timedelta = timedelta(seconds=1)) -> list[Event]:
    kinds = ["view", "click", "purchase", "add_to_cart", "skip"]
    return [
        Event(
            user_id=f"u{k % 7}",
            item_id=f"i{k % 11}",
            event_type=kinds[k % 5],
            timestamp=start + k * step,
            position=k % 4 if k % 3 else None,
            session_id=f"s{k % 2}" if k % 5 else None,
        )
        for k in range(n)
    ]


def _log(url: str, prefix: str, events: Sequence[Event]) -> list[str]:
    writer = EventLogWriter(
        connect_redis(url, 1.0),
        RealtimeConfig(key_prefix=f"{prefix}:rt"),
        EventLogConfig(stream_key=f"{prefix}:events"),
    )
    ids: list[str] = []
    for i in range(0, len(events), 500):
        ids.extend(writer.write(events[i : i + 500]).event_ids)
    return ids


def _config(url: str, prefix: str, out: Path, batch: int = 100) -> ExporterConfig:
    return ExporterConfig(
        redis_url=url, stream_key=f"{prefix}:events", out_dir=out, batch_size=batch
    )


def _exported_ids(out: Path) -> list[str]:
    return [
        i
        for p in sorted(out.glob("date=*/part-*.parquet"))
        for i in pq.read_table(p, columns=["event_id"]).column(0).to_pylist()
    ]


def test_exported_partitions_read_back_as_the_training_events_frame(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    events = _events(150)  # 23:59:00 + 150 s crosses midnight: two date partitions
    _log(redis_url, key_prefix, events)
    client = redis.Redis.from_url(redis_url)
    stats = StreamExporter(client, _config(redis_url, key_prefix, tmp_path, 40)).drain()
    assert (stats.read, stats.written, stats.skipped) == (150, 150, 0)
    assert sorted(p.name for p in tmp_path.glob("date=*")) == ["date=2026-03-01", "date=2026-03-02"]
    assert len(pq.read_table(tmp_path / "date=2026-03-01").column("event_id")) == 60

    got = read_exported_events(tmp_path)
    assert list(got.columns) == EVENT_COLUMNS
    expected = pd.DataFrame(
        {
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "event_type": [e.event_type.value for e in events],
            "timestamp": pd.to_datetime([e.timestamp for e in events], utc=True),
            "position": [-1 if e.position is None else e.position for e in events],
            "session_id": [e.session_id or "" for e in events],
        }
    )
    pd.testing.assert_frame_equal(got.drop(columns="weight"), expected, check_dtype=False)
    # Exported entries every group acknowledged are trimmed from the stream.
    assert client.xlen(f"{key_prefix}:events") <= 1


class _CrashBeforeAck(StreamExporter):
    """Dies once between writing a batch and acknowledging it (as if killed at that instant)."""

    crashed = False

    def _ack(self, ids: Sequence[bytes]) -> None:
        if not _CrashBeforeAck.crashed:
            _CrashBeforeAck.crashed = True
            raise RuntimeError("killed between write and ack")
        super()._ack(ids)


def test_a_crash_between_write_and_ack_loses_nothing_and_writes_nothing_twice(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    ids = _log(redis_url, key_prefix, _events(250))
    client = redis.Redis.from_url(redis_url)
    config = _config(redis_url, key_prefix, tmp_path, 100)
    first = _CrashBeforeAck(client, config)
    first.ensure_group()
    with pytest.raises(RuntimeError, match="killed"):
        first.export_batch()
    assert len(_exported_ids(tmp_path)) == 100  # written, not acknowledged
    assert client.xpending(config.stream_key, config.group)["pending"] == 100

    restarted = StreamExporter(client, config)  # same consumer name: reclaims its pending batch
    stats = restarted.drain()
    assert (stats.read, stats.written, stats.skipped) == (250, 150, 100)
    exported = _exported_ids(tmp_path)
    assert sorted(exported) == sorted(ids)  # every event, once
    assert client.xpending(config.stream_key, config.group)["pending"] == 0


def _start_exporter(url: str, prefix: str, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.exporter",
            *("--redis-url", url, "--stream", f"{prefix}:events"),
            *("--out", str(out), "--batch-size", "25", "--once"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_sigkill_of_the_exporter_mid_run_then_restart_exports_each_event_once(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    events = _events(3_000, step=timedelta(seconds=40))  # spans several days
    ids = _log(redis_url, key_prefix, events)
    assert ids == [event_id(e) for e in events]
    process = _start_exporter(redis_url, key_prefix, tmp_path)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("date=*/part-*.parquet"))) < 5:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = _exported_ids(tmp_path)
    assert 0 < len(partial) < len(ids)

    restart = _start_exporter(redis_url, key_prefix, tmp_path)
    output = restart.communicate(timeout=120)[0].decode()
    assert restart.returncode == 0, output
    exported = _exported_ids(tmp_path)
    assert len(exported) == len(set(exported)) == len(ids)
    assert set(exported) == set(ids)
    assert not list(tmp_path.glob("date=*/.tmp-*"))
