"""The online promotion gate: refuse only a significantly worse treatment, with enough traffic."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from serve_app.experiments import VariantCounts
from training.config import OnlineGateConfig
from training.online_gate import online_gate, print_online_evidence, read_online_evidence

CONFIG = OnlineGateConfig(min_impressions=1000)


def counts(clicked: int, impressions: int) -> VariantCounts:
    return VariantCounts(impressions=impressions, clicked_requests=clicked)


def wald(succ_a: int, n_a: int, succ_b: int, n_b: int) -> tuple[float, float, float]:
    """p_b - p_a with the plain normal (Wald) 95% interval: close to Newcombe's at these sizes."""
    pa, pb = succ_a / n_a, succ_b / n_b
    half = 1.96 * math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    return pb - pa, pb - pa - half, pb - pa + half


def test_significantly_worse_treatment_is_refused() -> None:
    evidence = online_gate(counts(300, 2000), counts(200, 2000), CONFIG)

    assert evidence.applies and not evidence.passed
    assert evidence.verdict == "significantly worse"
    assert evidence.difference is not None
    diff, low, high = evidence.difference
    expected = wald(300, 2000, 200, 2000)  # -0.05, about [-0.070, -0.030]
    assert diff == pytest.approx(-0.05)
    assert low == pytest.approx(expected[1], abs=2e-3)
    assert high == pytest.approx(expected[2], abs=2e-3)
    assert high < 0


def test_significantly_better_treatment_passes() -> None:
    evidence = online_gate(counts(200, 2000), counts(300, 2000), CONFIG)

    assert evidence.applies and evidence.passed
    assert evidence.verdict == "significantly better"
    assert evidence.difference is not None and evidence.difference[1] > 0


def test_worse_but_not_significantly_passes_as_inconclusive() -> None:
    # 14% vs 15% on 1000 lists each: Wald half-width ~3.1 pp, so the interval straddles zero.
    evidence = online_gate(counts(150, 1000), counts(140, 1000), CONFIG)

    assert evidence.applies and evidence.passed
    assert evidence.verdict == "inconclusive"
    assert evidence.difference is not None
    assert evidence.difference[1] < 0 < evidence.difference[2]


@pytest.mark.parametrize(
    ("control", "treatment", "short"),
    [
        (counts(300, 2000), counts(0, 999), "challenger has 999"),
        (counts(10, 50), counts(200, 2000), "champion has 50"),
        (VariantCounts(), VariantCounts(), "champion has 0 and challenger has 0"),
    ],
)
def test_too_few_impressions_is_no_online_evidence(
    control: VariantCounts, treatment: VariantCounts, short: str
) -> None:
    evidence = online_gate(control, treatment, CONFIG)

    assert not evidence.applies and evidence.passed and evidence.verdict == "none"
    assert evidence.difference is None
    assert short in evidence.reason and "need >= 1,000" in evidence.reason


def test_exactly_the_minimum_applies_the_gate() -> None:
    evidence = online_gate(counts(150, 1000), counts(100, 1000), CONFIG)
    assert evidence.applies and not evidence.passed


def test_no_redis_url_is_no_online_evidence() -> None:
    evidence = read_online_evidence(None, CONFIG)
    assert not evidence.applies and evidence.passed
    assert "no Redis URL" in evidence.reason


def test_printed_table_shows_counts_ctr_difference_and_verdict() -> None:
    console = Console(record=True, width=160)
    print_online_evidence(online_gate(counts(300, 2000), counts(200, 2000), CONFIG), console)
    text = console.export_text()

    for expected in ("2,000", "300", "200", "15.00%", "10.00%", "-5.00 pp"):
        assert expected in text
    assert "verdict: significantly worse; gate refused" in text


def test_no_evidence_prints_one_line_with_the_reason() -> None:
    console = Console(record=True, width=160)
    print_online_evidence(online_gate(counts(3, 20), counts(2, 20), CONFIG), console)
    assert console.export_text().strip() == (
        "online evidence: none (champion has 20 and challenger has 20 impressions, "
        "need >= 1,000 per variant)"
    )
