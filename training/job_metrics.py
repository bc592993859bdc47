"""Prometheus metrics of the processes outside Ray: the training run, feature materialization, the exporter.

Each process fills its own prometheus-client registry and publishes it in the ways asked for, all
optional: pushed to a Pushgateway (batch jobs end before any scrape could see them), written as a text
file in the exposition format (node-exporter's textfile collector, or a file for CI), or served on an HTTP
port while the process runs (the long-running event exporter). With none asked, nothing is published.
`JOB_CATALOG` lists every metric; the dashboards and alert rules in `monitoring/` are checked against it.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    push_to_gateway,
    start_http_server,
    write_to_textfile,
)

logger = logging.getLogger(__name__)

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class JobMetric:
    """One metric of a job, named as Prometheus scrapes it."""

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        return (self.name,)


EXPORTER_READ = JobMetric(
    "recserve_exporter_entries_read_total", "counter", "Stream entries the exporter handled."
)
EXPORTER_WRITTEN = JobMetric(
    "recserve_exporter_rows_written_total", "counter", "Event rows the exporter wrote to Parquet."
)
EXPORTER_SKIPPED = JobMetric(
    "recserve_exporter_entries_skipped_total",
    "counter",
    "Entries not written: already exported (replayed after a crash) or deleted from the stream.",
)
EXPORTER_LAST_BATCH = JobMetric(
    "recserve_exporter_last_batch_timestamp_seconds",
    "gauge",
    "When the exporter last wrote and acknowledged a batch (epoch seconds).",
)
EXPORTER_DEAD_LETTERS = JobMetric(
    "recserve_exporter_dead_letters_total",
    "counter",
    "Stream entries the exporter could not decode and moved to the dead-letter stream.",
)
EXPORTER_DEAD_LETTER_ENTRIES = JobMetric(
    "recserve_exporter_dead_letter_entries",
    "gauge",
    "Entries held in the dead-letter stream (until an operator deletes them).",
)
EXPORTER_BACKLOG = JobMetric(
    "recserve_exporter_backlog_entries",
    "gauge",
    "Stream entries the exporter's group has not acknowledged (pending + not yet delivered).",
)
EXPORTER_OLDEST_UNACKED_AGE = JobMetric(
    "recserve_exporter_oldest_unacked_age_seconds",
    "gauge",
    "Age of the oldest stream entry the exporter's group has not acknowledged (0: caught up).",
)
MATERIALIZATION_SUCCESS = JobMetric(
    "recserve_materialization_last_success_timestamp_seconds",
    "gauge",
    "When feature materialization last succeeded (epoch seconds).",
)
MATERIALIZATION_DURATION = JobMetric(
    "recserve_materialization_duration_seconds",
    "gauge",
    "How long the last successful feature materialization took.",
)
MATERIALIZATION_END = JobMetric(
    "recserve_materialization_end_timestamp_seconds",
    "gauge",
    "Up to when the last materialization loaded batch features (epoch seconds).",
)
TRAINING_SUCCESS = JobMetric(
    "recserve_training_last_success_timestamp_seconds",
    "gauge",
    "When a training run last finished (epoch seconds).",
)
TRAINING_STEP_DURATION = JobMetric(
    "recserve_training_step_duration_seconds",
    "gauge",
    "Duration of each step of the last training run.",
    ("step",),
)
TRAINING_OFFLINE_METRIC = JobMetric(
    "recserve_training_offline_metric",
    "gauge",
    "Offline evaluation of the last training run's final system (test round, as served).",
    ("metric",),
)
TRAINING_BUNDLE = JobMetric(
    "recserve_training_bundle_info",
    "gauge",
    "1 for the registry version the last training run registered.",
    ("model_version",),
)

JOB_CATALOG: tuple[JobMetric, ...] = (
    EXPORTER_READ,
    EXPORTER_WRITTEN,
    EXPORTER_SKIPPED,
    EXPORTER_LAST_BATCH,
    EXPORTER_DEAD_LETTERS,
    EXPORTER_DEAD_LETTER_ENTRIES,
    EXPORTER_BACKLOG,
    EXPORTER_OLDEST_UNACKED_AGE,
    MATERIALIZATION_SUCCESS,
    MATERIALIZATION_DURATION,
    MATERIALIZATION_END,
    TRAINING_SUCCESS,
    TRAINING_STEP_DURATION,
    TRAINING_OFFLINE_METRIC,
    TRAINING_BUNDLE,
)


def _counter(spec: JobMetric, registry: CollectorRegistry) -> Counter:
    # prometheus-client adds `_total` itself; it takes the name without it.
    return Counter(
        spec.name.removesuffix("_total"), spec.description, spec.tag_keys, registry=registry
    )


def _gauge(spec: JobMetric, registry: CollectorRegistry) -> Gauge:
    return Gauge(spec.name, spec.description, spec.tag_keys, registry=registry)


class ExporterMetrics:
    """The event exporter's counters, updated after every batch."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.read = _counter(EXPORTER_READ, registry)
        self.written = _counter(EXPORTER_WRITTEN, registry)
        self.skipped = _counter(EXPORTER_SKIPPED, registry)
        self.last_batch = _gauge(EXPORTER_LAST_BATCH, registry)
        self.dead = _counter(EXPORTER_DEAD_LETTERS, registry)
        self.dead_held = _gauge(EXPORTER_DEAD_LETTER_ENTRIES, registry)
        self.unacknowledged = _gauge(EXPORTER_BACKLOG, registry)
        self.oldest_age = _gauge(EXPORTER_OLDEST_UNACKED_AGE, registry)

    def batch(self, read: int, written: int, skipped: int, now: float, dead: int = 0) -> None:
        self.read.inc(read)
        self.written.inc(written)
        self.skipped.inc(skipped)
        self.dead.inc(dead)
        if read:
            self.last_batch.set(now)

    def backlog(self, unacknowledged: int, oldest_age_seconds: float, dead_letters: int) -> None:
        self.unacknowledged.set(unacknowledged)
        self.oldest_age.set(oldest_age_seconds)
        self.dead_held.set(dead_letters)


class MaterializationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.success = _gauge(MATERIALIZATION_SUCCESS, registry)
        self.duration = _gauge(MATERIALIZATION_DURATION, registry)
        self.end = _gauge(MATERIALIZATION_END, registry)

    def succeeded(self, seconds: float, end: float, now: float) -> None:
        self.duration.set(seconds)
        self.end.set(end)
        self.success.set(now)


class TrainingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.success = _gauge(TRAINING_SUCCESS, registry)
        self.steps = _gauge(TRAINING_STEP_DURATION, registry)
        self.offline = _gauge(TRAINING_OFFLINE_METRIC, registry)
        self.bundle = _gauge(TRAINING_BUNDLE, registry)

    def succeeded(
        self,
        step_seconds: Mapping[str, float],
        offline: Mapping[str, float],
        version: str | None,
        now: float,
    ) -> None:
        for step, seconds in step_seconds.items():
            self.steps.labels(step=step).set(seconds)
        for name, value in offline.items():
            self.offline.labels(metric=name).set(value)
        if version is not None:
            self.bundle.labels(model_version=version).set(1)
        self.success.set(now)


@dataclass(frozen=True)
class MetricsOutput:
    """Where a job publishes its registry; every field optional."""

    job: str
    pushgateway: str | None = None
    textfile: Path | None = None
    port: int | None = None
    address: str = "0.0.0.0"

    def publish(self, registry: CollectorRegistry) -> None:
        """Push and/or write the registry's current values (at the end of a batch job)."""
        if self.pushgateway:
            push_to_gateway(self.pushgateway, job=self.job, registry=registry, timeout=10)
        if self.textfile is not None:
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(self.textfile), registry)

    def serve(self, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread] | None:
        """Serve /metrics on `port` in a daemon thread while the process runs (None: no port)."""
        if self.port is None:
            return None
        server, thread = start_http_server(self.port, addr=self.address, registry=registry)
        logger.info("metrics on http://%s:%d/metrics", self.address, self.port)
        return server, thread


def add_metrics_arguments(parser: argparse.ArgumentParser, serve: bool = False) -> None:
    """The metrics flags of a job's command line (`serve`: also --metrics-port)."""
    parser.add_argument(
        "--metrics-pushgateway",
        metavar="URL",
        help="push this run's metrics to a Prometheus Pushgateway at the end",
    )
    parser.add_argument(
        "--metrics-textfile",
        type=Path,
        metavar="PATH",
        help="write this run's metrics to a file in the Prometheus text format",
    )
    if serve:
        parser.add_argument(
            "--metrics-port", type=int, metavar="PORT", help="serve /metrics on this port"
        )
        parser.add_argument(
            "--metrics-address", default="0.0.0.0", help="address of the metrics port"
        )


def metrics_output(args: argparse.Namespace, job: str) -> MetricsOutput:
    return MetricsOutput(
        job=job,
        pushgateway=getattr(args, "metrics_pushgateway", None),
        textfile=getattr(args, "metrics_textfile", None),
        port=getattr(args, "metrics_port", None),
        address=getattr(args, "metrics_address", "0.0.0.0"),
    )
