"""The dashboards and alert rules against a real Prometheus scraping the running graph.

The session's graph (conftest `serving_app`: real Ray Serve, MLflow, Feast, Redis) exports its metrics on
Ray's metrics port; the event exporter runs as its own process with its metrics port. A Prometheus started
from monitoring/prometheus/prometheus.yml (targets pointed at those ports on loopback, scraping every
second) scrapes both while this module sends recommendations and events. Then every query of every
dashboard panel must return at least one series, the counters must have grown by exactly the traffic sent
(counted here from the HTTP responses), the alert rules must evaluate without error on the live series,
and the template variables must list this namespace and variant.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from serve_app.config import ExperimentConfig
from serve_app.experiments import shadow_sampled
from serve_app.schemas import POSITIVE_EVENT_TYPES
from tests.conftest import SERVING_SHADOW_SHARE
from tests.monitoring import promkit

if TYPE_CHECKING:
    from tests.conftest import ServingApp

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMESPACE = "recserve-e2e"
# Ray exports every ~10 s: a value unchanged for longer is settled.
SETTLE_SECONDS = 12.0
WAIT_SECONDS = 90.0
SHADOW_SALT = ExperimentConfig().salt  # the session graph's experiment is the default one


@dataclass
class Traffic:
    """What this module sent and what the API answered, counted from the responses."""

    variant: str = ""
    model_version: str = ""
    ok: int = 0
    items: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    invalid: int = 0
    event_posts: int = 0
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    fresh_user_requests: int = 0
    new_clicks: int = 0  # clicks that were not retries
    request_ids: list[str] = field(default_factory=list)

    @property
    def mirrored(self) -> int:
        """Requests the session graph mirrored to its shadow: sampled by request id."""
        return sum(shadow_sampled(SHADOW_SALT, r, SERVING_SHADOW_SHARE) for r in self.request_ids)


def sel(metric: str, **labels: str) -> str:
    """`metric{namespace="recserve-e2e", label="value", ...}`."""
    matchers = ", ".join(f'{k}="{v}"' for k, v in {"namespace": NAMESPACE, **labels}.items())
    return f"{metric}{{{matchers}}}"


def truth_queries(variant: str) -> dict[str, str]:
    """Counters whose growth the traffic determines, summed over replicas."""
    requests, latency = "ray_recserve_http_requests_total", "ray_recserve_http_latency_ms_count"
    accepted, rejected = "ray_recserve_events_accepted_total", "ray_recserve_events_rejected_total"
    stage = "ray_recserve_stage_latency_ms_count"
    return {
        "ok": sel(requests, route="recommendations", status="200"),
        "ok_timed": sel(latency, route="recommendations", status="200"),
        "invalid": sel(requests, route="recommendations", status="422"),
        "event_posts": sel(requests, route="events", status="202"),
        "served": sel("ray_recserve_recommendations_total", variant=variant),
        "impressions": sel("ray_recserve_impressions_total", variant=variant),
        "cold_start": sel("ray_recserve_fallbacks_total", variant=variant, reason="cold_start"),
        "clicks": sel("ray_recserve_clicks_total", variant=variant),
        "shadow_requests": sel("ray_recserve_shadow_requests_total", variant=variant),
        "click": sel(accepted, event_type="click"),
        "view": sel(accepted, event_type="view"),
        "purchase": sel(accepted, event_type="purchase"),
        "enum": sel(rejected, reason="enum"),
        "missing": sel(rejected, reason="missing"),
        "duplicates": sel("ray_recserve_events_duplicate_total"),
        "batches": sel("ray_recserve_stage_batch_size_count", stage="user_tower"),
        "batched_requests": sel("ray_recserve_stage_batched_requests_total", stage="user_tower"),
        "retrieved": sel("ray_recserve_candidates_retrieved_count", source="retrieval"),
        "reranked": sel(stage, stage="reranker"),
        "feature_reads": sel(stage, stage="feature_read"),
        # Ray writes bucket bounds as floats.
        "fresh_ages": sel("ray_recserve_feature_realtime_age_seconds_bucket", le="60.0"),
    }


# Batching may serve several requests with one batch (one feature read): 1 to one per request.
BATCHED = {"batches", "feature_reads"}


def expected_growth(t: Traffic) -> dict[str, float]:
    """How much each truth query must grow, from the responses alone (fresh_ages: at least)."""
    return {
        "ok": t.ok,
        "ok_timed": t.ok,
        "invalid": t.invalid,
        "event_posts": t.event_posts,
        "served": t.ok,
        "impressions": t.items,
        "cold_start": t.fallbacks["cold_start"],
        "clicks": t.new_clicks,
        "shadow_requests": t.mirrored,
        "click": t.accepted["click"],
        "view": t.accepted["view"],
        "purchase": t.accepted["purchase"],
        "enum": t.rejected["enum"],
        "missing": t.rejected["missing"],
        "duplicates": t.duplicates,
        # Every served request went through each stage once, and once more when mirrored.
        "batches": t.ok + t.mirrored,
        # What those batches carried, exactly, however they were grouped.
        "batched_requests": t.ok + t.mirrored,
        "retrieved": t.ok + t.mirrored,
        "reranked": t.ok + t.mirrored,
        # One feature read per batch: at most one per request, at least one.
        "feature_reads": t.ok + t.mirrored,
        "fresh_ages": t.fresh_user_requests,
    }


def read_all(prom: promkit.PrometheusServer, queries: Mapping[str, str]) -> dict[str, float]:
    return {name: prom.value(q) or 0.0 for name, q in queries.items()}


def settled(prom: promkit.PrometheusServer, queries: Mapping[str, str]) -> dict[str, float]:
    """Values once none has changed for SETTLE_SECONDS (earlier traffic fully exported)."""
    deadline = time.monotonic() + WAIT_SECONDS
    last, since = read_all(prom, queries), time.monotonic()
    while time.monotonic() - since < SETTLE_SECONDS:
        assert time.monotonic() < deadline, "metrics never settled"
        time.sleep(1.0)
        now = read_all(prom, queries)
        if now != last:
            last, since = now, time.monotonic()
    return last


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1.0)


def drive(api: httpx.Client, events: pd.DataFrame) -> Traffic:
    """Recommendations for known and unknown users, invalid requests, events with rejects and a retry."""
    t = Traffic()
    positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    known = sorted(positive["user_id"].unique())[:20]
    cold = [f"monitoring-cold-{i}" for i in range(4)]

    def recommend(user: str) -> None:
        response = api.post("/v1/recommendations", json={"user_id": user, "k": 10})
        assert response.status_code == 200, response.text
        body = response.json()
        t.ok += 1
        t.items += len(body["items"])
        t.request_ids.append(body["request_id"])
        t.variant, t.model_version = body["variant"], body["model_version"]
        if body["fallback"] is not None:
            t.fallbacks[body["fallback"]] += 1

    for user in [*known, *cold]:
        recommend(user)
    for bad in ({"user_id": "u", "k": 0}, {"user_id": "u", "k": "ten"}):
        assert api.post("/v1/recommendations", json=bad).status_code == 422
        t.invalid += 1

    fresh_user = f"monitoring-fresh-{int(time.time())}"
    item = str(events["item_id"].iloc[0])
    now = datetime.now(UTC).isoformat()
    batch = [
        {"user_id": fresh_user, "item_id": item, "event_type": kind, "timestamp": now}
        for kind in ("click", "click", "view", "view", "purchase")
    ]
    # Two clicks at the same instant on the same item are one event: the second is a retry.
    invalid = [
        {"user_id": fresh_user, "item_id": item, "event_type": "bogus"},
        {"user_id": fresh_user, "event_type": "click"},
    ]
    response = api.post("/v1/events", json={"events": [*batch, *invalid]})
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == len(batch)
    assert [r["index"] for r in response.json()["rejected"]] == [5, 6]
    t.event_posts += 1
    t.accepted.update(e["event_type"] for e in batch)
    t.new_clicks = len(
        {(e["item_id"], e["timestamp"]) for e in batch if e["event_type"] == "click"}
    )
    t.rejected.update({"enum": 1, "missing": 1})
    t.duplicates += 2  # the second click and the second view repeat the first ones
    for _ in range(3):
        recommend(fresh_user)  # real-time state written a moment ago: age under a minute
        t.fresh_user_requests += 1
    return t


@dataclass
class Live:
    prom: promkit.PrometheusServer
    traffic: Traffic
    before: dict[str, float]
    after: dict[str, float]
    exporter_out: Path
    materialized: dict[str, float]


def prometheus_config(ray_target: str, exporter_target: str) -> dict[str, Any]:
    """The laptop config with its targets pointed here, a 1 s scrape and the rules by path."""
    config: dict[str, Any] = copy.deepcopy(
        yaml.safe_load(promkit.LAPTOP_CONFIG.read_text(encoding="utf-8"))
    )
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(promkit.RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {"ray": ray_target, "recserve-exporter": exporter_target}
    config["scrape_configs"] = []
    for name, target in targets.items():
        job = jobs[name]
        job["static_configs"][0]["targets"] = [target]
        job["static_configs"][0]["labels"]["namespace"] = NAMESPACE
        config["scrape_configs"].append(job)
    return config


def materialized_until(serving_app: ServingApp) -> dict[str, float]:
    """End of the newest materialization per batch view, read from the Feast registry here."""
    from feature_repo.config import FeatureStoreConfig
    from feature_repo.store import build_store
    from feature_repo.views import BATCH_VIEWS

    store = build_store(FeatureStoreConfig(data_dir=serving_app.bundle.data_dir))
    out = {}
    for view in BATCH_VIEWS:
        end = store.get_feature_view(view.name).most_recent_end_time
        assert end is not None
        out[view.name] = end.timestamp()
    return out


@pytest.fixture(scope="module")
def live(serving_app: ServingApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    work = tmp_path_factory.mktemp("live-scrape")
    exporter_port = promkit.free_port()
    exporter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.exporter",
            "--redis-url",
            serving_app.redis.url,
            "--out",
            str(work / "events_log"),
            "--metrics-port",
            str(exporter_port),
            "--metrics-address",
            "127.0.0.1",
        ],
        cwd=promkit.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prom = promkit.PrometheusServer(
        prometheus_config(f"127.0.0.1:{node['MetricsExportPort']}", f"127.0.0.1:{exporter_port}"),
        work,
    )
    prom.start()
    try:
        wait_for(
            lambda: len(prom.query(f'up{{namespace="{NAMESPACE}"}} == 1')) == 2, "both targets up"
        )
        events = pd.read_parquet(serving_app.bundle.dataset_dir / "events.parquet")
        with httpx.Client(base_url=serving_app.url, timeout=10.0) as api:
            # The variant label is the graph's own: learn it from one answer before counting.
            probe = api.post("/v1/recommendations", json={"user_id": "monitoring-probe", "k": 1})
            assert probe.status_code == 200, probe.text
            queries = truth_queries(probe.json()["variant"])
            before = settled(prom, queries)
            traffic = drive(api, events)
        expected = expected_growth(traffic)

        last: dict[str, float] = {}

        def grown() -> bool:
            last.update(read_all(prom, queries))
            return all(last[k] - before[k] >= expected[k] for k in queries if k not in BATCHED)

        try:
            wait_for(grown, "the traffic to show in Prometheus")
        except AssertionError:
            short = {k: (last[k] - before[k], expected[k]) for k in queries}
            raise AssertionError(f"(growth, expected) never reached: {short}") from None
        after = settled(prom, queries)
        yield Live(
            prom, traffic, before, after, work / "events_log", materialized_until(serving_app)
        )
    finally:
        prom.stop()
        exporter.terminate()
        exporter.wait(timeout=15)


def test_counters_grew_by_exactly_the_traffic_sent(live: Live) -> None:
    expected = expected_growth(live.traffic)
    growth = {k: live.after[k] - live.before[k] for k in live.after}
    at_least = {"fresh_ages", *BATCHED}
    assert {k: v for k, v in growth.items() if k not in at_least} == {
        k: v for k, v in expected.items() if k not in at_least
    }
    assert growth["fresh_ages"] >= expected["fresh_ages"] > 0
    # Batching can put several requests in one batch (one feature read each), never fewer.
    assert 0 < growth["batches"] == growth["feature_reads"] <= expected["batches"]


def test_gauges_show_the_served_model_and_the_materialization_feast_recorded(live: Live) -> None:
    t, prom = live.traffic, live.prom
    info = prom.query(sel("ray_recserve_model_info") + " == 1")
    assert {(s["metric"]["variant"], s["metric"]["model_version"]) for s in info} == {
        (t.variant, t.model_version)
    }
    assert prom.value(sel("ray_recserve_model_ready", variant=t.variant)) == 1.0
    shown = {
        s["metric"]["feature_view"]: float(s["value"][1])
        for s in prom.query(
            f"max by (feature_view) ({sel('ray_recserve_feature_materialized_timestamp_seconds')})"
        )
    }
    assert shown == pytest.approx(live.materialized, abs=1e-3)


def test_the_exporter_and_the_stream_consumer_lag_are_visible(live: Live) -> None:
    prom = live.prom
    rows = sum(pq.read_metadata(p).num_rows for p in live.exporter_out.rglob("part-*.parquet"))
    assert rows > 0
    assert prom.value(sel("recserve_exporter_rows_written_total")) == rows
    lag = prom.query(sel("ray_recserve_event_consumer_lag_seconds"))
    assert {s["metric"]["group"] for s in lag} == {"exporter"}
    assert all(0 <= float(s["value"][1]) < 60 for s in lag)


def test_the_shadow_mirror_is_visible_and_agrees_with_itself(live: Live) -> None:
    """The session graph mirrors a quarter of its requests to the served version itself: no errors,
    and nearly every comparison agrees (above 0.9). Not all: a mirror runs after its response, so an
    event the test posts right after a recommendation may reach the user's state before it."""
    prom, variant = live.prom, live.traffic.variant
    tags = {"variant": variant}

    def mirrored() -> float | None:
        value = prom.value(sel("ray_recserve_shadow_requests_total", **tags))
        return value if value else None

    wait_for(mirrored, "shadow requests to be exported", timeout=WAIT_SECONDS)
    count = prom.value(sel("ray_recserve_shadow_overlap_count", **tags))
    assert count is not None and count > 0
    for histogram in ("ray_recserve_shadow_overlap_bucket", "ray_recserve_shadow_rbo_bucket"):
        low = prom.value(sel(histogram, le="0.9", **tags))
        assert low is not None and low <= 0.25 * count, (histogram, low, count)
    assert prom.value(sel("ray_recserve_shadow_errors_total", **tags)) == 0
    assert prom.value(sel("ray_recserve_shadow_latency_ms_count", **tags)) == count


def test_every_dashboard_panel_returns_series(live: Live) -> None:
    values = {"namespace": NAMESPACE, "variant": live.traffic.variant}
    pending = {
        (name, panel["title"], target["refId"]): promkit.substitute(target["expr"], values)
        for name, dashboard in promkit.dashboards().items()
        for panel, target in promkit.queries(dashboard)
    }
    assert any("Shadow" in title for _, title, _ in pending), "the shadow panels exist"

    def answered() -> bool:
        for key in list(pending):
            result = live.prom.query(pending[key])  # raises on a query Prometheus refuses
            if result:
                del pending[key]
        return not pending

    try:
        wait_for(answered, "every panel to return series", timeout=60)
    except AssertionError:
        raise AssertionError(f"panels without series: {sorted(pending)}") from None


def test_alert_rules_evaluate_on_the_live_series_without_errors(live: Live) -> None:
    names = {r["alert"] for r in promkit.alert_rules()}

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in live.prom.api("rules")["groups"] for r in g["rules"]]
        # Never evaluated: "0001-01-01T00:00:00Z"; RFC 3339 strings of one zone sort by time.
        done = all(r["lastEvaluation"] > "2000" for r in rules)
        return rules if done else None

    rules = wait_for(evaluated, "every rule to be evaluated", timeout=30)
    assert {r["name"] for r in rules} == names
    assert {r["name"]: r["health"] for r in rules} == dict.fromkeys(names, "ok")


def test_template_variables_list_this_namespace_and_variant(live: Live) -> None:
    for dashboard in promkit.dashboards().values():
        variables = promkit.variables(dashboard)
        for key, expected in (("namespace", NAMESPACE), ("variant", live.traffic.variant)):
            query = variables[key]["query"]["query"]
            metric_and_matchers = query[len("label_values(") : query.rindex(",")]
            selector = promkit.substitute(metric_and_matchers, {"namespace": NAMESPACE})
            values = live.prom.api(f"label/{key}/values", **{"match[]": selector})
            assert expected in values, (query, values)
