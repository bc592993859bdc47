"""templates/monitoring.yaml, prometheusrule.yaml, grafana-dashboards-configmap.yaml: scrape targets of
the Ray pods, and the rules and dashboards built from monitoring/ through the chart's copies.

Mechanism: Helm cannot read outside the chart, so scripts/sync-chart-files.sh copies
monitoring/prometheus/rules.yml and monitoring/grafana/*.json to helm/recserve/files/; these tests fail
while a copy differs from its source, and prove the rendered objects carry the sources unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helm import chart

MONITORING = chart.REPO / "monitoring"
FILES = chart.CHART / "files"
# (source, copy) globs relative to monitoring/ and files/.
SYNCED = ("prometheus/rules.yml", "grafana/*.json")


def synced_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for pattern in SYNCED for p in root.glob(pattern)
    }


def test_chart_copies_are_identical_to_the_monitoring_sources() -> None:
    sources, copies = synced_files(MONITORING), synced_files(FILES)
    missing = sorted(set(sources) - set(copies))
    stale = sorted(set(copies) - set(sources))
    differ = sorted(n for n in set(sources) & set(copies) if sources[n] != copies[n])
    assert (missing, stale, differ) == ([], [], []), (
        "helm/recserve/files/ is out of sync with monitoring/: run bash scripts/sync-chart-files.sh"
    )


def test_rendered_rules_and_dashboards_carry_the_monitoring_sources(helm: Path) -> None:
    sources = synced_files(MONITORING)
    rules = "prometheus/rules.yml" in sources
    docs = chart.render(
        set_json={"monitoring.prometheusRule.enabled": rules, "monitoring.dashboards.enabled": True}
    )
    dashboards = {Path(n).name: b for n, b in sources.items() if n.startswith("grafana/")}
    configmaps = [d for d in chart.of_kind(docs, "ConfigMap") if "grafana" in d["metadata"]["name"]]
    if dashboards:
        (configmap,) = configmaps
        assert {k: v.encode() for k, v in configmap["data"].items()} == dashboards
    else:
        assert configmaps == []
    if rules:
        rule = chart.one(docs, "PrometheusRule")
        assert rule["spec"] == yaml.safe_load(sources["prometheus/rules.yml"])
    else:
        assert chart.of_kind(docs, "PrometheusRule") == []


# --- the mechanism, end to end on a scratch copy of the repo ----------------------------------------

RULES = """\
groups:
  - name: recserve
    rules:
      - alert: RecserveHighLatency
        # p99 over 5 minutes, per deployment
        expr: |
          histogram_quantile(0.99, sum by (deployment, le) (
            rate(ray_serve_deployment_processing_latency_ms_bucket[5m]))) > 50
        for: 10m
        labels:
          severity: page
        annotations:
          summary: "p99 {{ $value }} ms on {{ $labels.deployment }}"
"""
DASHBOARD = json.dumps(
    {
        "title": "recserve — serving",
        "panels": [{"type": "timeseries", "targets": [{"expr": 'sum(rate(x{a="b"}[1m]))'}]}],
    },
    ensure_ascii=False,
    indent=2,
)


@pytest.fixture
def scratch_repo(helm: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(chart.CHART, repo / "helm" / "recserve", ignore=shutil.ignore_patterns("files"))
    (repo / "scripts").mkdir()
    shutil.copy(chart.REPO / "scripts" / "sync-chart-files.sh", repo / "scripts")
    (repo / "k8s" / "base").mkdir(parents=True)
    shutil.copy(chart.REPO / "k8s" / "base" / "values.yaml", repo / "k8s" / "base")
    (repo / "monitoring" / "prometheus").mkdir(parents=True)
    (repo / "monitoring" / "grafana").mkdir(parents=True)
    (repo / "monitoring" / "prometheus" / "rules.yml").write_text(RULES)
    (repo / "monitoring" / "grafana" / "serving.json").write_text(DASHBOARD + "\n")
    # A copy whose source is gone: the sync must remove it.
    stale = repo / "helm" / "recserve" / "files" / "grafana"
    stale.mkdir(parents=True)
    (stale / "old.json").write_text("{}")
    return repo


def sync(repo: Path, helm: Path) -> None:
    subprocess.run(
        ["bash", "scripts/sync-chart-files.sh"],
        cwd=repo,
        env={**os.environ, "HELM": str(helm)},
        check=True,
        capture_output=True,
    )


def test_sync_script_copies_sources_and_the_chart_renders_them_unchanged(
    helm: Path, scratch_repo: Path
) -> None:
    sync(scratch_repo, helm)
    files = scratch_repo / "helm" / "recserve" / "files"
    assert synced_files(files) == synced_files(scratch_repo / "monitoring")
    assert not (files / "grafana" / "old.json").exists()
    assert (scratch_repo / "k8s" / "base" / "recserve.yaml").read_text().startswith("---")
    docs = chart.render(
        set_json={"monitoring.prometheusRule.enabled": True},
        chart=scratch_repo / "helm" / "recserve",
    )
    configmap = chart.one(docs, "ConfigMap", "recserve-grafana-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"serving.json": DASHBOARD + "\n"}
    rule = chart.one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES)
    assert "$labels.deployment" in rule["spec"]["groups"][0]["rules"][0]["annotations"]["summary"]
    chart.validate_object(rule)


def test_prometheus_rule_without_the_rules_file_is_refused_with_a_reason(
    helm: Path, scratch_repo: Path
) -> None:
    with pytest.raises(chart.HelmError, match=r"run scripts/sync-chart-files\.sh"):
        chart.render(
            set_json={"monitoring.prometheusRule.enabled": True},
            chart=scratch_repo / "helm" / "recserve",
        )


# --- scrape targets ---------------------------------------------------------------------------------


def test_pod_monitor_scrapes_the_workers_metrics_port(helm: Path) -> None:
    docs = chart.render_profile("production")
    monitor = chart.one(docs, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = {
        w for w, _, labels in chart.pod_templates(docs) if selector.items() <= labels.items()
    }
    assert scraped == {"ray-worker/frontend", "ray-worker/models"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    for where, spec, _ in chart.pod_templates(docs):
        if where in scraped:
            assert {"name": "metrics", "containerPort": 8080} in spec["containers"][0]["ports"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_scrapes_the_heads_metrics_ports_through_its_service(helm: Path) -> None:
    docs = chart.render_profile("production")
    service = chart.one(docs, "Service", "recserve-ray-head-metrics")
    monitor = chart.one(docs, "ServiceMonitor")
    scraped = {
        w
        for w, _, labels in chart.pod_templates(docs)
        if service["spec"]["selector"].items() <= labels.items()
    }
    assert scraped == {"ray-head"}
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"metrics": 8080, "as-metrics": 44217, "dash-metrics": 44227}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == list(ports)


def test_monitoring_operator_objects_are_off_by_default(helm: Path) -> None:
    kinds = {d["kind"] for d in chart.render_profile("default")}
    assert not kinds & {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
