"""The Ingress replica's last-minute window (`serve_app.live`): rates, nearest-rank quantiles and the
fallback share, computed by hand on a fake clock."""

from __future__ import annotations

from serve_app.live import LiveWindow, quantile
from tests.manual_clock import Clock


def test_nearest_rank_quantiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50.0 and quantile(values, 0.99) == 99.0
    assert quantile([7.0], 0.99) == 7.0 and quantile([], 0.5) is None


def test_window_forgets_old_requests_and_shares_fallbacks() -> None:
    clock = Clock()
    window = LiveWindow(window_seconds=60.0, clock=clock)
    window.request(200, 500.0)  # leaves the window below
    clock.now += 61
    for ms in (10.0, 20.0, 30.0, 40.0):
        window.request(200, ms)
        clock.now += 5
    window.request(503, 1.0)  # an error: counted, not in the latency quantiles
    for fallback in (None, "cold_start", None, "degraded"):
        window.served(fallback)
    snap = window.snapshot()
    assert snap.requests == 5 and snap.errors == 1
    assert snap.requests_per_second == 5 / 20.0  # the data covers 20 s of the window
    assert snap.p50_ms == 20.0 and snap.p99_ms == 40.0
    assert snap.served == 4 and snap.fallbacks == {"cold_start": 1, "degraded": 1}
    assert snap.fallback_share == 0.5


def test_the_ring_is_bounded() -> None:
    window = LiveWindow(capacity=3, clock=Clock())
    for ms in range(10):
        window.request(200, float(ms))
    assert window.snapshot().requests == 3
