"""`recserve train` from the command line: tiny data, a registered bundle, a printed metrics table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_train_tiny_prints_table_registers_and_promotes(tmp_path: Path) -> None:
    env = {**os.environ, "RECSERVE_RANKER__CANDIDATES": "50"}
    out = subprocess.run(
        [
            *(sys.executable, "-m", "training", "train", "--size", "tiny", "--epochs", "2"),
            *("--data-dir", str(tmp_path), "--promote", "--budget", "0"),
            *("--set", "cold_start.min_events=3"),
            *("--phases-json", str(tmp_path / "phases.json")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for system in ("popularity", "item-kNN", "EASE", "retrieval", "recserve"):
        assert system in out.stdout
    assert "no settings search (budget 0)" in out.stdout
    assert "registered recserve version 1 (alias challenger)" in out.stdout
    assert "promoted v1" in out.stdout
    assert (tmp_path / "mlflow.db").exists()
    # The env override and the --set flag reached the pipeline, as pinned settings.
    manifests = list(tmp_path.glob("runs/*/bundle/manifest.json"))
    assert len(manifests) == 1
    params = json.loads(manifests[0].read_text())["params"]
    assert params["ranker.candidates"] == 50 and params["cold_start.min_events"] == 3
    assert {"ranker.candidates", "cold_start.min_events"} <= set(params["search.pinned"])
    # The phases file (bench/scale.py reads it): every phase timed, the peak RSS a high-water mark
    # (never lower than at the phase before), the bundle and the version just registered.
    phases = json.loads((tmp_path / "phases.json").read_text())
    names = list(phases["phases"])
    assert names[0] == "data" and {"search", "test round", "refit", "bundle"} <= set(names)
    peaks = [p["peak_rss_mb"] for p in phases["phases"].values()]
    assert all(p["seconds"] >= 0 for p in phases["phases"].values())
    assert peaks == sorted(peaks) and peaks[0] > 50  # MiB: an interpreter with torch loaded
    assert phases["peak_rss_mb"] == peaks[-1]
    assert phases["bundle_dir"] == str(manifests[0].parent)
    assert phases["registered_version"] == "1" and phases["promoted"] is True
    assert f"recserve: ndcg@10 {phases['metrics']['recserve']['ndcg@10']:.4f}" in out.stdout
