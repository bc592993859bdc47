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
