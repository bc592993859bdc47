"""Dashboard lint: monitoring/grafana/*.json are Grafana dashboards whose every panel is complete (unique id,
title, unit, the datasource variable) and whose queries parse, select exported metrics only, keep to the
selected namespace and filter by variant only where the metric has that label."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.metrics import CATALOG
from tests.monitoring import promkit
from training.job_metrics import JOB_CATALOG

DASHBOARDS = promkit.dashboards()
# Metrics Ray and Serve export themselves (the live test proves they exist).
RAY_BUILTIN = {"ray_serve_deployment_replica_healthy"}
SPECS = {name: spec for spec in (*CATALOG, *JOB_CATALOG) for name in spec.series}
EXPORTED = set(SPECS) | RAY_BUILTIN
REQUIRED_TITLES = {
    "serving.json": "recserve / Serving overview",
    "models.json": "recserve / Models and experiments",
    "features.json": "recserve / Features and events",
}
EXAMPLE_VALUES = {"datasource": "prometheus", "namespace": "prod", "variant": "control"}


def all_queries() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(name, p, t) for name, d in DASHBOARDS.items() for p, t in promkit.queries(d)]


def test_the_three_dashboards_exist_with_unique_uids() -> None:
    assert {n: d["title"] for n, d in DASHBOARDS.items()} == REQUIRED_TITLES
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_each_dashboard_has_datasource_namespace_and_variant_variables(name: str) -> None:
    variables = promkit.variables(DASHBOARDS[name])
    assert {"datasource", "namespace", "variant"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for key in ("namespace", "variant"):
        variable = variables[key]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == promkit.DATASOURCE_UID
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", query)
        assert match is not None, query
        metric, _, label = match.groups()
        assert label == key
        assert key in SPECS[metric].tag_keys or key == "namespace"
    assert variables["variant"]["includeAll"] and variables["variant"]["allValue"] == ".*"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_have_unique_ids_title_unit_and_the_datasource_variable(name: str) -> None:
    panels = promkit.panels(DASHBOARDS[name])
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        where = f"{name} panel {panel['id']}"
        assert panel["title"].strip(), where
        assert panel["fieldConfig"]["defaults"]["unit"].strip(), where
        assert panel["datasource"] == {"type": "prometheus", "uid": promkit.DATASOURCE_UID}, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
            assert target["expr"].strip(), where


def test_panels_do_not_overlap_on_the_grid() -> None:
    for name, dashboard in DASHBOARDS.items():
        cells: set[tuple[int, int]] = set()
        for panel in promkit.panels(dashboard):
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, name
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not cells & mine, f"{name} panel {panel['id']} overlaps another"
            cells |= mine


def test_every_panel_query_parses(tmp_path: Path) -> None:
    # promtool has no expression checker; a recording rule per query gets the real parser.
    rules = [
        {"record": f"lint:q{i}", "expr": promkit.substitute(t["expr"], EXAMPLE_VALUES)}
        for i, (_, _, t) in enumerate(all_queries())
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "lint", "rules": rules}]}))
    result = promkit.promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "panel", "target"),
    all_queries(),
    ids=[f"{n}:{p['title']}" for n, p, _ in all_queries()],
)
def test_queries_select_exported_metrics_in_the_selected_namespace(
    name: str, panel: dict[str, Any], target: dict[str, Any]
) -> None:
    expr = target["expr"]
    names = promkit.metric_names(expr)
    assert names and names <= EXPORTED, names - EXPORTED
    found = promkit.selectors(expr)
    assert {metric for metric, _ in found} == names, "every selector has label matchers"
    for metric, matchers in found:
        assert 'namespace=~"$namespace"' in matchers, f"{metric} ignores the namespace variable"
        if "$variant" in matchers:
            assert "variant" in SPECS[metric].tag_keys, f"{metric} has no variant label"


def test_every_panel_uses_the_variant_filter_where_its_metric_has_a_variant() -> None:
    for _, panel, target in all_queries():
        for metric, matchers in promkit.selectors(target["expr"]):
            spec = SPECS.get(metric)
            # Denominators of a share over all variants are the one exception (traffic split).
            if spec is not None and "variant" in spec.tag_keys and "scalar(" not in target["expr"]:
                assert 'variant=~"$variant"' in matchers, f"{panel['title']}: {metric}"


def test_metric_names_finds_the_selected_metrics_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route="x{y}", le!="1"}[5m])))'
        " / ignoring(route) group_left() scalar(b_total offset 5m) or vector(0) > bool 1e3"
    )
    assert promkit.metric_names(expr) == {"a_bucket", "b_total"}
    assert promkit.substitute('x{n=~"$namespace"}[$__rate_interval]', {"namespace": "p"}) == (
        'x{n=~"p"}[1m]'
    )


def test_the_laptop_config_passes_promtool_and_loads_the_rules() -> None:
    result = promkit.promtool("check", "config", str(promkit.LAPTOP_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(promkit.LAPTOP_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["rules.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"ray", "recserve-exporter", "pushgateway"} <= set(jobs)
    for job in jobs.values():
        for static in job["static_configs"]:
            assert static["labels"]["namespace"] == "local"
