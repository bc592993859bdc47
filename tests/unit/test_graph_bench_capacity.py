"""bench/graph_vs_inprocess.py's capacity rule: a failed rate gets the same second chance on every
side, and a side's sweep stops at the first rate that fails every attempt."""

from __future__ import annotations

from bench.graph_vs_inprocess import RateResult, capacity, sweep


def result(rate: float, p99: float, errors: int = 0) -> RateResult:
    return RateResult(
        "x", rate, 100, 100 - errors, {"http_503": errors} if errors else {}, {"p99": p99}
    )


def test_a_rate_clean_in_a_later_attempt_counts_and_the_sweep_stops_at_a_confirmed_failure() -> (
    None
):
    # p99 per (rate, attempt): 200 spikes once, 300 fails twice, 400 is never run.
    p99 = {(100, 1): 20.0, (200, 1): 140.0, (200, 2): 30.0, (300, 1): 150.0, (300, 2): 120.0}
    runs: list[tuple[float, int]] = []

    def measure(rate: float, attempt: int) -> RateResult:
        runs.append((rate, attempt))
        return result(rate, p99[(int(rate), attempt)])

    results = sweep([100, 200, 300, 400], 2, measure)
    assert runs == [(100, 1), (200, 1), (200, 2), (300, 1), (300, 2)]
    assert [r.attempt for r in results] == [1, 1, 2, 1, 2]
    assert capacity(results) == 200


def test_capacity_needs_every_lower_rate_clean_and_no_errors() -> None:
    assert capacity([result(100, 20.0), result(200, 20.0, errors=1), result(300, 20.0)]) == 100
    assert capacity([result(100, 101.0)]) is None
    assert capacity([]) is None
