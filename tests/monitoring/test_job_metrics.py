"""Metrics of the processes outside Ray (training/job_metrics.py): the event exporter serves them on a port
while it runs and writes them to a file after a --once run, batch jobs push them to a Pushgateway; the
values are the counts of what the process did, counted here independently."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import httpx
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.events import EventLogWriter
from serve_app.features import connect_redis
from serve_app.schemas import Event
from tests.conftest import PrivateRedis
from tests.monitoring.promkit import free_port
from training.job_metrics import (
    JOB_CATALOG,
    MaterializationMetrics,
    MetricsOutput,
    TrainingMetrics,
)

REPO = Path(__file__).resolve().parents[2]
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition-format text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def log_events(url: str, n: int, start: datetime = START) -> None:
    writer = EventLogWriter(connect_redis(url, 1.0), RealtimeConfig(), EventLogConfig())
    events = [
        Event(
            user_id=f"u{k % 5}",
            item_id=f"i{k % 9}",
            event_type="click" if k % 2 else "view",
            timestamp=start + timedelta(seconds=k),
        )
        for k in range(n)
    ]
    # The same first event twice more: a retry the log recognises, not a new stream entry.
    writer.write([*events, events[0], events[0]])


def exporter_command(url: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "training.exporter", "--redis-url", url, "--out", str(out)]


def test_every_job_metric_name_is_unique_and_prefixed() -> None:
    names = [m.name for m in JOB_CATALOG]
    assert len(names) == len(set(names))
    assert all(n.startswith("recserve_") for n in names)
    assert all(m.name.endswith("_total") == (m.kind == "counter") for m in JOB_CATALOG)


def test_exporter_once_writes_what_it_exported_to_a_textfile(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    log_events(private_redis.url, 25)
    textfile = tmp_path / "metrics" / "exporter.prom"
    before = time.time()
    result = subprocess.run(
        [
            *exporter_command(private_redis.url, tmp_path / "out"),
            "--once",
            "--batch-size",
            "10",
            "--metrics-textfile",
            str(textfile),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    values = samples(textfile.read_text())
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").rglob("part-*.parquet"))
    assert rows == 25
    # 25 distinct events; the two retries never reached the stream.
    assert values[("recserve_exporter_entries_read_total", ())] == 25
    assert values[("recserve_exporter_rows_written_total", ())] == 25
    assert values[("recserve_exporter_entries_skipped_total", ())] == 0
    assert before <= values[("recserve_exporter_last_batch_timestamp_seconds", ())] <= time.time()


@pytest.fixture
def exporter_process(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            *exporter_command(private_redis.url, tmp_path / "out"),
            "--metrics-port",
            str(port),
            "--metrics-address",
            "127.0.0.1",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        process.terminate()
        process.wait(timeout=15)


def scrape_until(url: str, name: str, expected: float, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    values: dict = {}
    while time.monotonic() < deadline:
        try:
            values = samples(httpx.get(url, timeout=2).text)
        except httpx.HTTPError:
            values = {}
        if values.get((name, ())) == expected:
            return values
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached {expected}: {values.get((name, ()))}")


def test_running_exporter_serves_its_counts_on_the_metrics_port(
    exporter_process: str, private_redis: PrivateRedis
) -> None:
    scrape_until(exporter_process, "recserve_exporter_rows_written_total", 0)
    log_events(private_redis.url, 12)
    values = scrape_until(exporter_process, "recserve_exporter_rows_written_total", 12)
    assert values[("recserve_exporter_entries_read_total", ())] == 12
    log_events(private_redis.url, 5, start=START + timedelta(hours=1))
    values = scrape_until(exporter_process, "recserve_exporter_rows_written_total", 17)
    assert values[("recserve_exporter_entries_read_total", ())] == 17
    assert values[("recserve_exporter_entries_skipped_total", ())] == 0


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A Pushgateway's push endpoint: records the method, path and body of every push."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(("PUT", self.path, body))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: ClassVar[list[tuple[str, str, bytes]]] = []
    handler = type("Gateway", (_Gateway,), {"received": received})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_a_batch_job_pushes_its_metrics_under_its_job_name(
    gateway: tuple[str, list[tuple[str, str, bytes]]], tmp_path: Path
) -> None:
    url, received = gateway
    registry = CollectorRegistry()
    TrainingMetrics(registry).succeeded(
        {"two_tower": 12.5, "ranker": 3.25}, {"ndcg@10": 0.21}, "7", now=1_700_000_000.0
    )
    MetricsOutput(job="recserve-training", pushgateway=url, textfile=tmp_path / "t.prom").publish(
        registry
    )
    ((method, path, body),) = received
    assert (method, path) == ("PUT", "/metrics/job/recserve-training")
    pushed = samples(body.decode())
    assert pushed == samples((tmp_path / "t.prom").read_text())
    assert pushed == {
        ("recserve_training_last_success_timestamp_seconds", ()): 1_700_000_000.0,
        ("recserve_training_step_duration_seconds", (("step", "two_tower"),)): 12.5,
        ("recserve_training_step_duration_seconds", (("step", "ranker"),)): 3.25,
        ("recserve_training_offline_metric", (("metric", "ndcg@10"),)): 0.21,
        ("recserve_training_bundle_info", (("model_version", "7"),)): 1.0,
    }


def test_materialization_metrics_hold_duration_end_and_success_time(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    MaterializationMetrics(registry).succeeded(4.5, end=1_700_000_100.0, now=1_700_000_105.0)
    MetricsOutput(job="recserve-materialization", textfile=tmp_path / "m.prom").publish(registry)
    assert samples((tmp_path / "m.prom").read_text()) == {
        ("recserve_materialization_duration_seconds", ()): 4.5,
        ("recserve_materialization_end_timestamp_seconds", ()): 1_700_000_100.0,
        ("recserve_materialization_last_success_timestamp_seconds", ()): 1_700_000_105.0,
    }
