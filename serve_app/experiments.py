"""A/B experiments and shadow traffic: sticky bucketing, list overlap, proportions, the Redis record.

Pure and Ray-free (the router, the event writer, the API and the `promote` gate share it):

- `assign_variant(salt, user_id, weights)`: weighted rendezvous hashing. Each variant draws
  `u = hash(salt, user_id, variant)` in (0, 1) and scores `weight / -ln(u)`; the user takes the best
  score. P(variant) = weight / sum(weights); the answer is a pure function of (salt, user_id, weights),
  so it is sticky across requests, replicas and restarts; raising one variant's weight only raises its
  own score, so users move into it and never between the others.
- `shadow_sampled(salt, request_id, share)`: whether a request is mirrored (deterministic by request).
- `jaccard`, `rank_biased_overlap`: how close the shadow's list is to the served one.
- `wilson_interval`, `difference_interval`: the CTR confidence intervals `GET /v1/experiments` and
  `recserve promote` report.
- `ExperimentLog`: the experiment's state in Redis, shared by every replica (below).

Redis layout (every key under `<prefix>:{<experiment>}`: one hash slot, so the Lua script is valid on
Redis Cluster): `req:<request_id>` hash {variant, version, user, ts, clicked} for the attribution
window; `last:<user_id>` the user's latest request id, same window; `counts:<variant>` hash of
impressions, clicked_requests and one counter per event type; `shadow` a capped stream of
comparisons (`recserve-serve shadow-report` reads it).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

# A click on a served list makes it a "clicked request": CTR = clicked requests / impressions.
CLICK = "click"
COUNTED_EVENTS = ("view", "click", "add_to_cart", "purchase", "skip")
_SCALE = float(1 << 53)


def _unit(*parts: str) -> float:
    """A uniform number in (0, 1) from the parts (blake2b; stable across processes and versions)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) / _SCALE


def assign_variant(salt: str, user_id: str, weights: Sequence[tuple[str, float]]) -> str:
    """The user's variant: weighted rendezvous hashing over variants with a positive weight."""
    best_name, best_score = "", -1.0
    for name, weight in weights:
        if weight <= 0:
            continue
        score = weight / -math.log(_unit(salt, user_id, name))
        if score > best_score:
            best_name, best_score = name, score
    if not best_name:
        raise ValueError("no variant has a positive weight")
    return best_name


def shadow_sampled(salt: str, request_id: str, share: float) -> bool:
    """Whether this request is mirrored to the shadow version (share of requests, by request id)."""
    if share <= 0.0:
        return False
    return share >= 1.0 or _unit(salt, "shadow", request_id) < share


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """|A ∩ B| / |A ∪ B| of two lists as sets; two empty lists are identical (1.0)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def rank_biased_overlap(a: Sequence[str], b: Sequence[str], p: float = 0.9) -> float:
    """Extrapolated rank-biased overlap (Webber, Moffat and Zobel 2010, eq. 32) of two rankings.

    1.0 for identical lists, 0.0 for disjoint ones; agreement at the top weighs more (persistence
    `p`: the expected depth a reader looks at is 1 / (1 - p)). Lists may differ in length.
    """
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    a, b = list(dict.fromkeys(a)), list(dict.fromkeys(b))  # a ranking holds an item once
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    s, depth_l = len(short), len(long_)
    seen_s: set[str] = set()
    seen_l: set[str] = set()
    overlap = 0
    overlaps: list[int] = []  # X_d = |short[:d] ∩ long[:d]|, d = 1..depth_l
    for d in range(depth_l):
        if d < s:
            y = short[d]
            overlap += y in seen_l
            seen_s.add(y)
        x = long_[d]
        overlap += x in seen_s
        seen_l.add(x)
        overlaps.append(overlap)
    x_l, x_s = overlaps[depth_l - 1], overlaps[s - 1]
    total = sum(overlaps[d - 1] / d * p**d for d in range(1, depth_l + 1))
    total += sum(x_s * (d - s) / (s * d) * p**d for d in range(s + 1, depth_l + 1))
    extrapolated = ((x_l - x_s) / depth_l + x_s / s) * p**depth_l
    return float(min(1.0, (1 - p) / p * total + extrapolated))


def overlap_at_k(served: Sequence[str], other: Sequence[str]) -> float:
    """Share of the served list that the other list also holds (the shadow overlap histogram)."""
    return len(set(served) & set(other)) / len(served) if served else 1.0


# --- proportions ----------------------------------------------------------------------------------

Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (0, 1) without trials."""
    if trials <= 0:
        return (0.0, 1.0)
    phat = successes / trials
    denom = 1 + z * z / trials
    centre = (phat + z * z / (2 * trials)) / denom
    half = z * math.sqrt(phat * (1 - phat) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def difference_interval(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, z: float = Z95
) -> tuple[float, float, float]:
    """p_b - p_a with Newcombe's hybrid score interval (method 10), built from Wilson intervals."""
    if trials_a <= 0 or trials_b <= 0:
        return (0.0, -1.0, 1.0)
    pa, pb = successes_a / trials_a, successes_b / trials_b
    la, ua = wilson_interval(successes_a, trials_a, z)
    lb, ub = wilson_interval(successes_b, trials_b, z)
    diff = pb - pa
    low = diff - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2)
    high = diff + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)
    return (diff, low, high)


@dataclass(frozen=True)
class VariantCounts:
    """Live counts of one variant: served lists, lists with a click, events attributed to it."""

    impressions: int = 0
    clicked_requests: int = 0
    events: Mapping[str, int] | None = None

    def event(self, kind: str) -> int:
        return int((self.events or {}).get(kind, 0))

    @property
    def ctr(self) -> float:
        return self.clicked_requests / self.impressions if self.impressions else 0.0

    @property
    def ctr_interval(self) -> tuple[float, float]:
        return wilson_interval(self.clicked_requests, self.impressions)

    def ctr_difference(self, treatment: VariantCounts) -> tuple[float, float, float]:
        """CTR of `treatment` minus this (control) variant's: (difference, low, high), the bounds of
        Newcombe's 95% hybrid score interval."""
        return difference_interval(
            self.clicked_requests,
            self.impressions,
            treatment.clicked_requests,
            treatment.impressions,
        )

    def as_dict(self) -> dict[str, Any]:
        low, high = self.ctr_interval
        return {
            "impressions": self.impressions,
            "clicked_requests": self.clicked_requests,
            **{f"{kind}s": self.event(kind) for kind in COUNTED_EVENTS},
            "ctr": self.ctr,
            "ctr_ci95": [low, high],
        }


# --- the Redis record -----------------------------------------------------------------------------

# Per event: credit it to the variant of its request (or of the user's latest request in the window
# when it names none) if that request served this user; a click marks the request clicked once.
_ATTRIBUTE = """
local base = KEYS[1]
local out = {}
for i = 1, #ARGV, 3 do
  local rid, user, kind = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if rid == '' then
    rid = redis.call('GET', base .. ':last:' .. user) or ''
  end
  local variant = ''
  if rid ~= '' then
    local rec = base .. ':req:' .. rid
    local fields = redis.call('HMGET', rec, 'variant', 'user')
    if fields[1] and fields[2] == user then
      variant = fields[1]
      local counts = base .. ':counts:' .. variant
      redis.call('HINCRBY', counts, kind, 1)
      if kind == 'click' and redis.call('HSETNX', rec, 'clicked', '1') == 1 then
        redis.call('HINCRBY', counts, 'clicked_requests', 1)
      end
    end
  end
  out[#out + 1] = variant
end
return out
"""


@dataclass(frozen=True)
class Served:
    """One recommendation response, as the attribution record keeps it."""

    request_id: str
    user_id: str
    variant: str
    version: str


@dataclass(frozen=True)
class ShadowComparison:
    """One mirrored request: the served and the shadow lists compared, or the shadow's error."""

    request_id: str
    variant: str
    served_version: str
    shadow_version: str
    k: int
    served_ms: float
    shadow_ms: float | None
    jaccard: float | None
    rbo: float | None
    error: str | None = None  # "error" | "timeout" | "unavailable"

    def fields(self) -> dict[str, str]:
        return {
            key: (
                "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
            )
            for key, value in self.__dict__.items()
        }

    @classmethod
    def from_fields(cls, raw: Mapping[bytes, bytes]) -> ShadowComparison:
        get = {k.decode(): v.decode() for k, v in raw.items()}

        def num(key: str) -> float | None:
            return float(get[key]) if get.get(key) else None

        return cls(
            request_id=get["request_id"],
            variant=get["variant"],
            served_version=get["served_version"],
            shadow_version=get["shadow_version"],
            k=int(get["k"]),
            served_ms=float(get["served_ms"]),
            shadow_ms=num("shadow_ms"),
            jaccard=num("jaccard"),
            rbo=num("rbo"),
            error=get.get("error") or None,
        )


class ExperimentLog:
    """The experiment's shared state in Redis: who was served what, attributed counts, shadow log."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        experiment: str,
        window_seconds: float,
        shadow_max_entries: int = 100_000,
    ) -> None:
        self._client = client
        self.base = f"{prefix}:{{{experiment}}}"
        self._window = max(1, int(window_seconds))
        self._shadow_max = shadow_max_entries
        self._attribute = client.register_script(_ATTRIBUTE)

    @property
    def shadow_stream(self) -> str:
        return f"{self.base}:shadow"

    def served(self, records: Iterable[Served]) -> None:
        """Remember each response for the attribution window and count its impression."""
        pipe = self._client.pipeline(transaction=False)
        now = f"{time.time():.3f}"
        for r in records:
            req = f"{self.base}:req:{r.request_id}"
            pipe.hset(
                req,
                mapping={"variant": r.variant, "version": r.version, "user": r.user_id, "ts": now},
            )
            pipe.expire(req, self._window)
            pipe.set(f"{self.base}:last:{r.user_id}", r.request_id, ex=self._window)
            pipe.hincrby(f"{self.base}:counts:{r.variant}", "impressions", 1)
        pipe.execute()

    def attribute(self, events: Sequence[tuple[str | None, str, str]]) -> list[str | None]:
        """Credit (request_id, user_id, event_type) events; per event its variant or None."""
        if not events:
            return []
        args: list[str] = []
        for request_id, user_id, kind in events:
            args += [request_id or "", user_id, kind]
        reply: Any = self._attribute(keys=[self.base], args=args)
        return [(v.decode() if isinstance(v, bytes) else str(v)) or None for v in reply]

    def counts(self, variants: Iterable[str]) -> dict[str, VariantCounts]:
        names = list(variants)
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(f"{self.base}:counts:{name}")
        out: dict[str, VariantCounts] = {}
        for name, raw in zip(names, pipe.execute(), strict=True):
            values = {k.decode(): int(v) for k, v in raw.items()}
            out[name] = VariantCounts(
                impressions=values.pop("impressions", 0),
                clicked_requests=values.pop("clicked_requests", 0),
                events=values,
            )
        return out

    def log_shadow(self, comparisons: Iterable[ShadowComparison]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for c in comparisons:
            pipe.xadd(
                self.shadow_stream,
                c.fields(),  # type: ignore[arg-type]
                maxlen=self._shadow_max,
                approximate=True,
            )
        pipe.execute()

    def shadow_log(self, count: int = 100_000) -> list[ShadowComparison]:
        """The latest `count` comparisons, oldest first."""
        entries: Any = self._client.xrevrange(self.shadow_stream, count=count)
        return [ShadowComparison.from_fields(fields) for _, fields in reversed(entries)]


@dataclass(frozen=True)
class ShadowSummary:
    """What the offline comparison prints: how often and how far the shadow differs."""

    mirrored: int
    errors: Mapping[str, int]
    mean_jaccard: float | None
    mean_rbo: float | None
    median_served_ms: float | None
    median_shadow_ms: float | None

    @classmethod
    def of(cls, log: Sequence[ShadowComparison]) -> ShadowSummary:
        ok = [c for c in log if c.error is None]

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        def median(values: list[float]) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            mid = len(ordered) // 2
            return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

        return cls(
            mirrored=len(log),
            errors=dict(Counter(c.error for c in log if c.error is not None)),
            mean_jaccard=mean([c.jaccard for c in ok if c.jaccard is not None]),
            mean_rbo=mean([c.rbo for c in ok if c.rbo is not None]),
            median_served_ms=median([c.served_ms for c in log]),
            median_shadow_ms=median([c.shadow_ms for c in ok if c.shadow_ms is not None]),
        )
