"""A/B split and shadow mirror on the real graph: sticky variants, attribution, shadow failure injection.

A second application (`/ab`) runs beside the session's graph on the same Ray Serve instance, Redis and
registry, with three variants — control on `champion` (the trained version), treatment on a fixed second
version (the same bundle registered again, so both arms must give identical lists), and ghost on an
alias that does not exist (its users are answered by control, flagged model_missing) — and every
request mirrored to the alias `shadow`. The shadow alias first points at a bundle the stages refuse (a foreign
contract: every mirror fails), then at the good second version (every mirror compares equal).
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from contextlib import redirect_stdout
from typing import TYPE_CHECKING, Any

import httpx
import pandas as pd
import pytest
from mlflow import MlflowClient

from serve_app.experiments import ExperimentLog, assign_variant
from serve_app.redis_client import connect_redis
from tests.bundle_factory import make_tiny_bundle
from training.registry import register_bundle

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.conftest import ServingApp

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP, PREFIX, EXPERIMENT, SALT = "recserve-ab", "/ab", "e2e", "e2e-salt"
WEIGHTS = (("control", 0.4), ("treatment", 0.4), ("ghost", 0.2))
MODELS = ("champion", None, "no-such-alias")  # None: the treatment version, fixed by number


class AB:
    def __init__(self, serving_app: ServingApp, treatment: str, broken: str) -> None:
        self.serving = serving_app
        self.url = serving_app.url + PREFIX
        self.treatment_version = treatment
        self.broken_version = broken
        self.log = ExperimentLog(
            connect_redis(serving_app.redis.url, 1.0), "recserve:exp", EXPERIMENT, 1800.0
        )
        events = pd.read_parquet(serving_app.bundle.dataset_dir / "events.parquet")
        self.users = sorted(events["user_id"].unique().tolist())[:60]


@pytest.fixture(scope="module")
def ab(serving_app: ServingApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AB]:
    from ray import serve

    from serve_app.cli import deploy, wait_ready
    from serve_app.config import serve_config

    bundle = serving_app.bundle
    client = MlflowClient(tracking_uri=bundle.tracking_uri, registry_uri=bundle.tracking_uri)
    treatment = register_bundle(bundle.bundle_dir, tracking_uri=bundle.tracking_uri).version
    tiny = tmp_path_factory.mktemp("foreign") / "tiny"
    make_tiny_bundle(tiny)
    broken = register_bundle(tiny, tracking_uri=bundle.tracking_uri).version
    client.set_registered_model_alias("recserve", "shadow", broken)
    client.set_registered_model_alias("recserve", "challenger", treatment)

    config = serve_config({})
    for deployment in config["applications"][0]["deployments"]:
        # Beside the session's graph on 2 CPUs: a small CPU share and one replica each.
        deployment["ray_actor_options"]["num_cpus"] = 0.01
        deployment["autoscaling_config"]["max_replicas"] = 1
    settings = {
        "feature_store": {"data_dir": str(bundle.data_dir), "profile": "embedded"},
        "redis_url": serving_app.redis.url,
        "models": {"tracking_uri": bundle.tracking_uri, "poll_interval_seconds": 1.0},
        "experiment": {
            "name": EXPERIMENT,
            "salt": SALT,
            "variants": [
                {"name": name, "model": model or treatment, "weight": weight}
                for (name, weight), model in zip(WEIGHTS, MODELS, strict=True)
            ],
            "shadow": {
                "model": "shadow",
                "share": 1.0,
                "timeout_seconds": 10.0,
                "max_in_flight": 64,  # every request is mirrored and logged: none skipped
            },
        },
    }
    deploy(settings, config, name=APP, route_prefix=PREFIX)
    try:
        wait_ready(serving_app.url + PREFIX, 300)
        # Ready means one arm serves; wait for the treatment arm too (ghost never loads).
        assert wait_for(
            lambda: (
                httpx.get(f"{serving_app.url}{PREFIX}/readyz").json()["variants"]["treatment"]
                == treatment
            ),
            120,
        )
        yield AB(serving_app, treatment, broken)
    finally:
        serve.delete(APP)
        client.delete_registered_model_alias("recserve", "shadow")


def recommend(url: str, user: str, k: int = 10) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/recommendations", json={"user_id": user, "k": k}, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def items(body: dict[str, Any]) -> list[tuple[str, float, int, str]]:
    return [(i["item_id"], i["score"], i["rank"], i["source"]) for i in body["items"]]


def wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_each_user_always_sees_one_variant_and_its_version(ab: AB) -> None:
    seen: dict[str, set[tuple[str, str, str | None]]] = defaultdict(set)
    for _ in range(3):
        for user in ab.users:
            body = recommend(ab.url, user)
            seen[user].add((body["variant"], body["model_version"], body["fallback"]))
    versions = {"control": ab.serving.bundle.version, "treatment": ab.treatment_version}
    assigned = {user: assign_variant(SALT, user, WEIGHTS) for user in ab.users}
    assert set(assigned.values()) == {"control", "treatment", "ghost"}
    for user, answers in seen.items():
        assert len(answers) == 1, (user, answers)
        ((variant, version, fallback),) = answers
        if assigned[user] == "ghost":  # no version: the first variant answers, and says so
            assert (variant, version, fallback) == ("control", versions["control"], "model_missing")
        else:
            assert variant == assigned[user]
            assert version == versions[variant]
            assert fallback != "model_missing"
    state = httpx.get(f"{ab.url}/readyz").json()
    assert state["ready"] is True
    assert state["variants"] == {**versions, "ghost": None}
    assert ab.broken_version in state["refused"] and state["shadow_version"] is None
    assert "no-such-alias" in state["error"]


def test_a_failing_shadow_never_changes_a_response(ab: AB) -> None:
    before = len(ab.log.shadow_log())
    for user in ab.users[:30]:
        mirrored = recommend(ab.url, user)
        plain = recommend(ab.serving.url, user)  # the session graph: no shadow
        assert items(mirrored) == items(plain), user
        if mirrored["fallback"] != "model_missing":  # ghost users: see the test above
            assert mirrored["fallback"] == plain["fallback"]
    assert wait_for(lambda: len(ab.log.shadow_log()) >= before + 30, 30)
    failed = ab.log.shadow_log()[before:]
    assert {c.error for c in failed} == {"unavailable"}
    assert all(c.jaccard is None for c in failed)


def test_events_are_attributed_to_the_variant_that_served_them(ab: AB) -> None:
    def counts() -> dict[str, dict[str, Any]]:
        report = httpx.get(f"{ab.url}/v1/experiments").json()
        return {v["name"]: v["counts"] for v in report["variants"]}

    before = counts()
    served = {user: recommend(ab.url, user) for user in ab.users[:20]}
    time.sleep(0.5)  # the router writes its attribution records every 50 ms
    now = pd.Timestamp.now(tz="UTC").isoformat()
    events: list[dict[str, Any]] = []
    expected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for n, (user, body) in enumerate(served.items()):
        first = body["items"][0]["item_id"]
        if n % 2 == 0:  # a click naming the request
            events.append(
                {
                    "user_id": user,
                    "item_id": first,
                    "event_type": "click",
                    "timestamp": now,
                    "request_id": body["request_id"],
                }
            )
            expected[body["variant"]]["clicks"] += 1
            expected[body["variant"]]["clicked_requests"] += 1
        if n % 3 == 0:  # a purchase without a request id: the user's latest request
            events.append(
                {"user_id": user, "item_id": first, "event_type": "purchase", "timestamp": now}
            )
            expected[body["variant"]]["purchases"] += 1
        expected[body["variant"]]["impressions"] += 1
    response = httpx.post(f"{ab.url}/v1/events", json={"events": events}, timeout=10)
    assert response.status_code == 202 and response.json()["accepted"] == len(events)
    # A retry of the same batch is recognised and credits nothing twice.
    httpx.post(f"{ab.url}/v1/events", json={"events": events}, timeout=10)
    after = counts()
    for variant in ("control", "treatment", "ghost"):
        for key in ("impressions", "clicks", "clicked_requests", "purchases"):
            got = after[variant][key] - before[variant][key]
            assert got == expected[variant][key], (variant, key, got)
    report = httpx.get(f"{ab.url}/v1/experiments").json()
    comparisons = {c["treatment"]: c for c in report["comparisons"]}
    assert set(comparisons) == {"treatment", "ghost"}
    comparison = comparisons["treatment"]
    assert comparison["control"] == "control"
    assert after["ghost"]["impressions"] == before["ghost"]["impressions"]  # served as control
    low, high = comparison["ctr_difference_ci95"]
    assert low <= comparison["ctr_difference"] <= high


def test_a_working_shadow_is_compared_and_reported(ab: AB, tmp_path: Path) -> None:
    client = MlflowClient(
        tracking_uri=ab.serving.bundle.tracking_uri, registry_uri=ab.serving.bundle.tracking_uri
    )
    client.set_registered_model_alias("recserve", "shadow", ab.treatment_version)
    assert wait_for(
        lambda: httpx.get(f"{ab.url}/readyz").json()["shadow_version"] == ab.treatment_version,
        60,
    )
    before = len(ab.log.shadow_log())
    for user in ab.users[:20]:
        recommend(ab.url, user)
    assert wait_for(lambda: len(ab.log.shadow_log()) >= before + 20, 30)
    compared = [c for c in ab.log.shadow_log()[before:] if c.shadow_version]
    assert len(compared) >= 20
    assert all(c.error is None and c.jaccard is not None and c.rbo is not None for c in compared)
    # Treatment users are served the shadow's own version: identical lists. (Control users' lists
    # may differ: their real-time delta embedding lives in the control version's item space.)
    same = [c for c in compared if c.served_version == c.shadow_version]
    assert same and all(c.jaccard == 1.0 and c.rbo == 1.0 for c in same)
    assert {c.variant for c in same} == {"treatment"}
    assert all(c.shadow_ms is not None and c.shadow_ms > 0 for c in compared)

    from serve_app.cli import main

    out = io.StringIO()
    report = tmp_path / "shadow.json"
    with redirect_stdout(out):
        code = main(
            [
                "shadow-report",
                "--redis-url",
                ab.serving.redis.url,
                "--experiment",
                EXPERIMENT,
                "--json",
                str(report),
            ]
        )
    assert code == 0
    text = out.getvalue()
    assert "unavailable=" in text and "1.000" in text, text
    assert report.exists()
