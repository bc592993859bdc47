"""`recserve train` from the command line: tiny data, a registered bundle, a printed metrics table."""

from __future__ import annotations

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
            *("--data-dir", str(tmp_path), "--promote"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for system in ("popularity", "EASE", "retrieval", "retrieval+ranker"):
        assert system in out.stdout
    assert "registered recserve version 1 (alias challenger)" in out.stdout
    assert "promoted v1" in out.stdout
    assert (tmp_path / "mlflow.db").exists()
    # The env override reached the pipeline: the manifest records 50 ranker candidates.
    manifests = list(tmp_path.glob("runs/*/bundle/manifest.json"))
    assert len(manifests) == 1 and '"ranker.candidates": 50' in manifests[0].read_text()
