"""Every metric of the online graph, defined once with its help text (exported by Ray's Prometheus endpoint).

Created in replica constructors (Ray Serve's metrics need a replica context); Serve adds the
`deployment`, `replica` and `application` tags itself, and Ray's exporter prefixes each name with `ray_`:
`recserve_http_requests_total` is scraped as `ray_recserve_http_requests_total` from the metrics port of
every Ray node. `CATALOG` lists every metric: the Grafana dashboards and alert rules in `monitoring/`
are checked against it. Counters with known label values start at 0 (`zero`), so that a rate or a ratio
is 0 rather than absent before the first event. Variant-tagged metrics carry the A/B variant that
served the request (`experiment.variants`); the shadow metrics are tagged with the served variant whose
requests were mirrored and get observations once a shadow version is mirrored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ray.serve import metrics

from serve_app.live import LiveWindow

# Ray's Prometheus exporter puts this in front of every application metric name.
EXPORT_PREFIX = "ray_"

# Milliseconds: fine-grained below the 50 ms budget, coarse above it.
LATENCY_BUCKETS_MS = (
    0.5,
    1,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    40,
    50,
    75,
    100,
    150,
    250,
    500,
    1000,
    2500,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000)
# Seconds since a user's last real-time update: a minute to a month.
AGE_BUCKETS_S = (1, 10, 60, 300, 900, 3600, 14_400, 86_400, 604_800, 2_592_000)
OVERLAP_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

Kind = Literal["counter", "gauge", "histogram"]
FALLBACK_REASONS = ("cold_start", "degraded", "model_missing")
ATTRIBUTED_TYPES = ("click", "add_to_cart", "purchase")
SHADOW_ERROR_REASONS = ("error", "timeout", "unavailable")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name before Ray's prefix, kind, help text, tag keys and histogram buckets."""

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes."""
        return EXPORT_PREFIX + self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name it exports (a histogram has three)."""
        if self.kind == "histogram":
            return tuple(f"{self.exported}_{s}" for s in ("bucket", "sum", "count"))
        return (self.exported,)


def _spec(
    name: str, kind: Kind, description: str, *tags: str, boundaries: Iterable[float] = ()
) -> MetricSpec:
    return MetricSpec(name, kind, description, tuple(tags), tuple(boundaries))


# --- the catalog ---------------------------------------------------------------------------------

HTTP_REQUESTS = _spec(
    "recserve_http_requests_total",
    "counter",
    "HTTP requests by route and status code.",
    "route",
    "status",
)
HTTP_LATENCY = _spec(
    "recserve_http_latency_ms",
    "histogram",
    "Time from request parsed to response built, by route and status code.",
    "route",
    "status",
    boundaries=LATENCY_BUCKETS_MS,
)
HTTP_REFUSED = _spec(
    "recserve_http_refused_total",
    "counter",
    "Requests refused by access control (api.auth), by route group (recommendations, events, "
    "admin, experiments, demo, docs, other), status (401: no or an unknown API key; 403: the key "
    "lacks the route's scope, or explain is off; 429: the key's rate limit) and key (the name in "
    "the keys file; empty for 401).",
    "route",
    "status",
    "key",
)
KEY_FILE_ERRORS = _spec(
    "recserve_auth_key_file_errors_total",
    "counter",
    "Times the API keys file (api.auth.keys_file) was found changed but could not be read or "
    "parsed; the Ingress replica keeps the keys it read before.",
)
RECOMMENDATIONS = _spec(
    "recserve_recommendations_total",
    "counter",
    "Recommendation responses served, by variant.",
    "variant",
)
IMPRESSIONS = _spec(
    "recserve_impressions_total",
    "counter",
    "Items returned in recommendation responses, by variant.",
    "variant",
)
CLICKS = _spec(
    "recserve_clicks_total",
    "counter",
    "New click events, by the variant that served the clicked list (else the user's variant).",
    "variant",
)
ATTRIBUTED_EVENTS = _spec(
    "recserve_attributed_events_total",
    "counter",
    "New events credited to the A/B variant whose response they follow (by request id, or the user's "
    "latest response within the attribution window), by event type.",
    "variant",
    "event_type",
)
FALLBACKS = _spec(
    "recserve_fallbacks_total",
    "counter",
    "Recommendation requests answered by a fallback path: cold_start (popularity for an unknown "
    "user), degraded (a feature read failed), model_missing (no model loaded: 503).",
    "variant",
    "reason",
)
EVENTS_ACCEPTED = _spec(
    "recserve_events_accepted_total",
    "counter",
    "Events accepted into the event log or its local spool (retries included), by event type.",
    "event_type",
)
EVENTS_DUPLICATE = _spec(
    "recserve_events_duplicate_total",
    "counter",
    "Accepted events recognised as retries by their event id and not applied twice.",
)
EVENTS_REJECTED = _spec(
    "recserve_events_rejected_total",
    "counter",
    "Events refused, by reason: the validation error type of the event, too_many_events, "
    "unavailable (the event log could not be written: 503) or spool_full (Redis unavailable and "
    "the local spool full: 503).",
    "reason",
)
MODEL_INFO = _spec(
    "recserve_model_info",
    "gauge",
    "1 for the registry version a variant serves (0 for a moment for the one it replaced).",
    "variant",
    "model_version",
)
MODEL_READY = _spec(
    "recserve_model_ready",
    "gauge",
    "1 when the router has a loaded version for the variant, else 0 (requests get 503).",
    "variant",
)
MODEL_SWAPS = _spec(
    "recserve_model_swaps_total",
    "counter",
    "Versions made current (the first load and every hot swap).",
    "variant",
)
MODEL_REFUSED = _spec(
    "recserve_model_refused_total",
    "counter",
    "Versions refused (verification, contract or load failure); the previous one keeps serving.",
    "variant",
)
SHADOW_REQUESTS = _spec(
    "recserve_shadow_requests_total",
    "counter",
    "Requests mirrored to the variant's shadow version.",
    "variant",
)
SHADOW_ERRORS = _spec(
    "recserve_shadow_errors_total",
    "counter",
    "Mirrored requests the shadow version failed (error, timeout, unavailable: no loaded shadow version); never seen by users.",
    "variant",
    "reason",
)
SHADOW_OVERLAP = _spec(
    "recserve_shadow_overlap",
    "histogram",
    "Top-k overlap (Jaccard) of the shadow version's list with the served list (0..1).",
    "variant",
    boundaries=OVERLAP_BUCKETS,
)
SHADOW_RBO = _spec(
    "recserve_shadow_rbo",
    "histogram",
    "Rank-biased overlap (p = 0.9) of the shadow version's list with the served list (0..1).",
    "variant",
    boundaries=OVERLAP_BUCKETS,
)
SHADOW_LATENCY = _spec(
    "recserve_shadow_latency_ms",
    "histogram",
    "Time the shadow version took for a mirrored request (the served time is stage=graph).",
    "variant",
    boundaries=LATENCY_BUCKETS_MS,
)
STAGE_LATENCY = _spec(
    "recserve_stage_latency_ms",
    "histogram",
    "Time a stage spent on one request or batch (its own work, no queueing).",
    "stage",
    boundaries=LATENCY_BUCKETS_MS,
)
STAGE_ERRORS = _spec(
    "recserve_stage_errors_total",
    "counter",
    "Requests a stage failed (the router answered around it, flagged degraded), by cause: "
    "timeout, unavailable (dead or restarting replica), error.",
    "stage",
    "code",
)
STAGE_BATCH_SIZE = _spec(
    "recserve_stage_batch_size",
    "histogram",
    "Requests per batch: stage=ingress, those the Ingress sends into the graph at once; a stage, "
    "those it processes at once (the batches that reached it while it was busy, merged).",
    "stage",
    boundaries=BATCH_BUCKETS,
)
STAGE_BATCHED_REQUESTS = _spec(
    "recserve_stage_batched_requests_total",
    "counter",
    "Requests carried by the batches recserve_stage_batch_size counts, by stage: its rate over that "
    "histogram's _count rate is the mean batch size, exactly (Ray rebuilds a histogram's _sum from "
    "bucket midpoints: a batch of 1 adds 0.5 there).",
    "stage",
)
CANDIDATES = _spec(
    "recserve_candidates_retrieved",
    "histogram",
    "Candidates per request handed to the ranker, by source (retrieval: the index; "
    "collaborative: the bundle's item-item models; popularity).",
    "source",
    boundaries=CANDIDATE_BUCKETS,
)
REALTIME_AGE = _spec(
    "recserve_feature_realtime_age_seconds",
    "histogram",
    "Time since the last real-time feature update of each served user that has real-time state.",
    boundaries=AGE_BUCKETS_S,
)
MATERIALIZED = _spec(
    "recserve_feature_materialized_timestamp_seconds",
    "gauge",
    "End of the newest materialization of a batch feature view (epoch seconds, Feast registry).",
    "feature_view",
)
STREAM_LENGTH = _spec(
    "recserve_event_stream_length", "gauge", "Entries in the event stream (Redis XLEN)."
)
CONSUMER_LAG = _spec(
    "recserve_event_consumer_lag",
    "gauge",
    "Stream entries not yet delivered to a consumer group.",
    "group",
)
CONSUMER_PENDING = _spec(
    "recserve_event_consumer_pending",
    "gauge",
    "Stream entries delivered to a consumer group and not acknowledged yet.",
    "group",
)
CONSUMER_LAG_SECONDS = _spec(
    "recserve_event_consumer_lag_seconds",
    "gauge",
    "Age of the oldest stream entry a consumer group has not acknowledged (0: caught up).",
    "group",
)
SPOOLED_EVENTS = _spec(
    "recserve_events_spooled_total",
    "counter",
    "Accepted events written to the EventWriter's local spool because the event log (Redis) was "
    "unavailable or the spool still held older events; replayed when Redis answers again.",
)
REPLAYED_EVENTS = _spec(
    "recserve_events_replayed_total",
    "counter",
    "Spooled events replayed into the event log, by outcome: applied, duplicate (its event id was "
    "already in Redis: not applied twice), damaged (a spool line that failed its checks: skipped).",
    "outcome",
)
SPOOL_BYTES = _spec(
    "recserve_event_spool_bytes",
    "gauge",
    "Size of the EventWriter replica's spool file (0: empty, events go straight to Redis).",
)
SPOOL_CAPACITY = _spec(
    "recserve_event_spool_capacity_bytes",
    "gauge",
    "Bound of the spool file (event_spool.max_bytes); past it events are refused with 503.",
)
REPLAY_OUTCOMES = ("applied", "duplicate", "damaged")

CATALOG: tuple[MetricSpec, ...] = (
    HTTP_REQUESTS,
    HTTP_LATENCY,
    HTTP_REFUSED,
    KEY_FILE_ERRORS,
    RECOMMENDATIONS,
    IMPRESSIONS,
    CLICKS,
    ATTRIBUTED_EVENTS,
    FALLBACKS,
    EVENTS_ACCEPTED,
    EVENTS_DUPLICATE,
    EVENTS_REJECTED,
    MODEL_INFO,
    MODEL_READY,
    MODEL_SWAPS,
    MODEL_REFUSED,
    SHADOW_REQUESTS,
    SHADOW_ERRORS,
    SHADOW_OVERLAP,
    SHADOW_RBO,
    SHADOW_LATENCY,
    STAGE_LATENCY,
    STAGE_ERRORS,
    STAGE_BATCH_SIZE,
    STAGE_BATCHED_REQUESTS,
    CANDIDATES,
    REALTIME_AGE,
    MATERIALIZED,
    STREAM_LENGTH,
    CONSUMER_LAG,
    CONSUMER_PENDING,
    CONSUMER_LAG_SECONDS,
    SPOOLED_EVENTS,
    REPLAYED_EVENTS,
    SPOOL_BYTES,
    SPOOL_CAPACITY,
)


def create(spec: MetricSpec) -> Any:
    """The Ray Serve metric of a spec (in a replica: Serve adds its own tags)."""
    # Ray annotates tag_keys as a one-element tuple; any tuple of names is accepted.
    tags: Any = spec.tag_keys
    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=tags)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.description, tag_keys=tags)
    return metrics.Histogram(
        spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=tags
    )


def zero(counter: metrics.Counter, tags: Mapping[str, str] | None = None) -> None:
    """Export a counter series at 0 before its first increment.

    Prometheus practice for known label values: rate() and ratios read 0 instead of nothing.
    Ray's public `inc` refuses 0, so this records through the base class.
    """
    counter._record(0, tags=dict(tags) if tags else None)


# --- per deployment ------------------------------------------------------------------------------


class StageMetrics:
    """Per stage: time spent in the stage's own work, its failures by error code, batch sizes."""

    def __init__(self, stage: str) -> None:
        self.latency = create(STAGE_LATENCY)
        self.errors = create(STAGE_ERRORS)
        self.batch_size = create(STAGE_BATCH_SIZE)
        self.batched = create(STAGE_BATCHED_REQUESTS)
        # Serve's set_default_tags returns None (Ray's returns the metric): no chaining.
        for metric in (self.latency, self.errors, self.batch_size, self.batched):
            metric.set_default_tags({"stage": stage})

    def observe(self, milliseconds: float) -> None:
        self.latency.observe(milliseconds)

    def observe_batch(self, size: int) -> None:
        """One batch of `size` requests: the histogram and the exact request count beside it."""
        self.batch_size.observe(size)
        if size > 0:
            self.batched.inc(size)

    def observe_timings(self, timings: Iterable[tuple[str, float]]) -> None:
        for _, ms in timings:
            self.latency.observe(ms)

    def failed(self, code: str, requests: int = 1) -> None:
        self.errors.inc(requests, tags={"code": code})


class RequestMetrics:
    """At the ingress: requests by route and status, latency, what was served per variant, events."""

    def __init__(self) -> None:
        self.requests = create(HTTP_REQUESTS)
        self.latency = create(HTTP_LATENCY)
        self.recommendations = create(RECOMMENDATIONS)
        self.impressions = create(IMPRESSIONS)
        self.clicks = create(CLICKS)
        self.attributed = create(ATTRIBUTED_EVENTS)
        self.fallbacks = create(FALLBACKS)
        self.events_accepted = create(EVENTS_ACCEPTED)
        self.events_duplicate = create(EVENTS_DUPLICATE)
        self.events_rejected = create(EVENTS_REJECTED)
        self.http_refused = create(HTTP_REFUSED)
        self.key_file_errors = create(KEY_FILE_ERRORS)
        self.live = LiveWindow()  # recommendations of the last minute, for /demo/ops

    def start(self, variants: Iterable[str]) -> None:
        """Series of the known label values at 0 (every variant of the experiment)."""
        for variant in variants:
            for reason in FALLBACK_REASONS:
                zero(self.fallbacks, {"variant": variant, "reason": reason})
            zero(self.clicks, {"variant": variant})
            for event_type in ATTRIBUTED_TYPES:
                zero(self.attributed, {"variant": variant, "event_type": event_type})
        zero(self.events_duplicate)
        zero(self.key_file_errors)

    def observe(self, route: str, status: int, milliseconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe(milliseconds, tags=tags)
        if route == "recommendations":
            self.live.request(status, milliseconds)

    def counted(self, route: str, status: int) -> None:
        """A request refused before its handler ran (invalid body): counted, not timed."""
        self.requests.inc(tags={"route": route, "status": str(status)})

    def refused(self, route: str, status: int, key: str) -> None:
        """A request access control refused (401, 403, 429); `route` a route group, `key` a
        name from the keys file (bounded) or "" when none was recognised. The request routes
        also count it in the requests by status."""
        self.http_refused.inc(tags={"route": route, "status": str(status), "key": key})
        if route in ("recommendations", "events"):
            self.counted(route, status)

    def key_file_error(self, reason: str) -> None:
        """The keys file changed into something unreadable (the reason goes to the log only)."""
        self.key_file_errors.inc()

    def served(self, variant: str, items: int, fallback: str | None) -> None:
        self.recommendations.inc(tags={"variant": variant})
        self.live.served(fallback)
        if items:  # Ray counters refuse increments of 0
            self.impressions.inc(items, tags={"variant": variant})
        if fallback is not None:
            self.fallback(fallback, variant)

    def fallback(self, reason: str, variant: str) -> None:
        self.fallbacks.inc(tags={"variant": variant, "reason": reason})

    def events(
        self,
        accepted: Mapping[str, int],
        rejected: Mapping[str, int],
        duplicates: int = 0,
        clicks: Mapping[str, int] | None = None,
        attributed: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """One events request: accepted per event type, rejected per reason, retries among them,
        new clicks per variant (the one that served the clicked list, else the user's)."""
        for event_type, count in accepted.items():
            if count:
                self.events_accepted.inc(count, tags={"event_type": event_type})
        for variant, count in (clicks or {}).items():
            if count:
                self.clicks.inc(count, tags={"variant": variant})
        for (variant, event_type), count in (attributed or {}).items():
            if count:
                self.attributed.inc(count, tags={"variant": variant, "event_type": event_type})
        for reason, count in rejected.items():
            if count:
                self.events_rejected.inc(count, tags={"reason": reason})
        if duplicates:
            self.events_duplicate.inc(duplicates)


class ModelMetrics:
    """At the router: the version each variant serves, readiness, swaps, refusals, the shadow.

    Ray drops a gauge value that was not set again for two export intervals (~20 s): the router
    calls `refresh` on a timer so that the served version and readiness stay visible.
    """

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.info = create(MODEL_INFO)
        self.ready = create(MODEL_READY)
        self.swaps = create(MODEL_SWAPS)
        self.refused = create(MODEL_REFUSED)
        self.shadow_requests = create(SHADOW_REQUESTS)
        self.shadow_errors = create(SHADOW_ERRORS)
        self.shadow_overlap = create(SHADOW_OVERLAP)
        self.shadow_rbo = create(SHADOW_RBO)
        self.shadow_latency = create(SHADOW_LATENCY)
        self._served: str | None = None
        tags = {"variant": variant}
        zero(self.refused, tags)
        zero(self.shadow_requests, tags)
        for reason in SHADOW_ERROR_REASONS:
            zero(self.shadow_errors, {**tags, "reason": reason})
        self.refresh()

    def refresh(self) -> None:
        """Set the gauges again to what they are."""
        tags = {"variant": self.variant}
        self.ready.set(0 if self._served is None else 1, tags=tags)
        if self._served is not None:
            self.info.set(1, tags={**tags, "model_version": self._served})

    def swapped(self, previous: str | None, current: str) -> None:
        if previous is not None and previous != current:
            # 0 hides it at once; Ray forgets the series once it is no longer refreshed.
            self.info.set(0, tags={"variant": self.variant, "model_version": previous})
        self._served = current
        self.swaps.inc(tags={"variant": self.variant})
        self.refresh()

    def refused_version(self) -> None:
        self.refused.inc(tags={"variant": self.variant})

    def shadow_compared(self, jaccard: float, rbo: float, milliseconds: float) -> None:
        tags = {"variant": self.variant}
        self.shadow_requests.inc(tags=tags)
        self.shadow_overlap.observe(jaccard, tags=tags)
        self.shadow_rbo.observe(rbo, tags=tags)
        self.shadow_latency.observe(milliseconds, tags=tags)

    def shadow_failed(self, reason: str) -> None:
        self.shadow_requests.inc(tags={"variant": self.variant})
        self.shadow_errors.inc(tags={"variant": self.variant, "reason": reason})


class RetrievalMetrics:
    """At the retriever: candidates handed on, from the index, the collaborative models and
    popularity."""

    def __init__(self) -> None:
        self.candidates = create(CANDIDATES)

    def retrieved(self, from_index: int, from_collaborative: int, from_popularity: int) -> None:
        self.candidates.observe(from_index, tags={"source": "retrieval"})
        self.candidates.observe(from_collaborative, tags={"source": "collaborative"})
        self.candidates.observe(from_popularity, tags={"source": "popularity"})


class FeatureMetrics:
    """At the user tower: freshness of what it reads (real-time state, batch materialization)."""

    def __init__(self) -> None:
        self.realtime_age = create(REALTIME_AGE)
        self.materialized = create(MATERIALIZED)

    def realtime_ages(self, seconds: Iterable[float]) -> None:
        for age in seconds:
            self.realtime_age.observe(age)

    def materialized_until(self, ends: Mapping[str, float]) -> None:
        for view, end in ends.items():
            self.materialized.set(end, tags={"feature_view": view})


class EventLogMetrics:
    """At the event writer: the stream's length, each consumer group's backlog, the local spool
    (events spooled and replayed, its size and bound) and the clicks its replay credits."""

    def __init__(self) -> None:
        self.length = create(STREAM_LENGTH)
        self.lag = create(CONSUMER_LAG)
        self.pending = create(CONSUMER_PENDING)
        self.lag_seconds = create(CONSUMER_LAG_SECONDS)
        self.spooled_events = create(SPOOLED_EVENTS)
        self.replayed_events = create(REPLAYED_EVENTS)
        self.spool_bytes = create(SPOOL_BYTES)
        self.spool_capacity = create(SPOOL_CAPACITY)
        # Replayed events reach the ingress's counters from here (same series, this deployment).
        self.clicks = create(CLICKS)
        self.attributed = create(ATTRIBUTED_EVENTS)
        zero(self.spooled_events)
        for outcome in REPLAY_OUTCOMES:
            zero(self.replayed_events, {"outcome": outcome})

    def spool_size(self, size: int, capacity: int) -> None:
        self.spool_bytes.set(size)
        self.spool_capacity.set(capacity)

    def spooled(self, events: int, size: int, capacity: int) -> None:
        if events:
            self.spooled_events.inc(events)
        self.spool_size(size, capacity)

    def replayed(self, applied: int, duplicates: int, damaged: int) -> None:
        for outcome, count in zip(REPLAY_OUTCOMES, (applied, duplicates, damaged), strict=True):
            if count:
                self.replayed_events.inc(count, tags={"outcome": outcome})

    def replayed_clicks(
        self, clicks: Mapping[str, int], attributed: Mapping[tuple[str, str], int]
    ) -> None:
        for variant, count in clicks.items():
            if count:
                self.clicks.inc(count, tags={"variant": variant})
        for (variant, event_type), count in attributed.items():
            if count:
                self.attributed.inc(count, tags={"variant": variant, "event_type": event_type})

    def stream_length(self, entries: int) -> None:
        self.length.set(entries)

    def group(self, name: str, undelivered: int | None, pending: int, lag_seconds: float) -> None:
        tags = {"group": name}
        if undelivered is not None:
            self.lag.set(undelivered, tags=tags)
        self.pending.set(pending, tags=tags)
        self.lag_seconds.set(lag_seconds, tags=tags)
