"""The per-key rate limit: a token bucket per API key, in each Ingress replica (`serve_app.access`
applies it after the key's scope; `api.rate_limit` sets it). Pure: time comes from an injectable clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

# --- rate limit ----------------------------------------------------------------------------------


class TokenBucket:
    """`rate` requests a second sustained, `burst` at once: a request takes a token; tokens refill
    continuously up to `burst`. Time comes from `clock` (monotonic seconds)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> float:
        """0.0 when the request may go, else the seconds until a token is there."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


def retry_after_header(wait_seconds: float) -> str:
    """Retry-After in whole seconds, at least 1 (the header takes integers)."""
    return str(max(1, math.ceil(wait_seconds)))


class RateLimiter:
    """One `TokenBucket` per API key, by the key's digest (a rotated key starts afresh); buckets of
    keys no longer accepted are dropped by `forget_except`, so their number is bounded by the keys."""

    def __init__(
        self, rate: float, burst: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self._clock = clock
        self._buckets: dict[bytes, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def wait(self, key: bytes) -> float:
        """0.0 when `key` (a key's digest) may send this request now, else the seconds to wait."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
        return bucket.take()

    def forget_except(self, digests: Iterable[bytes]) -> None:
        keep = set(digests)
        for digest in [d for d in self._buckets if d not in keep]:
            del self._buckets[digest]
