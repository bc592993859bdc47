"""Stream -> Parquet exporter on real Redis: partitions training can read, and no loss and no
duplicate across a failure between write and ack, or a SIGKILL of the exporter process; an entry it
cannot decode goes to the dead-letter stream, counted, while every other event reaches Parquet; a
client's retry with one event_id is one event in the stream, the features and Parquet."""

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
from prometheus_client.parser import text_string_to_metric_families

from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.events import EventLogWriter, event_id
from serve_app.features import FeatureShapes, OnlineFeatureReader, connect_redis
from serve_app.schemas import Event
from training.data import EVENT_COLUMNS
from training.exporter import DeadLetter, ExporterConfig, StreamExporter, read_exported_events

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

    def _ack(self, ids: Sequence[bytes], dead: Sequence[DeadLetter]) -> None:
        if not _CrashBeforeAck.crashed:
            _CrashBeforeAck.crashed = True
            raise RuntimeError("killed between write and ack")
        super()._ack(ids, dead)


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


def _samples(text: str) -> dict[str, float]:
    """{sample name: value} of an exposition-format text (unlabelled samples)."""
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def test_an_undecodable_entry_is_dead_lettered_counted_and_every_other_event_exported(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    stream = f"{key_prefix}:events"
    before = _log(redis_url, key_prefix, _events(30))
    client = redis.Redis.from_url(redis_url)
    # Written straight into the stream, as a bug, another version or a hand would: year 9999 (out
    # of pandas' range: it stopped the old exporter for good), a missing field, bytes not UTF-8.
    good = {k: v for k, v in client.xrange(stream, count=1)[0][1].items()}
    bad = [
        good | {b"timestamp_us": b"253402300799000000", b"event_id": b"far-future"},
        {b"user_id": b"u1", b"note": b"no other field"},
        good | {b"item_id": b"\xff\xfe", b"event_id": b"not-utf8"},
    ]
    bad_ids = [client.xadd(stream, fields) for fields in bad]  # type: ignore[arg-type]
    after = _log(redis_url, key_prefix, _events(30, start=DAY1 + timedelta(hours=2)))
    textfile = tmp_path / "exporter.prom"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.exporter",
            *("--redis-url", redis_url, "--stream", stream, "--out", str(tmp_path / "out")),
            *("--batch-size", "7", "--once", "--metrics-textfile", str(textfile)),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(_exported_ids(tmp_path / "out")) == sorted(before + after)
    dead = client.xrange(f"{stream}:dead")
    assert [d[1][b"stream_id"] for d in dead] == bad_ids
    assert [{k[4:]: v for k, v in d[1].items() if k.startswith(b"raw:")} for d in dead] == bad
    assert [d[1][b"error"].split(b":")[0] for d in dead] == [
        b"field 'timestamp_us'",
        b"field 'event_id'",
        b"field 'item_id'",
    ]
    assert all(d[1][b"stream"] == stream.encode() for d in dead)
    values = _samples(textfile.read_text())
    assert values["recserve_exporter_dead_letters_total"] == 3
    assert values["recserve_exporter_dead_letter_entries"] == 3
    assert values["recserve_exporter_rows_written_total"] == 60
    assert values["recserve_exporter_entries_read_total"] == 63
    assert values["recserve_exporter_backlog_entries"] == 0
    assert values["recserve_exporter_oldest_unacked_age_seconds"] == 0
    assert client.xpending(stream, "exporter")["pending"] == 0  # everything acknowledged


def test_the_same_event_twice_with_one_event_id_is_once_in_stream_features_and_parquet(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    writer = EventLogWriter(
        connect_redis(redis_url, 1.0),
        RealtimeConfig(key_prefix=f"{key_prefix}:rt"),
        EventLogConfig(stream_key=f"{key_prefix}:events"),
    )
    body = {"user_id": "u1", "item_id": "i1", "event_type": "click", "event_id": "client-7"}
    # Each parse stamps the server's time, as two POSTs without a timestamp would.
    first = Event.model_validate(body)
    retry = Event.model_validate(body).model_copy(
        update={"timestamp": first.timestamp + timedelta(seconds=2)}
    )
    assert writer.write([first]).accepted == 1
    assert writer.write([retry]).duplicates == 1
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(f"{key_prefix}:events") == 1
    reader = OnlineFeatureReader(
        None, connect_redis(redis_url, 1.0), key_prefix=f"{key_prefix}:rt", store_on_redis=False
    )
    state = reader.users(["u1"], FeatureShapes(1, 2, 3), model_version=None)
    assert (state.count_5m[0], state.recent_items[0]) == (1, ("i1",))
    StreamExporter(client, _config(redis_url, key_prefix, tmp_path)).drain()
    exported = read_exported_events(tmp_path)
    assert len(exported) == 1 and _exported_ids(tmp_path) == [event_id(first)]
