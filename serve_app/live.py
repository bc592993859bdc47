"""What one Ingress replica served in the last minute, kept in process: the numbers `/demo/ops` shows
to an operator without Prometheus or Grafana (requests/s, latency quantiles, fallback share).

Fed by `RequestMetrics` beside its Ray metrics; bounded (a ring of the latest `capacity` requests).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LiveSnapshot:
    window_seconds: float
    requests: int
    requests_per_second: float
    errors: int  # answered 4xx/5xx
    p50_ms: float | None
    p99_ms: float | None
    served: int
    fallbacks: dict[str, int]
    fallback_share: float | None  # served lists with a fallback / served lists


def quantile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values (None when empty)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class LiveWindow:
    """The latest requests of one route: (time, status, milliseconds), and fallbacks per list."""

    window_seconds: float = 60.0
    capacity: int = 20_000
    clock: Callable[[], float] = time.monotonic
    _requests: deque[tuple[float, int, float]] = field(default_factory=deque)
    _served: deque[tuple[float, str | None]] = field(default_factory=deque)

    def request(self, status: int, milliseconds: float) -> None:
        self._push(self._requests, (self.clock(), status, milliseconds))

    def served(self, fallback: str | None) -> None:
        self._push(self._served, (self.clock(), fallback))

    def _push(self, ring: deque[Any], entry: tuple[Any, ...]) -> None:
        ring.append(entry)
        if len(ring) > self.capacity:
            ring.popleft()

    def _trim(self, now: float) -> None:
        start = now - self.window_seconds
        for ring in (self._requests, self._served):
            while ring and ring[0][0] < start:
                ring.popleft()

    def snapshot(self) -> LiveSnapshot:
        now = self.clock()
        self._trim(now)
        requests = list(self._requests)
        latencies = sorted(ms for _, status, ms in requests if status < 400)
        # Over the part of the window that has data: a replica started 10 s ago is not 6x idle.
        span = min(self.window_seconds, now - requests[0][0]) if requests else self.window_seconds
        fallbacks = Counter(f for _, f in self._served if f is not None)
        served = len(self._served)
        return LiveSnapshot(
            window_seconds=self.window_seconds,
            requests=len(requests),
            requests_per_second=len(requests) / max(span, 1.0),
            errors=sum(1 for _, status, _ in requests if status >= 400),
            p50_ms=quantile(latencies, 0.50),
            p99_ms=quantile(latencies, 0.99),
            served=served,
            fallbacks=dict(fallbacks),
            fallback_share=sum(fallbacks.values()) / served if served else None,
        )
