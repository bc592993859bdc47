"""The settings search's bookkeeping: what is pinned, and how trial values become settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.config import TrainingSettings, load_settings
from training.evaluate import ndcg_at_k, ndcg_per_user
from training.search import SPACE, paired_gain, pinned_settings, with_values


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


def test_ndcg_per_user_is_the_mean_ndcg_user_by_user() -> None:
    ranked = np.array([[0, 1], [1, 0], [2, 3]])
    relevant = [[0], [0], []]  # the third user has nothing relevant: NaN, not 0
    values = ndcg_per_user(ranked, relevant, 2)
    assert values[0] == 1.0 and values[1] == pytest.approx(1 / math.log2(3)) and np.isnan(values[2])
    assert np.nanmean(values) == pytest.approx(ndcg_at_k(ranked, relevant, 2))


def test_paired_gain_with_one_round_is_the_mean_difference_and_its_standard_error() -> None:
    users = {"time": np.array(["a", "b", "c", "d"])}
    given = {"time": np.array([0.5, 0.2, 0.0, np.nan])}
    other = {"time": np.array([0.6, 0.1, 0.3, np.nan])}
    gain, se = paired_gain(given, other, users)
    # Differences 0.1, -0.1, 0.3 (d has nothing relevant): mean 0.1, sample sd 0.2, se 0.2 / sqrt(3).
    assert gain == pytest.approx(0.1) and se == pytest.approx(0.2 / math.sqrt(3))


def test_paired_gain_counts_a_user_in_both_rounds_once() -> None:
    # Round "time" on a, b; round "basket" on b, c. The objective is the mean of the two rounds'
    # means, so each term is difference / (2 rounds x 2 users): a 0.1, b (0.3 + 0.1) = 0.4 ... / 4.
    users = {"time": np.array(["a", "b"]), "basket": np.array(["b", "c"])}
    given = {"time": np.zeros(2), "basket": np.zeros(2)}
    other = {"time": np.array([0.4, 1.2]), "basket": np.array([0.4, -0.4])}
    gain, se = paired_gain(given, other, users)
    assert gain == pytest.approx((0.4 + 1.2) / 4 + (0.4 - 0.4) / 4)
    per_user = np.array([0.1, 0.3 + 0.1, -0.1])  # a, b (both rounds), c
    assert se == pytest.approx(math.sqrt(3 * per_user.var(ddof=1)))
    # Identical rankings gain nothing, with no spread.
    assert paired_gain(other, other, users) == (0.0, 0.0)
