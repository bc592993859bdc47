"""The experiment record on real Redis: attribution by request id and by window, counts, shadow log."""

from __future__ import annotations

import time

import pytest

from serve_app.experiments import ExperimentLog, Served, ShadowComparison, ShadowSummary
from serve_app.redis_client import connect_redis

pytestmark = pytest.mark.integration


def _log(redis_url: str, key_prefix: str, window: float = 60.0) -> ExperimentLog:
    return ExperimentLog(connect_redis(redis_url, 0.5), key_prefix, "exp1", window, 100)


def test_events_are_credited_to_the_variant_that_served_them(
    redis_url: str, key_prefix: str
) -> None:
    log = _log(redis_url, key_prefix)
    log.served(
        [
            Served("r1", "alice", "control", "1"),
            Served("r2", "bob", "treatment", "2"),
            Served("r3", "bob", "treatment", "2"),
        ]
    )
    credited = log.attribute(
        [
            ("r1", "alice", "click"),
            ("r1", "alice", "click"),  # a second click on the same list: one clicked request
            ("r1", "alice", "purchase"),
            ("r2", "bob", "click"),
            (None, "bob", "add_to_cart"),  # no request id: bob's latest request (r3)
            ("r1", "mallory", "click"),  # names alice's request: not credited
            ("r404", "alice", "click"),  # unknown or expired request
            (None, "carol", "click"),  # never served
        ]
    )
    assert credited == [
        "control",
        "control",
        "control",
        "treatment",
        "treatment",
        None,
        None,
        None,
    ]
    counts = log.counts(["control", "treatment", "unused"])
    control, treatment = counts["control"], counts["treatment"]
    assert (control.impressions, control.clicked_requests) == (1, 1)
    assert (control.event("click"), control.event("purchase")) == (2, 1)
    assert (treatment.impressions, treatment.clicked_requests) == (2, 1)
    assert (treatment.event("click"), treatment.event("add_to_cart")) == (1, 1)
    assert counts["unused"].impressions == 0 and counts["unused"].ctr == 0.0
    assert treatment.ctr == pytest.approx(0.5)


def test_a_request_outside_the_attribution_window_credits_nobody(
    redis_url: str, key_prefix: str
) -> None:
    log = _log(redis_url, key_prefix, window=1.0)
    log.served([Served("r1", "alice", "control", "1")])
    time.sleep(2.2)  # Redis expires the records after the 1 s window
    assert log.attribute([("r1", "alice", "click"), (None, "alice", "click")]) == [None, None]
    assert log.counts(["control"])["control"].event("click") == 0


def test_the_shadow_log_round_trips_and_summarises(redis_url: str, key_prefix: str) -> None:
    log = _log(redis_url, key_prefix)
    entries = [
        ShadowComparison("r1", "control", "1", "2", 10, 12.0, 14.0, 1.0, 1.0),
        ShadowComparison("r2", "control", "1", "2", 10, 10.0, 20.0, 0.5, 0.6),
        ShadowComparison("r3", "control", "1", "2", 10, 11.0, None, None, None, "timeout"),
    ]
    log.log_shadow(entries)
    back = log.shadow_log()
    assert back == entries
    summary = ShadowSummary.of(back)
    assert summary.mirrored == 3 and dict(summary.errors) == {"timeout": 1}
    assert summary.mean_jaccard == pytest.approx(0.75)
    assert summary.mean_rbo == pytest.approx(0.8)
    assert (summary.median_served_ms, summary.median_shadow_ms) == (11.0, 17.0)
