"""templates/training-cronjob.yaml, materialization-cronjob.yaml (+ data-pvc.yaml): `recserve train`
registering a challenger and `recserve features all`, checked against the real CLI and settings."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.helm import chart
from tests.helm.test_rayservice import SECRETS, resolved_env


def job_container(docs: tuple[chart.Doc, ...] | list[chart.Doc], name: str) -> dict[str, Any]:
    cronjob = chart.one(docs, "CronJob", name)
    container: dict[str, Any] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def test_recserve_command_is_the_training_cli() -> None:
    scripts = tomllib.loads((chart.REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["recserve"] == "training.cli:main"


def test_training_job_runs_recserve_train_and_registers_without_promoting(helm: Path) -> None:
    from training.cli import build_parser, cmd_train

    container = job_container(chart.render_profile("default"), "recserve-training")
    assert container["command"] == ["recserve"]
    args = build_parser().parse_args(container["args"])
    assert args.func is cmd_train
    assert args.dataset == "parquet" and str(args.dataset_path) == "/data/dataset"
    # Registration on (alias challenger); promotion to champion stays a separate, gated decision.
    assert args.no_register is False
    assert args.promote is False


def test_materialization_job_runs_feast_apply_and_materialize(helm: Path) -> None:
    from training.cli import build_parser, cmd_features

    container = job_container(chart.render_profile("default"), "recserve-materialization")
    args = build_parser().parse_args(container["args"])
    assert args.func is cmd_features
    assert args.action == "all"


@pytest.mark.parametrize("name", ["recserve-training", "recserve-materialization"])
def test_job_settings_built_from_the_pod_environment(
    helm: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from training.config import load_settings

    env = resolved_env(job_container(chart.render_profile("default"), name), SECRETS)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.data_dir == Path("/data")
    assert settings.tracking_uri == "http://recserve-mlflow:5000"
    assert settings.model_name == "recserve"
    assert settings.register_bundle is True
    assert settings.feature_store.resolved_profile == "cluster"
    # The bundled Redis's ACL user, its password expanded by the kubelet from the Secret.
    assert settings.feature_store.redis_url == "redis://recserve:s3cret@recserve-redis:6379/0"
    assert settings.feature_store.data_dir == Path("/data")
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("admin", "ml-pw")


@pytest.mark.parametrize(
    ("name", "schedule"),
    [("recserve-training", "0 3 * * *"), ("recserve-materialization", "*/30 * * * *")],
)
def test_jobs_never_overlap_and_share_the_data_volume(helm: Path, name: str, schedule: str) -> None:
    docs = chart.render_profile("default")
    cronjob = chart.one(docs, "CronJob", name)
    assert cronjob["spec"]["schedule"] == schedule
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "recserve-data"}} in pod[
        "volumes"
    ]
    assert {"name": "data", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]
    chart.one(docs, "PersistentVolumeClaim", "recserve-data")


def test_jobs_need_the_data_volume_and_say_so(helm: Path) -> None:
    with pytest.raises(
        chart.HelmError, match=r"training\.enabled needs data\.persistence\.enabled"
    ):
        chart.render(set_json={"data.persistence.enabled": False})
    docs = chart.render(
        set_json={
            "data.persistence.enabled": False,
            "training.enabled": False,
            "materialization.enabled": False,
        }
    )
    assert chart.of_kind(docs, "CronJob") == []
