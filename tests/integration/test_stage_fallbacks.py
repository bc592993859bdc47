"""A stage's only replica killed (`kill -9` of the real Ray process): requests keep getting 200, answered
around the missing stage and flagged `degraded`, until Serve has restarted it and answers are whole.

Runs on the session graph (`serving_app`); each test waits for the graph to be whole again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
import pandas as pd
import psutil
import pytest

from serve_app.schemas import POSITIVE_EVENT_TYPES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import ServingApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_SECONDS = 90.0


@pytest.fixture(scope="module")
def api(serving_app: ServingApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serving_app.url, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def heavy_user(serving_app: ServingApp) -> tuple[str, set[str]]:
    events = pd.read_parquet(serving_app.bundle.dataset_dir / "events.parquet")
    positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    counts = positive.groupby("user_id")["item_id"].nunique()
    user = str(sorted(counts[counts >= 10].index)[0])
    return user, set(positive[positive["user_id"] == user]["item_id"])


def replica_processes(deployment: str) -> list[psutil.Process]:
    """The live processes of `deployment`'s replicas (the session app is named recserve), among
    this process's descendants: the session's Ray was started here (another Ray on the machine
    may run an app of the same name)."""
    title = f"ray::ServeReplica:recserve:{deployment}"
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmdline and cmdline[0].startswith(title) and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def recommend(api: httpx.Client, user: str) -> dict[str, Any]:
    response = api.post("/v1/recommendations", json={"user_id": user, "k": 10})
    assert response.status_code == 200, response.text  # never a 5xx while a stage is down
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("deployment", ["Ranker", "ReRanker", "UserTower", "Retriever"])
def test_a_killed_stage_replica_is_answered_around_flagged_degraded(
    deployment: str, api: httpx.Client, heavy_user: tuple[str, set[str]]
) -> None:
    user, seen = heavy_user
    assert recommend(api, user)["fallback"] is None  # whole before the fault
    replicas = replica_processes(deployment)
    assert len(replicas) == 1, replicas
    replicas[0].kill()
    replicas[0].wait(timeout=10)
    degraded = 0
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        body = recommend(api, user)
        ids = [item["item_id"] for item in body["items"]]
        assert len(ids) == 10 and len(set(ids)) == 10
        if deployment != "UserTower":  # a cold answer cannot know what the user has seen
            assert not set(ids) & seen
        if body["fallback"] is None:
            break  # Serve restarted the replica: whole again
        assert body["fallback"] == "degraded"
        degraded += 1
        assert time.monotonic() < deadline, f"{deployment} not back in {RECOVERY_SECONDS:.0f}s"
    assert degraded > 0, "the first answer after the kill came from the dead stage"
