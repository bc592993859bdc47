"""`recserve promote` gated on live A/B counts in the real Redis and a real MLflow registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from mlflow import MlflowClient

from serve_app.experiments import ExperimentLog, Served
from tests.bundle_factory import make_tiny_bundle
from tests.conftest import free_port
from training.cli import main
from training.registry import (
    CHALLENGER,
    CHAMPION,
    default_tracking_uri,
    promote,
    register_bundle,
)

pytestmark = pytest.mark.integration

EXPERIMENT = "gate"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One MLflow database for the module (its schema takes seconds to build); one model per test.
    return default_tracking_uri(tmp_path_factory.mktemp("promote-online"))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    make_tiny_bundle(directory, n_items=20, dim=4, seed=1)
    return directory


def champion_and_better_offline_challenger(
    bundle_dir: Path, tracking_uri: str, model_name: str
) -> None:
    """v1 champion (ndcg@10 0.30), v2 challenger (0.40: passes the 2% offline margin)."""
    for ndcg in (0.30, 0.40):
        register_bundle(
            bundle_dir, tracking_uri=tracking_uri, model_name=model_name, metrics={"ndcg@10": ndcg}
        )
        if ndcg == 0.30:
            assert promote(tracking_uri=tracking_uri, model_name=model_name).promoted


def aliases(tracking_uri: str, model_name: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return {k: str(v) for k, v in client.get_registered_model(model_name).aliases.items()}


def record_ab(client: redis.Redis, prefix: str, clicked: dict[str, int], served: int) -> None:
    """`served` lists per variant through the serving record; the first `clicked[v]` get clicks."""
    log = ExperimentLog(client, prefix, EXPERIMENT, window_seconds=600)
    log.served(
        Served(f"{variant}-{i}", f"user-{variant}-{i}", variant, "1")
        for variant in clicked
        for i in range(served)
    )
    events: list[tuple[str | None, str, str]] = []
    for variant, n in clicked.items():
        for i in range(n):
            # Two clicks on one list count it once; views never make a list clicked.
            events += [(f"{variant}-{i}", f"user-{variant}-{i}", "click")] * 2
            events.append((f"{variant}-{i + n}", f"user-{variant}-{i + n}", "view"))
    credited = log.attribute(events)
    assert None not in credited


def promote_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, model: str, *extra: str
) -> tuple[int, str]:
    monkeypatch.setenv("RECSERVE_MODEL_NAME", model)
    code = main(["promote", "--experiment", EXPERIMENT, "--min-impressions", "1000", *extra])
    out = capsys.readouterr().out
    return code, re.sub(r"\s+", " ", out)


def test_significantly_worse_challenger_online_is_refused_and_force_overrides(
    bundle_dir: Path,
    tracking_uri: str,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    champion_and_better_offline_challenger(bundle_dir, tracking_uri, "worse")
    # 15% vs 10% of 2000 lists each: -5 pp, 95% CI about -7.0 to -3.0 pp (significantly worse).
    record_ab(redis_client, key_prefix, {"champion": 300, "challenger": 200}, served=2000)
    args = ("--tracking-uri", tracking_uri, "--redis-url", redis_url, "--key-prefix", key_prefix)

    code, out = promote_cli(capsys, monkeypatch, "worse", *args)

    assert code == 3, out
    assert aliases(tracking_uri, "worse") == {CHAMPION: "1", CHALLENGER: "2"}
    assert "ndcg@10 0.4000 meets required 0.3060" in out  # the offline gate alone would pass
    for shown in ("2,000", "300", "200", "15.00%", "10.00%", "-5.00 pp"):
        assert shown in out
    assert "verdict: significantly worse; gate refused" in out
    assert "not promoted refused:" in out

    code, out = promote_cli(capsys, monkeypatch, "worse", *args, "--force")

    assert code == 0, out
    assert aliases(tracking_uri, "worse")[CHAMPION] == "2"
    assert "verdict: significantly worse; gate refused" in out
    assert "forced promotion of v2" in out


def test_too_few_impressions_or_unreachable_redis_leave_the_offline_gate_alone(
    bundle_dir: Path,
    tracking_uri: str,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    champion_and_better_offline_challenger(bundle_dir, tracking_uri, "thin")
    # Far worse online, but 500 lists each is below the minimum: no online evidence.
    record_ab(redis_client, key_prefix, {"champion": 250, "challenger": 50}, served=500)

    code, out = promote_cli(
        capsys,
        monkeypatch,
        *("thin", "--tracking-uri", tracking_uri),
        *("--redis-url", redis_url, "--key-prefix", key_prefix),
    )

    assert code == 0, out
    assert aliases(tracking_uri, "thin")[CHAMPION] == "2"
    assert (
        "online evidence: none (champion has 500 and challenger has 500 impressions, "
        "need >= 1,000 per variant)" in out
    )

    register_bundle(
        bundle_dir, tracking_uri=tracking_uri, model_name="thin", metrics={"ndcg@10": 0.5}
    )
    unreachable = f"redis://127.0.0.1:{free_port()}/0"

    code, out = promote_cli(
        capsys, monkeypatch, "thin", "--tracking-uri", tracking_uri, "--redis-url", unreachable
    )

    assert code == 0, out
    assert aliases(tracking_uri, "thin")[CHAMPION] == "3"
    assert f"online evidence: none (Redis unreachable at {unreachable}" in out


def test_rollback_prints_the_online_evidence(
    bundle_dir: Path,
    tracking_uri: str,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    champion_and_better_offline_challenger(bundle_dir, tracking_uri, "back")
    assert promote(tracking_uri=tracking_uri, model_name="back").promoted
    record_ab(redis_client, key_prefix, {"champion": 300, "challenger": 200}, served=2000)
    monkeypatch.setenv("RECSERVE_MODEL_NAME", "back")

    code = main(
        [
            *("rollback", "--tracking-uri", tracking_uri, "--experiment", EXPERIMENT),
            *("--redis-url", redis_url, "--key-prefix", key_prefix),
        ]
    )
    out = re.sub(r"\s+", " ", capsys.readouterr().out)

    assert code == 0, out
    assert aliases(tracking_uri, "back")[CHAMPION] == "1"
    assert "15.00%" in out and "10.00%" in out and "verdict: significantly worse" in out
    assert "rolled back champion to v1" in out
