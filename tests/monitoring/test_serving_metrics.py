"""The online graph's metric catalog (serve_app/metrics.py) and the values its deployments sample: the
event stream's backlog per consumer group (real Redis) and the age of users' real-time state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import redis

from serve_app.config import EventLogConfig, RealtimeConfig
from serve_app.deployments.user_tower import realtime_ages
from serve_app.events import EventLogWriter, StreamStats, oldest_unacked_ms, stream_id_ms
from serve_app.features import connect_redis
from serve_app.metrics import CATALOG, FALLBACK_REASONS
from tests.conftest import PrivateRedis

# Serve sets these itself on every metric recorded in a replica.
SERVE_TAGS = {"deployment", "replica", "application"}


def test_catalog_names_are_unique_prefixed_and_typed() -> None:
    names = [spec.name for spec in CATALOG]
    assert len(names) == len(set(names))
    for spec in CATALOG:
        assert spec.name.startswith("recserve_"), spec.name
        assert spec.exported == "ray_" + spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.description.strip()
        assert not set(spec.tag_keys) & SERVE_TAGS, spec.name
        if spec.kind == "histogram":
            # Ray takes increasing positive boundaries only (a 0 lands in the first bucket).
            assert list(spec.boundaries) == sorted(set(spec.boundaries)) and spec.boundaries
            assert spec.boundaries[0] > 0
            assert spec.series == tuple(f"ray_{spec.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            assert spec.boundaries == () and spec.series == (spec.exported,)


def test_the_issue_s_metrics_are_all_in_the_catalog() -> None:
    tags = {spec.name: set(spec.tag_keys) for spec in CATALOG}
    assert {"route", "status"} <= tags["recserve_http_requests_total"]
    assert {"route", "status"} <= tags["recserve_http_latency_ms"]
    assert tags["recserve_stage_latency_ms"] == {"stage"}
    assert tags["recserve_fallbacks_total"] == {"variant", "reason"}
    assert FALLBACK_REASONS == ("cold_start", "degraded", "model_missing")
    assert tags["recserve_model_info"] == {"variant", "model_version"}
    for name in (
        "recserve_stage_batch_size",
        "recserve_candidates_retrieved",
        "recserve_events_accepted_total",
        "recserve_events_rejected_total",
        "recserve_event_stream_length",
        "recserve_event_consumer_lag_seconds",
        "recserve_feature_realtime_age_seconds",
        "recserve_feature_materialized_timestamp_seconds",
        "recserve_shadow_overlap",
        "recserve_shadow_errors_total",
    ):
        assert name in tags, name
    for name in ("recserve_impressions_total", "recserve_clicks_total"):
        assert tags[name] == {"variant"}


def test_realtime_ages_skip_users_without_state_and_clamp_clock_skew() -> None:
    last = np.array([100.0, math.nan, 250.5, 400.0])
    assert realtime_ages(last, now=300.0) == [200.0, 49.5, 0.0]
    assert realtime_ages(np.array([math.nan]), now=1.0) == []


def test_oldest_unacked_is_the_older_of_pending_and_next_undelivered() -> None:
    assert stream_id_ms(b"1700000000123-4") == 1_700_000_000_123
    assert oldest_unacked_ms(b"1000-0", "900-3") == 900
    assert oldest_unacked_ms(None, b"1500-0") == 1500
    assert oldest_unacked_ms("1200-1", None) == 1200
    assert oldest_unacked_ms(None, None) is None


def test_stream_stats_report_each_groups_backlog(private_redis: PrivateRedis) -> None:
    log = EventLogConfig(stream_key="t:events")
    writer = EventLogWriter(connect_redis(private_redis.url, 1.0), RealtimeConfig(), log)
    client = redis.Redis.from_url(private_redis.url)
    assert writer.stream_stats().length == 0  # no stream yet

    ids = [client.xadd(log.stream_key, {"n": str(i)}, id=f"{1000 * (i + 1)}-0") for i in range(5)]
    client.xgroup_create(log.stream_key, "caught-up", "$")
    client.xgroup_create(log.stream_key, "behind", "0")
    # "behind" was handed the first two entries and acknowledged only the second.
    client.xreadgroup("behind", "c1", {log.stream_key: ">"}, count=2)
    client.xack(log.stream_key, "behind", ids[1])

    stats = writer.stream_stats()
    assert stats.length == 5
    server_ms = int(client.time()[0]) * 1000
    assert server_ms - 1000 <= stats.now_ms <= server_ms + 2000
    by_name = {g.name: g for g in stats.groups}
    behind, caught_up = by_name["behind"], by_name["caught-up"]
    # Entry 1000-0 is pending, 3000-0 is the next undelivered: the oldest unacknowledged is 1000.
    assert (behind.undelivered, behind.pending, behind.oldest_unacked_ms) == (3, 1, 1000)
    assert (caught_up.undelivered, caught_up.pending, caught_up.oldest_unacked_ms) == (0, 0, None)
    assert stats.lag_seconds(behind) == pytest.approx((stats.now_ms - 1000) / 1000)
    assert stats.lag_seconds(caught_up) == 0.0
    assert StreamStats(0, 500, ()).lag_seconds(behind) == 0.0  # a clock behind the ids: no lag
