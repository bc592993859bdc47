"""monitoring/prometheus/rules.yml: valid for promtool, a passing unit test per alert (one that fails when
the alert is broken), runbook text, and only metrics the system exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from serve_app.metrics import CATALOG
from tests.monitoring import promkit
from training.job_metrics import JOB_CATALOG

EXPORTED = {name for spec in CATALOG for name in spec.series} | {
    name for spec in JOB_CATALOG for name in spec.series
}
ALERTS = [rule["alert"] for rule in promkit.alert_rules()]
# What the issue asks an alert for, each with the rule that covers it.
REQUIRED = {
    "high p99": "RecserveHighLatencyP99",
    "error ratio": "RecserveHighErrorRatio",
    "fallback ratio": "RecserveHighFallbackRatio",
    "stale features": "RecserveStaleFeatures",
    "event lag": "RecserveEventLag",
    "shadow divergence": "RecserveShadowDivergence",
    "no ready model": "RecserveNoReadyModel",
    "stage failures answered around": "RecserveStageFailing",
    "events spooled (Redis down)": "RecserveEventSpoolNotEmpty",
    "event spool near its bound": "RecserveEventSpoolNearlyFull",
    "exporter dead letters (issue 29)": "RecserveExporterDeadLetters",
    "exporter lag (issue 29)": "RecserveExporterLag",
    "exporter backlog near the stream cap": "RecserveExporterBacklogNearCap",
}


def test_promtool_checks_the_rules_file() -> None:
    result = promkit.promtool("check", "rules", str(promkit.RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_required_alert_exists_once() -> None:
    assert len(ALERTS) == len(set(ALERTS))
    assert set(REQUIRED.values()) <= set(ALERTS)


def test_promtool_unit_tests_pass() -> None:
    result = promkit.promtool("test", "rules", str(promkit.RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    document = yaml.safe_load(promkit.RULES_TEST.read_text(encoding="utf-8"))
    assert document["rule_files"] == ["rules.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(ALERTS)
    assert quiet == set(ALERTS)


@pytest.mark.parametrize("alert", ALERTS)
def test_the_unit_tests_fail_when_the_alert_never_fires(alert: str, tmp_path: Path) -> None:
    document = yaml.safe_load(promkit.RULES.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(0) > 1"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(document))
    shutil.copy(promkit.RULES_TEST, tmp_path / "rules_test.yml")
    result = promkit.promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


@pytest.mark.parametrize("rule", promkit.alert_rules(), ids=ALERTS)
def test_every_alert_carries_severity_summary_dashboard_and_runbook(rule: dict[str, str]) -> None:
    labels, annotations = rule["labels"], rule["annotations"]
    assert labels["severity"] in {"page", "warning"}
    assert annotations["summary"].strip()
    uids = {d["uid"] for d in promkit.dashboards().values()}
    assert annotations["dashboard"] in uids
    steps = [line for line in annotations["runbook"].splitlines() if line[:2].rstrip(".").isdigit()]
    assert len(steps) >= 2, "a runbook is numbered steps"


@pytest.mark.parametrize("rule", promkit.alert_rules(), ids=ALERTS)
def test_alert_expressions_use_only_exported_metrics_and_keep_the_namespace(
    rule: dict[str, str],
) -> None:
    names = promkit.metric_names(rule["expr"])
    assert names and names <= EXPORTED, names - EXPORTED
    # Every aggregation keeps `namespace`: one alert per installation, and the summary names it.
    assert "{{ $labels.namespace }}" in rule["annotations"]["summary"]
    for clause in _by_clauses(rule["expr"]):
        assert "namespace" in clause


def _by_clauses(expr: str) -> list[str]:
    import re

    return re.findall(r"\bby\s*\(([^)]*)\)", expr)
