"""The Redis client every serving process uses (light: no Feast import, unlike serve_app.features)."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["connect_redis"]


def connect_redis(url: str, timeout_seconds: float) -> redis.Redis:
    """A client that fails fast: short socket timeouts and a single immediate retry (a stale
    pooled connection), never redis-py's default backoff of ten retries."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
