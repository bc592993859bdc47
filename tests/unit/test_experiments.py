"""A/B bucketing properties, list overlap measures, proportion intervals and the experiment config."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from pydantic import ValidationError

from serve_app.config import ExperimentConfig, ServeSettings
from serve_app.experiments import (
    VariantCounts,
    assign_variant,
    difference_interval,
    jaccard,
    rank_biased_overlap,
    shadow_sampled,
    wilson_interval,
)

USERS = [f"user-{n}" for n in range(100_000)]


def split(weights: list[tuple[str, float]], salt: str = "s1") -> dict[str, str]:
    return {u: assign_variant(salt, u, weights) for u in USERS}


@pytest.mark.parametrize(
    "weights",
    [
        [("control", 0.5), ("treatment", 0.5)],
        [("control", 0.9), ("treatment", 0.1)],
        [("a", 0.2), ("b", 0.3), ("c", 0.5)],
        [("a", 3.0), ("b", 1.0)],  # weights are relative
    ],
)
def test_over_100k_users_the_split_is_within_one_point_of_the_weights(
    weights: list[tuple[str, float]],
) -> None:
    counts = Counter(split(weights).values())
    total = sum(w for _, w in weights)
    for name, weight in weights:
        assert abs(counts[name] / len(USERS) - weight / total) < 0.01, (name, counts)


def test_raising_a_weight_moves_users_only_into_that_variant() -> None:
    before = split([("a", 0.2), ("b", 0.3), ("c", 0.5)])
    after = split([("a", 0.2), ("b", 0.6), ("c", 0.5)])
    moved = [(before[u], after[u]) for u in USERS if before[u] != after[u]]
    assert moved, "raising b's weight moves some users"
    assert {to for _, to in moved} == {"b"}
    assert {frm for frm, _ in moved} == {"a", "c"}


def test_a_zero_weight_variant_gets_nobody_and_its_users_leave_without_reshuffling_others() -> None:
    before = split([("a", 0.4), ("b", 0.4), ("c", 0.2)])
    after = split([("a", 0.4), ("b", 0.4), ("c", 0.0)])
    assert "c" not in set(after.values())
    assert all(after[u] == before[u] for u in USERS if before[u] != "c")


def test_the_variant_is_a_pure_function_of_salt_and_user_not_of_order_or_process() -> None:
    weights = [("a", 0.5), ("b", 0.5)]
    users = USERS[:2_000]
    first = [assign_variant("s1", u, weights) for u in users]
    assert first == [assign_variant("s1", u, list(reversed(weights))) for u in users]
    # Pinned: blake2b, not Python's per-process salted hash(); a change here reshuffles every
    # running experiment, so it must be deliberate.
    assert [assign_variant("s1", f"user-{n}", weights) for n in range(8)] == list("bbabbabb")
    other_salt = [assign_variant("s2", u, weights) for u in users]
    agreement = sum(x == y for x, y in zip(first, other_salt, strict=True)) / len(users)
    assert 0.4 < agreement < 0.6  # a new salt is a new, independent split


def test_no_positive_weight_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        assign_variant("s", "u", [("a", 0.0)])


def test_shadow_sampling_follows_the_share_and_is_stable_per_request() -> None:
    ids = [f"req-{n}" for n in range(50_000)]
    sampled = [shadow_sampled("s", r, 0.1) for r in ids]
    assert abs(sum(sampled) / len(ids) - 0.1) < 0.01
    assert sampled == [shadow_sampled("s", r, 0.1) for r in ids]
    assert not any(shadow_sampled("s", r, 0.0) for r in ids[:100])
    assert all(shadow_sampled("s", r, 1.0) for r in ids[:100])


# --- overlap --------------------------------------------------------------------------------------


def test_jaccard_of_lists() -> None:
    assert jaccard(["a", "b"], ["b", "a"]) == 1.0
    assert jaccard(["a", "b", "c"], ["c", "d"]) == pytest.approx(1 / 4)
    assert jaccard([], []) == 1.0
    assert jaccard(["a"], []) == 0.0


def test_rank_biased_overlap_bounds_order_sensitivity_and_a_hand_worked_case() -> None:
    a = [f"i{n}" for n in range(10)]
    assert rank_biased_overlap(a, a) == pytest.approx(1.0)
    assert rank_biased_overlap(a, [f"j{n}" for n in range(10)]) == 0.0
    swapped_top = [a[1], a[0], *a[2:]]
    swapped_bottom = [*a[:8], a[9], a[8]]
    # Same sets, but disagreement at the top costs more than at the bottom.
    assert rank_biased_overlap(a, swapped_bottom) > rank_biased_overlap(a, swapped_top)
    assert rank_biased_overlap(a, swapped_top) < 1.0
    # By hand, p = 0.5, [x, y] vs [y, x]: X1 = 0, X2 = 2; (1-p)/p * (0/1 * p + 2/2 * p^2) + p^2
    assert rank_biased_overlap(["x", "y"], ["y", "x"], p=0.5) == pytest.approx(0.25 + 0.25)


def test_rank_biased_overlap_is_symmetric_and_handles_unequal_lengths() -> None:
    a, b = ["a", "b", "c", "d"], ["b", "a", "e"]
    assert rank_biased_overlap(a, b) == pytest.approx(rank_biased_overlap(b, a))
    assert 0.0 < rank_biased_overlap(a, b) < 1.0
    with pytest.raises(ValueError):
        rank_biased_overlap(a, b, p=1.0)


# --- intervals ------------------------------------------------------------------------------------


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 .. 0.3662 (Wilson score, 95%)
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 10)[0] == 0.0 and 0.0 < wilson_interval(0, 10)[1] < 0.31
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_difference_interval_matches_newcombe_method_10() -> None:
    # Newcombe (1998), example (c): 56/70 vs 48/80 -> difference 0.2, CI 0.0524 .. 0.3339.
    diff, low, high = difference_interval(48, 80, 56, 70)
    assert diff == pytest.approx(0.2)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_the_difference_interval_covers_the_truth_about_95_percent_of_the_time() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    covered = 0
    trials = 2_000
    for _ in range(trials):
        a, b = rng.binomial(500, 0.10), rng.binomial(500, 0.12)
        _, low, high = difference_interval(int(a), 500, int(b), 500)
        covered += low <= 0.02 <= high
    assert 0.93 < covered / trials < 0.97


def test_variant_counts_report_ctr_and_its_interval() -> None:
    counts = VariantCounts(impressions=200, clicked_requests=30, events={"click": 41})
    report = counts.as_dict()
    assert report["ctr"] == pytest.approx(0.15)
    assert report["clicks"] == 41 and report["purchases"] == 0
    low, high = report["ctr_ci95"]
    assert low < 0.15 < high and math.isclose(high - low, 0.1, abs_tol=0.02)


# --- config ---------------------------------------------------------------------------------------


def test_experiment_config_refuses_duplicate_names_no_weight_and_bad_refs() -> None:
    with pytest.raises(ValidationError, match="unique"):
        ExperimentConfig(variants=({"name": "a"}, {"name": "a"}))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="positive weight"):
        ExperimentConfig(variants=({"name": "a", "weight": 0},))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ExperimentConfig(variants=({"name": "a b"},))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ExperimentConfig(shadow={"model": "x", "share": 1.5})  # type: ignore[arg-type]


def test_the_default_experiment_is_one_champion_variant_on_the_model_uri_alias() -> None:
    settings = ServeSettings()
    assert settings.experiment.weights == (("champion", 1.0),)
    assert settings.experiment.variants[0].model is None
    assert settings.experiment.shadow.share == 0.0


def test_variants_and_shadow_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RECSERVE_EXPERIMENT__VARIANTS",
        '[{"name": "control", "model": "champion", "weight": 0.8},'
        ' {"name": "treatment", "model": "challenger", "weight": 0.2}]',
    )
    monkeypatch.setenv("RECSERVE_EXPERIMENT__SHADOW__MODEL", "7")
    monkeypatch.setenv("RECSERVE_EXPERIMENT__SHADOW__SHARE", "0.25")
    experiment = ServeSettings().experiment
    assert experiment.weights == (("control", 0.8), ("treatment", 0.2))
    assert (experiment.shadow.model, experiment.shadow.share) == ("7", 0.25)
    assert list(itertools.islice((v.model for v in experiment.variants), 2)) == [
        "champion",
        "challenger",
    ]
