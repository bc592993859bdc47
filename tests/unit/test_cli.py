"""Every command of the `recserve` CLI answers --help; bad flags fail with a usage message."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    [],
    ["generate"],
    ["train"],
    ["demo"],
    ["features"],
    ["promote"],
    ["rollback"],
    ["pin-manifest"],
    ["simulate"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "recserve")
def test_help(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", *command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage: recserve" in out.stdout


def test_unknown_dataset_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "train", "--dataset", "nope"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "invalid choice: 'nope'" in out.stderr
