"""checkov over everything we ship for Kubernetes: the chart's three profiles and an all-features
rendering, the k8s/ overlays and the Dockerfile. Skipped checks live in helm/recserve/.checkov.yaml,
each with its reason; a deliberately bad sample in the same run proves the checks are live."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helm import chart

CONFIG = chart.CHART / ".checkov.yaml"


def checkov() -> Path:
    path = chart.tool("checkov")
    if path is None:
        pytest.fail("checkov is not installed: bash scripts/install-k8s-tools.sh")
    return path


def test_every_skipped_check_is_justified_in_a_comment() -> None:
    lines = CONFIG.read_text().splitlines()
    skipped = [i for i, line in enumerate(lines) if re.match(r"^\s+- CKV", line)]
    assert skipped, "no skip-check entries"
    for i in skipped:
        check = lines[i].split("-", 1)[1].strip()
        j = i - 1
        comment: list[str] = []
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip())
            j -= 1
        assert comment and comment[0].startswith(f"# {check} "), f"{check} has no reason above it"
        assert len(" ".join(comment)) > 120, f"{check}: the reason is too thin"


@pytest.fixture(scope="module")
def scan(helm: Path, kubectl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run (it takes seconds to start) over every target; results by framework."""
    root = tmp_path_factory.mktemp("checkov")
    good, bad = root / "good", root / "bad"
    good.mkdir()
    bad.mkdir()
    for profile in chart.PROFILES:
        (good / f"chart-{profile}.yaml").write_text(
            chart.render_text([chart.CHART / "ci" / f"{profile}-values.yaml"])
        )
    (good / "chart-full.yaml").write_text(
        chart.render_text(
            set_json={"redis.auth.existingSecret": "redis-auth", "ingress.enabled": True}
        )
    )
    for overlay in ("dev", "prod"):
        built = subprocess.run(
            [str(kubectl), "kustomize", str(chart.REPO / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        )
        (good / f"k8s-{overlay}.yaml").write_text(built.stdout)
    (good / "Dockerfile").write_text((chart.REPO / "Dockerfile").read_text())
    # The bad sample: a writable root filesystem, and an image that ends as root.
    writable = dict(
        chart.profile_values("default")["securityContext"], readOnlyRootFilesystem=False
    )
    (bad / "chart-writable-root.yaml").write_text(
        chart.render_text(set_json={"securityContext": writable})
    )
    (bad / "Dockerfile").write_text((chart.REPO / "Dockerfile").read_text() + "USER root\n")
    proc = subprocess.run(
        [
            str(checkov()),
            "--config-file",
            str(CONFIG),
            "-d",
            str(root),
            "--framework",
            "kubernetes",
            "dockerfile",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        # No network here: no guideline download, no platform calls.
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_NO_OUTPUT_COLOR": "1"},
        timeout=300,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r for r in reports}


def failures(report: dict[str, Any], directory: str) -> list[tuple[str, str, str]]:
    return [
        (c["check_id"], c["resource"], c["file_path"])
        for c in report["results"]["failed_checks"]
        if f"/{directory}/" in c["file_path"]
    ]


@pytest.mark.slow
def test_checkov_passes_on_chart_overlays_and_dockerfile(scan: dict[str, Any]) -> None:
    assert set(scan) == {"kubernetes", "dockerfile"}
    for framework, report in scan.items():
        assert report["summary"]["parsing_errors"] == 0, framework
        assert failures(report, "good") == [], framework
    # Every file was read: a silently skipped file would pass vacuously.
    scanned = {
        Path(c["file_path"]).name for r in scan.values() for c in r["results"]["passed_checks"]
    }
    assert {f"chart-{p}.yaml" for p in chart.PROFILES} | {
        "chart-full.yaml",
        "k8s-dev.yaml",
        "k8s-prod.yaml",
        "Dockerfile",
    } <= scanned


@pytest.mark.slow
def test_checkov_flags_the_bad_sample(scan: dict[str, Any]) -> None:
    k8s = {check for check, _, _ in failures(scan["kubernetes"], "bad")}
    docker = {check for check, _, _ in failures(scan["dockerfile"], "bad")}
    assert "CKV_K8S_22" in k8s  # readOnlyRootFilesystem
    assert "CKV_DOCKER_8" in docker  # last USER is root
