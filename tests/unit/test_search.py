"""The settings search's bookkeeping: what is pinned, and how trial values become settings."""

from __future__ import annotations

import pytest

from training.config import TrainingSettings, load_settings
from training.search import SPACE, pinned_settings, with_values


def test_settings_set_by_environment_or_argument_are_pinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pinned_settings(load_settings()) == []
    monkeypatch.setenv("RECSERVE_RANKER__MAX_DEPTH", "6")
    pinned = pinned_settings(load_settings(split={"ranker_labels": "window"}))
    assert sorted(pinned) == ["ranker.max_depth", "split.ranker_labels"]


def test_collaborative_pinned_off_pins_every_collaborative_setting() -> None:
    settings = TrainingSettings(collaborative={"enabled": False})
    assert sorted(pinned_settings(settings)) == sorted(
        n for n in SPACE if n.startswith("collaborative.")
    )
    # Pinned on: the models are fit, each of them still searched.
    assert pinned_settings(TrainingSettings(collaborative={"enabled": True})) == []


def test_trial_values_become_validated_settings_without_touching_the_rest() -> None:
    base = TrainingSettings()
    chosen = with_values(base, {"ranker.max_depth": 7, "cold_start.min_events": 2})
    assert chosen.ranker.max_depth == 7 and chosen.cold_start.min_events == 2
    assert chosen.ranker.candidates == base.ranker.candidates
    assert base.ranker.max_depth == 4  # the original is left alone
    with pytest.raises(ValueError):
        with_values(base, {"ranker.max_depth": 0})
