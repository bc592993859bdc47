"""bench/graph_vs_inprocess.py's capacity rule: a failed rate gets the same second chance on every
side, and a side's sweep stops at the first rate that fails every attempt."""

from __future__ import annotations

from bench.graph_vs_inprocess import (
    RateResult,
    capacity,
    mean_batches,
    parse_batch_totals,
    sweep,
)


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


def test_the_mean_batch_comes_from_two_counts_not_from_the_histogram_s_midpoint_sum() -> None:
    # What Ray's metrics endpoint exposes for batches of 1, 1 and 4 at the ingress across two
    # replicas (the histogram's _sum rebuilt from bucket midpoints: 0.5 + 0.5 + 3.0).
    def scrape(batches: int, requests: int, midpoint_sum: float) -> str:
        series = [
            f'ray_recserve_stage_batch_size_count{{replica="a",stage="ingress"}} {batches - 1}',
            'ray_recserve_stage_batch_size_count{replica="b",stage="ingress"} 1',
            f'ray_recserve_stage_batch_size_sum{{replica="a",stage="ingress"}} {midpoint_sum}',
            f'ray_recserve_stage_batched_requests_total{{replica="a",stage="ingress"}} {requests}',
            'ray_recserve_stage_latency_ms_count{stage="ingress"} 99',
        ]
        return "# HELP x\n" + "\n".join(series) + "\n"

    before = parse_batch_totals(scrape(batches=2, requests=2, midpoint_sum=1.0))
    after = parse_batch_totals(scrape(batches=5, requests=8, midpoint_sum=5.0))
    assert before == {"ingress": (2.0, 2.0)}
    assert mean_batches(before, after) == {"ingress": 2.0}  # 6 requests in 3 batches
