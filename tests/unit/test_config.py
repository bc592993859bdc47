"""Training settings: defaults <- YAML <- environment <- explicit arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from training.config import load_settings


def test_precedence_yaml_then_env_then_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "recserve.yaml"
    config.write_text("two_tower:\n  epochs: 3\n  batch_size: 64\nmodel_name: from-yaml\n")
    assert load_settings(config).two_tower.epochs == 3
    monkeypatch.setenv("RECSERVE_TWO_TOWER__EPOCHS", "5")
    settings = load_settings(config)
    assert (settings.two_tower.epochs, settings.two_tower.batch_size) == (5, 64)
    assert settings.model_name == "from-yaml"
    assert load_settings(config, model_name="explicit").model_name == "explicit"


def test_defaults_and_derived_locations(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert settings.feature_store.data_dir == tmp_path
    assert settings.feature_store.resolved_profile == "embedded"
    redis = load_settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:6379/0")
    assert redis.feature_store.resolved_profile == "redis"


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("two_tower:\n  epoch: 3\n")
    with pytest.raises(ValidationError, match="epoch"):
        load_settings(config)
