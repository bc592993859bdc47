"""Statistics of the offline A/B simulation: t-interval, pooled lift, paired bootstrap, truth ids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.simulate import (
    RunResult,
    SimulationError,
    VariantStats,
    _generator_rows,
    paired_bootstrap_lift,
    ratio_lift,
    t_interval,
)

# Student t quantile t(0.975, df=4) from printed tables.
T_975_DF4 = 2.776445


def test_t_interval_of_one_to_five_by_hand() -> None:
    # mean 3, sample sd sqrt(2.5), half width t * sd / sqrt(5) = 2.776445 * 0.707107 = 1.963243
    mean, low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert low == pytest.approx(3.0 - 1.963243, abs=1e-5)
    assert high == pytest.approx(3.0 + 1.963243, abs=1e-5)
    assert (high - mean) == pytest.approx(T_975_DF4 * math.sqrt(2.5) / math.sqrt(5), abs=1e-5)


def test_t_interval_of_equal_values_is_a_point_and_of_one_value_undefined() -> None:
    assert t_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)
    mean, low, high = t_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)


def test_t_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    samples = rng.normal(loc=1.5, scale=2.0, size=(4000, 5))
    covered = [low <= 1.5 <= high for _, low, high in map(t_interval, samples)]
    # Binomial(4000, 0.95): sd 0.34 percentage points.
    assert 0.94 <= np.mean(covered) <= 0.96


def test_ratio_lift_and_run_lifts_by_hand() -> None:
    assert ratio_lift(10, 100, 12, 100) == pytest.approx(0.2)
    assert ratio_lift(10, 100, 12, 200) == pytest.approx(-0.4)  # CTR 0.06 vs 0.10
    assert math.isnan(ratio_lift(0, 100, 3, 100))
    run = RunResult(
        run=0,
        users=10,
        champion=VariantStats("1", impressions=100, clicks=20, expected_clicks=25.0),
        challenger=VariantStats("2", impressions=80, clicks=20, expected_clicks=16.0),
    )
    assert run.champion.ctr == 0.2 and run.challenger.expected_ctr == 0.2
    assert run.lift == pytest.approx(0.25)  # 0.25 / 0.20 - 1
    assert run.expected_lift == pytest.approx(-0.2)  # 0.20 / 0.25 - 1


def test_bootstrap_of_identical_arms_is_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    clicks = rng.integers(0, 4, size=300).astype(float)
    imps = np.full(300, 10.0)
    assert paired_bootstrap_lift(clicks, imps, clicks, imps, resamples=200) == (0.0, 0.0)


def _paired_users(rng: np.random.Generator, n: int, lift: float) -> tuple[np.ndarray, ...]:
    """Users with their own click propensity, shown 10 items per arm; arm B's CTR is (1 + lift)x."""
    base = rng.beta(2.0, 8.0, size=n)  # per-user CTR, mean 0.2
    u = rng.random((n, 10))  # shared uniforms: the arms are positively correlated
    clicks_a = (u < base[:, None]).sum(axis=1).astype(float)
    clicks_b = (u < (base * (1 + lift))[:, None]).sum(axis=1).astype(float)
    imps = np.full(n, 10.0)
    return clicks_a, imps, clicks_b, imps


def test_paired_bootstrap_covers_the_planted_lift() -> None:
    # True pooled lift: E[clicks_b] / E[clicks_a] - 1 = 0.1 exactly (p * 1.1 stays below 1).
    rng = np.random.default_rng(3)
    hits = 0
    reps = 200
    for rep in range(reps):
        low, high = paired_bootstrap_lift(*_paired_users(rng, 400, 0.1), resamples=400, seed=rep)
        hits += low <= 0.1 <= high
    # Binomial(200, 0.95): sd 1.5 percentage points; a percentile bootstrap runs slightly narrow.
    assert 0.89 <= hits / reps <= 0.99


def test_paired_bootstrap_is_narrower_than_the_independent_two_proportion_interval() -> None:
    clicks_a, imps, clicks_b, _ = _paired_users(np.random.default_rng(5), 2000, 0.1)
    low, high = paired_bootstrap_lift(clicks_a, imps, clicks_b, imps, resamples=1000)
    # Delta method on log(CTR_b / CTR_a) as if the arms were independent samples.
    n = imps.sum()
    pa, pb = clicks_a.sum() / n, clicks_b.sum() / n
    se = math.sqrt((1 - pa) / (pa * n) + (1 - pb) / (pb * n))
    independent_width = math.exp(math.log(pb / pa) + 1.96 * se) - math.exp(
        math.log(pb / pa) - 1.96 * se
    )
    assert low < pb / pa - 1 < high
    assert high - low < 0.6 * independent_width


def test_generator_ids_map_to_truth_rows_and_others_are_refused() -> None:
    rows = _generator_rows(np.array(["u17", "u0", "u299"]), "u", 300, "user")
    assert rows.tolist() == [17, 0, 299]
    with pytest.raises(SimulationError, match="'alice' is not a generator id"):
        _generator_rows(np.array(["u1", "alice"]), "u", 300, "user")
    with pytest.raises(SimulationError, match="'u300' has no planted vector"):
        _generator_rows(np.array(["u300"]), "u", 300, "user")
