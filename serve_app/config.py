"""Serving settings: the one place serve_app's defaults live, created once at the edge and passed down.

Sources, highest first: explicit arguments, environment variables (`RECSERVE_*`, nested with `__`, e.g.
`RECSERVE_REALTIME__EMA_RATE=0.2`), the defaults here. `REDIS_URL` (the conventional name) is accepted
for `redis_url`, `MLFLOW_TRACKING_URI` for the registry. Sections: the feature store (Feast profile), the
real-time state, the event log and its local spool (`event_spool`), the model registry (`models`), ranking knobs (`ranking`) and the HTTP
API (`api`). Batching is a deployment's `user_config` (`StageConfig`, serve_config.yaml).

Deployment options (replicas, autoscaling, queues, CPUs) are not settings of the graph but of Ray Serve:
they live in `serve_config.yaml` beside this module, and `serve_config(environ, placement=...)` picks
the placement's deployments (`placement`, serve_app/placement.py) and applies the
`RECSERVE_DEPLOYMENT__<NAME>__<OPTION>` and `RECSERVE_HTTP__<OPTION>` environment overrides to it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_repo.config import FeatureStoreConfig
from serve_app.placement import STAGE_DEPLOYMENTS, parse_placement, resolve_placement
from serve_app.schemas import DEFAULT_EVENT_WEIGHTS, EventType, EventWindow

# Where the event log and real-time state go when no Redis URL is configured (a local server).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class RealtimeConfig(BaseModel):
    """Real-time feature state in Redis: written by `serve_app.events`, read by `serve_app.features`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_prefix: str = Field(
        "recserve:rt", min_length=1, description="prefix of the per-user and per-item Redis hashes"
    )
    history_length: int = Field(
        20, ge=1, description="recent items kept per user (the user tower's history length)"
    )
    ema_rate: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="EMA rate of the delta embedding for an event of weight 1 (a click)",
    )
    event_weights: dict[EventType, float] = Field(
        default_factory=lambda: {EventType(k): v for k, v in DEFAULT_EVENT_WEIGHTS.items()},
        description="EMA weight per event type; rate * weight is capped at 1",
    )
    user_state_ttl_seconds: int = Field(
        30 * 86_400,
        ge=3_600,
        description="an idle user's real-time state expires after this (users of the training "
        "data: the served bundle's known users)",
    )
    cold_user_ttl_seconds: int = Field(
        86_400,
        ge=3_600,
        description="the same for a user the served bundle never saw in training (cold): anyone "
        "may invent user ids, so their state goes sooner. A bundle without a known-users list "
        "(older than this setting) counts every user as known",
    )
    item_state_ttl_seconds: int = Field(
        2 * 3_600, ge=3_600, description="idle item counters expire after this (>= the 1 h window)"
    )
    breaker_cooldown_seconds: float = Field(
        1.0,
        ge=0.0,
        description="after a Redis failure, reads skip Redis (serving defaults) for this long",
    )

    @field_validator("event_weights")
    @classmethod
    def _non_negative(cls, value: dict[EventType, float]) -> dict[EventType, float]:
        if any(w < 0 for w in value.values()):
            raise ValueError("event weights must be >= 0")
        return value


class EventLogConfig(BaseModel):
    """The durable event log: a Redis Stream drained into Parquet by `training.exporter`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stream_key: str = Field("recserve:events", min_length=1, description="Redis Stream key")
    dedupe_ttl_seconds: int = Field(
        3_600,
        ge=1,
        description="how long an event id (the client's event_id, else the content id) is "
        "remembered: a retry within it is not applied twice (one small Redis key per event)",
    )
    stream_maxlen: int | None = Field(
        1_000_000,
        ge=1_000,
        description="cap on the stream length (XADD MAXLEN ~, approximate: Redis trims whole "
        "nodes, so the stream may hold a little more). The exporter trims what it exported, so "
        "the stream only nears the cap when the exporter lags by that many entries; older "
        "entries not yet exported are then lost. The exporter lag alerts fire long before "
        "(~250 bytes an entry: 1M entries ~ 250 MB of Redis). None: unbounded",
    )


class SpoolConfig(BaseModel):
    """The EventWriter's local spool (`serve_app.spool`): accepted events go there while the event
    log is unavailable (answered 202 with `spooled`) and are replayed in order, deduplicated by
    event id, when it answers again. Replays are deduplicated by the event log's `seen` markers:
    keep `event_log.dedupe_ttl_seconds` longer than the longest outage to ride out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="spool events while Redis is down; False: answer 503 (retry) instead"
    )
    directory: Path | None = Field(
        None,
        description="spool directory (a volume that outlives the process: the chart mounts one); "
        "None: <feature_store.data_dir>/event_spool",
    )
    max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=64 * 1024,
        description="bound of one replica's spool file (~250 bytes an event); a batch that does "
        "not fit is refused whole: 503 event_spool_full with Retry-After",
    )
    retry_after_seconds: int = Field(
        5, ge=1, description="Retry-After of the 503 answered when the spool is full"
    )
    replay_batch_events: int = Field(
        500, ge=1, le=10_000, description="events per Redis round trip while replaying"
    )
    probe_interval_seconds: float = Field(
        0.5, gt=0.0, le=30.0, description="how often Redis is retried while the spool waits"
    )


DEFAULT_MODEL_URI = "models:/recserve@champion"
_MODEL_URI = re.compile(r"^models:/([A-Za-z0-9_.\-]+)@([A-Za-z0-9_.\-]+)$")


class ModelRegistryConfig(BaseModel):
    """Which registered model and alias the graph serves, where bundles are cached, how often the
    alias is re-resolved (a change is hot-swapped once every stage has loaded the new version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(
        DEFAULT_MODEL_URI, description="served model as models:/<registered name>@<alias>"
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking/registry URI; None: MLFLOW_TRACKING_URI, else "
        "sqlite:///<data_dir>/mlflow.db (training's default)",
    )
    cache_dir: Path | None = Field(
        None,
        description="local bundle cache, one verified directory per version; None: "
        "<data_dir>/bundle_cache",
    )
    poll_interval_seconds: float = Field(
        30.0, gt=0.0, description="how often the alias is re-resolved"
    )
    warm_timeout_seconds: float = Field(
        120.0, gt=0.0, description="how long every stage may take to load a new version"
    )
    registry_process_timeout_seconds: float = Field(
        300.0,
        gt=0.0,
        description="how long a stage replica's registry child process (downloading a bundle "
        "not yet cached) may take before it is killed",
    )
    allow_untagged: bool = Field(
        False,
        description="serve model versions that have no recserve.manifest_sha256 tag (registered "
        "before recserve recorded manifest digests, or by hand) without pinning their manifest; "
        "false: such a version is refused (the previous one keeps serving)",
    )

    @field_validator("uri")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        if not _MODEL_URI.match(value):
            raise ValueError("expected models:/<name>@<alias> (letters, digits, _ . -)")
        return value

    @property
    def model_name(self) -> str:
        match = _MODEL_URI.match(self.uri)
        assert match is not None  # checked by the validator
        return match.group(1)

    @property
    def alias(self) -> str:
        match = _MODEL_URI.match(self.uri)
        assert match is not None
        return match.group(2)


class RankingConfig(BaseModel):
    """Retrieval, cold-start and re-ranking knobs. Runtime-tunable: a deployment's `user_config`
    (serve_config.yaml) overrides these fields without restarting replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: int | None = Field(
        None,
        ge=1,
        le=2_000,
        description="retrieval candidates ranked per request; None: the bundle's training value "
        "(manifest params ranker.candidates), so that the ranker sees what it was trained on",
    )
    popularity_candidates: int = Field(
        50, ge=0, le=1_000, description="popularity candidates merged in for light and cold users"
    )
    cold_start_min_events: int | None = Field(
        None,
        ge=0,
        description="a user with fewer positive interactions gets a blend of popularity and "
        "retrieval (retrieval weight = interactions / this); none at all: popularity only. "
        "None: the bundle's value (manifest params cold_start.min_events, chosen in training)",
    )
    delta_weight: float = Field(
        0.5,
        ge=0.0,
        description="weight of the real-time delta embedding added to the user tower's output",
    )
    mmr_lambda: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="MMR trade-off: 1 = pure ranker order, lower = more diverse",
    )
    max_category_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="at most ceil(share * k) items of one category per response (1: no cap)",
    )
    exact_filter_below: int = Field(
        20_000,
        ge=0,
        description="a request whose filters leave fewer items than this is searched exactly over "
        "those items (one matrix product) instead of searching the index with a selector, which "
        "loses recall when few items pass: at 1M items x 128 dims (bench/index_recall.py "
        "--filtered-shares) IVF + selector finds 0.82 of the top-100 with 2k items allowed, "
        "exact 1.0 in 1.0 ms p50 (20k allowed: 3.3 ms; 50k: 7.0 ms, where the selector is exact "
        "in 3.4 ms); HNSW + selector loses more (0.84 at 2% allowed, 100k items)",
    )


class BatchOptions(BaseModel):
    """How one deployment groups work into batches (`serve_app.batching.Batcher`): its Serve
    `user_config` (serve_config.yaml, the Helm values), applied by `reconfigure` without a restart.

    The Ingress groups requests; each stage merges the batches that reach it while it is busy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(
        32, ge=1, le=1_024, description="requests per batch at most (a stage: summed over calls)"
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="how long a batch waits for company after its first request: the latency "
        "added at low load (under load batches fill while the previous ones run)",
    )
    max_concurrent_batches: int = Field(
        2, ge=1, le=64, description="batches in flight at once: the next one fills meanwhile"
    )
    max_pending: int | None = Field(
        None,
        ge=1,
        description="requests waiting for a batch at most; beyond, a request is refused at once "
        "(503 overloaded, Retry-After) instead of queueing. None: unbounded",
    )
    max_wait_s: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        description="longest wait for a batch a request is let in to: a request that would wait "
        "longer (the requests queued ahead of it times the measured busy seconds per request) is "
        "refused at once (503 overloaded, Retry-After), so that under overload the accepted keep "
        "their latency and the queue stays short; only while the queue stands (standing_queue_s), "
        "never behind a stalled batch (a failed stage held to its deadline). A request finding the "
        "queue empty is always taken. None: no bound but max_pending",
    )
    standing_queue_s: float = Field(
        0.1,
        ge=0.0,
        le=10.0,
        description="how long the queue must stand before max_wait_s refuses: the batcher never "
        "idle and every batch cut finding more than half of max_wait_s of work waiting. A burst (a "
        "pause, a client's spike) that clears sooner is queued, not refused; sustained overload is "
        "refused after this long",
    )


class StageConfig(BaseModel):
    """A deployment's Serve `user_config`: its batching, and (stages) RankingConfig overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batching: BatchOptions = Field(default_factory=BatchOptions)
    ranking: dict[str, Any] = Field(
        default_factory=dict, description="RankingConfig fields overriding the settings' ranking"
    )


class AuthConfig(BaseModel):
    """API keys with scopes (`serve_app.auth`; docs/security.md): off by default, so that a local
    run and the README's curl commands need no key; the chart turns it on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False,
        description="every route but /healthz and /readyz needs an API key with the route's scope "
        "(401 without a known key, 403 without the scope)",
    )
    keys_file: Path | None = Field(
        None,
        description='JSON {"keys": [{"name", "sha256", "scopes"}]} (hashed keys: `recserve-serve '
        "keys hash`), re-read when it changes (a Kubernetes Secret volume: /etc/recserve/api-keys/"
        "keys.json); a file that does not parse keeps the keys read before",
    )
    check_interval_seconds: float = Field(
        1.0, gt=0.0, le=60.0, description="how often the keys file is checked for a change (stat)"
    )


class RateLimitConfig(BaseModel):
    """A token bucket per API key, per Ingress replica (with N replicas a key gets up to N times
    the rate); only with auth on (without keys there is nothing to limit by)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: float = Field(
        0.0, ge=0.0, description="sustained requests per second per key and replica; 0: no limit"
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="requests a key may send at once after a pause (the bucket's size); None: "
        "requests_per_second rounded up, at least 1",
    )


class ApiConfig(BaseModel):
    """HTTP API limits, authentication, rate limit and the admin key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    admin_api_key: SecretStr | None = Field(
        None,
        description="a key with scope admin: X-API-Key (or Bearer) for /v1/admin/*; with auth off "
        "the only key checked, None: admin routes answer 403; with auth on, one more key of the "
        "keys file (named admin_api_key)",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    explain_enabled: bool = Field(
        True,
        description='`"explain": true` traces (seen items, user vectors) and the demo\'s user '
        "vectors; False: 403 explain_disabled",
    )
    max_body_bytes: int = Field(1 << 20, ge=1_024, description="larger bodies get 413")
    max_events_per_batch: int = Field(1_000, ge=1, description="events per POST /v1/events")
    max_k: int = Field(200, ge=1, le=2_000, description="largest k a request may ask for")
    request_timeout_seconds: float = Field(
        2.0, gt=0.0, description="a recommendation not done by then answers 503"
    )
    event_max_age_seconds: int = Field(
        7 * 86_400,
        ge=60,
        description="an event's timestamp may be at most this old (server time); older: rejected, "
        "naming the field",
    )
    event_max_ahead_seconds: int = Field(
        300,
        ge=0,
        description="an event's timestamp may be at most this far ahead of the server's clock",
    )
    events_timeout_seconds: float = Field(
        5.0,
        gt=0.0,
        description="an event batch the event writer has not taken by then (its replica dead "
        "or restarting) answers 503 events_unavailable with Retry-After; a retry is safe",
    )

    @property
    def event_window(self) -> EventWindow:
        return EventWindow(
            timedelta(seconds=self.event_max_age_seconds),
            timedelta(seconds=self.event_max_ahead_seconds),
        )

    @model_validator(mode="after")
    def _keys_when_auth_is_on(self) -> ApiConfig:
        if self.auth.enabled and self.auth.keys_file is None and self.admin_api_key is None:
            raise ValueError(
                "api.auth.enabled needs api.auth.keys_file (RECSERVE_API__AUTH__KEYS_FILE) or "
                "api.admin_api_key: with neither, no key could ever be accepted"
            )
        return self


class StageDeadlines(BaseModel):
    """How long the router waits for each stage's answer to a batch before it answers from what it
    has (`fallback: degraded`): UserTower missing -> the user as a cold one (popularity, by segment
    when known); Retriever missing -> popularity lists from the ReRanker (else from the Ingress's own
    lists); Ranker missing -> retrieval order; ReRanker missing -> the ranker's order of the
    candidates (the retriever already left out seen and filtered items). Inside a group of stages
    (`placement`) the same deadlines apply to each stage, and a group's hop waits for the sum of its
    stages' (at most half of `api.request_timeout_seconds`, so the fallbacks answer in time). A group that was dead or late is not called again (its requests go straight to the
    fallbacks) until a probe every `cooldown` seconds gets an answer."""

    model_config = ConfigDict(extra="forbid")

    user_tower: float = Field(0.5, gt=0.0, description="seconds")
    retriever: float = Field(0.5, gt=0.0, description="seconds")
    ranker: float = Field(0.5, gt=0.0, description="seconds")
    reranker: float = Field(0.5, gt=0.0, description="seconds")
    cooldown: float = Field(
        1.0,
        ge=0.0,
        description="seconds between probes of a dead or late stage, skipped meanwhile (0: never "
        "skip: every batch tries it and waits out its deadline)",
    )


_LABEL = r"^[A-Za-z0-9_.\-]{1,64}$"
_MODEL_REF = r"^([0-9]+|[A-Za-z0-9_.\-]{1,128})$"


class VariantConfig(BaseModel):
    """One arm of the A/B split: a registry alias (followed, hot-swapped) or a fixed version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_LABEL, description="variant name in responses, metrics and counts")
    model: str | None = Field(
        None,
        pattern=_MODEL_REF,
        description="registry alias (e.g. challenger) or version number of models.uri's registered "
        "model; None: the alias of models.uri",
    )
    weight: float = Field(1.0, ge=0.0, description="relative share of users (0: none)")


class ShadowConfig(BaseModel):
    """Mirror a share of requests to a shadow version, after the response is built, off the
    critical path: its errors and timeouts are counted and logged, never seen by users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None, pattern=_MODEL_REF, description="alias or version mirrored to; None: no shadow"
    )
    share: float = Field(0.0, ge=0.0, le=1.0, description="share of requests mirrored")
    timeout_seconds: float = Field(1.0, gt=0.0, description="a slower shadow counts as timeout")
    max_in_flight: int = Field(
        4,
        ge=1,
        description="mirrored requests running at once per router replica; beyond it a request "
        "is not mirrored (counted as skipped), so a slow shadow cannot pile up work",
    )
    log_max_entries: int = Field(
        100_000, ge=100, description="comparisons kept in the shadow log stream (approximate cap)"
    )


class ExperimentConfig(BaseModel):
    """The A/B split, the shadow mirror and attribution (GET /v1/experiments reports them).

    A user's variant is a pure function of (salt, user_id) and the weights: weighted rendezvous
    hashing, sticky across requests, replicas and restarts; raising one weight only moves users into
    that variant. Changing the salt reshuffles everyone (a new experiment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("default", pattern=_LABEL, description="experiment name (Redis keys)")
    salt: str = Field("recserve", min_length=1, max_length=128, description="bucketing salt")
    variants: tuple[VariantConfig, ...] = Field(
        (VariantConfig(name="champion"),), min_length=1, description="the arms and their weights"
    )
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    attribution_window_seconds: float = Field(
        1800.0,
        gt=0.0,
        description="an event is credited to the request it names, or without one to the user's "
        "latest request, if that request was served at most this long ago",
    )
    key_prefix: str = Field("recserve:exp", min_length=1, description="Redis key prefix")

    @model_validator(mode="after")
    def _check_variants(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        if not any(v.weight > 0 for v in self.variants):
            raise ValueError("at least one variant needs a positive weight")
        return self

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return tuple((v.name, v.weight) for v in self.variants)

    def variant_refs(self, default_alias: str) -> dict[str, str]:
        """Registry ref (alias or version) of each variant; `default_alias` where none is named."""
        return {v.name: v.model or default_alias for v in self.variants}

    @property
    def shadow_ref(self) -> str | None:
        """The shadow's registry ref when requests are mirrored at all, else None."""
        return self.shadow.model if self.shadow.share > 0 else None


class MonitoringConfig(BaseModel):
    """What deployments measure on their own schedule rather than per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_interval_seconds: float = Field(
        5.0,
        gt=0.0,
        le=15.0,
        description="how often the event writer samples the stream's backlog, the user tower "
        "re-reads the feature registry's materialization times and the router sets its gauges "
        "again: Ray drops a gauge value not set for two export intervals (~20 s)",
    )


class DemoConfig(BaseModel):
    """The `/demo` page's tables: a catalog to browse and the users to pick from (local files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="serve /demo, /demo/ops and /v1/demo/*")
    catalog_path: Path | None = Field(
        None,
        description="catalog Parquet (item_id, category, price, title); None: the only "
        "datasets/*/catalog.parquet under feature_store.data_dir, else its item_profile table "
        "(no titles)",
    )
    users_path: Path | None = Field(
        None,
        description="Parquet with user_id and event_count; None: feature_store.data_dir's "
        "user_profile table",
    )
    max_users: int = Field(50, ge=1, le=1_000, description="known users offered, most active first")

    def catalog_file(self, data_dir: Path) -> Path:
        if self.catalog_path is not None:
            return self.catalog_path
        found = sorted(data_dir.glob("datasets/*/catalog.parquet"))
        return found[0] if len(found) == 1 else data_dir / "features" / "item_profile.parquet"

    def users_file(self, data_dir: Path) -> Path:
        return self.users_path or data_dir / "features" / "user_profile.parquet"


class ServeSettings(BaseSettings):
    """Everything the serving graph needs; create it once (app builder) and pass sections down."""

    model_config = SettingsConfigDict(
        env_prefix="RECSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "REDIS_URL", "RECSERVE_REDIS_URL"),
        description="Redis for the event log and real-time state (and the online store unless "
        "feature_store says otherwise); None: " + DEFAULT_REDIS_URL,
    )
    redis_timeout_seconds: float = Field(
        0.25, gt=0.0, description="socket timeout of serving's Redis client"
    )
    feature_store: FeatureStoreConfig = Field(default_factory=FeatureStoreConfig)
    realtime: RealtimeConfig = Field(default_factory=RealtimeConfig)
    event_log: EventLogConfig = Field(default_factory=EventLogConfig)
    event_spool: SpoolConfig = Field(default_factory=SpoolConfig)
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "mlflow_tracking_uri", "MLFLOW_TRACKING_URI", "RECSERVE_MLFLOW_TRACKING_URI"
        ),
        description="MLflow tracking URI shared with training (models.tracking_uri wins)",
    )
    models: ModelRegistryConfig = Field(default_factory=ModelRegistryConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    deadlines: StageDeadlines = Field(default_factory=StageDeadlines)
    placement: str | list[list[str]] = Field(
        "split",
        description="how the stages are grouped into deployments (serve_app/placement.py): "
        "'split' (UserTower | Retriever | Ranker | ReRanker), 'two-tier' (Retrieval | Ranking), "
        "'fused' (the whole chain in the Ingress, no hop), or a list of groups of consecutive "
        'stages, e.g. [["user_tower", "retriever", "ranker"], ["reranker"]] (JSON in RECSERVE_PLACEMENT)',
    )

    @field_validator("placement", mode="before")
    @classmethod
    def _valid_placement(cls, value: Any) -> Any:
        parsed = parse_placement(value)  # PlacementError (a ValueError) names the setting
        resolve_placement(parsed)
        return parsed

    @model_validator(mode="before")
    @classmethod
    def _share_redis_url(cls, data: object) -> object:
        # One REDIS_URL configures both the event log and Feast's online store (which then
        # selects the redis profile), unless the feature store names its own.
        if not isinstance(data, dict):
            return data
        url = next(
            (data[k] for k in ("redis_url", "REDIS_URL", "RECSERVE_REDIS_URL") if data.get(k)), None
        )
        if url is None:
            return data
        section = data.get("feature_store")
        if section is None:
            data = {**data, "feature_store": {"redis_url": url}}
        elif isinstance(section, dict) and not section.get("redis_url"):
            data = {**data, "feature_store": {**section, "redis_url": url}}
        return data

    @property
    def event_redis_url(self) -> str:
        """The Redis that holds the event stream and the real-time hashes."""
        return self.redis_url or self.feature_store.redis_url or DEFAULT_REDIS_URL

    @property
    def tracking_uri(self) -> str:
        """The MLflow registry bundles come from (training registers into the same default)."""
        if self.models.tracking_uri:
            return self.models.tracking_uri
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.feature_store.data_dir / 'mlflow.db').resolve()}"

    @property
    def event_spool_dir(self) -> Path:
        return self.event_spool.directory or self.feature_store.data_dir / "event_spool"

    @property
    def bundle_cache_dir(self) -> Path:
        return self.models.cache_dir or self.feature_store.data_dir / "bundle_cache"


# --- Ray Serve deployment options ---------------------------------------------------------------

SERVE_CONFIG_PATH = Path(__file__).with_name("serve_config.yaml")
DEPLOYMENT_ENV_PREFIX = "RECSERVE_DEPLOYMENT__"
HTTP_ENV_PREFIX = "RECSERVE_HTTP__"


def _normalise(name: str) -> str:
    return name.replace("_", "").lower()


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = {}
            target[key] = child
        target = child
    target[path[-1]] = value


def _merged(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def serve_config(
    environ: Mapping[str, str],
    path: Path = SERVE_CONFIG_PATH,
    placement: str | list[list[str]] | None = None,
) -> dict[str, Any]:
    """The Serve config file (a `serve deploy` document) for a placement, with environment
    overrides applied.

    The placement (default: `RECSERVE_PLACEMENT` in `environ`, else `split`) picks the stage
    deployments: the file's options for each group's name (`applications[0].deployments` holds
    split's, `placement_deployments` the other named groups', e.g. `Retrieval`, `Pipeline`); a
    custom group without its own entry takes the options of its first stage's split deployment.
    When the Ingress hosts the stages (`fused`), the file's `fused_ingress` options are merged over
    the Ingress's.
    The document names the placement in its `args.settings`, so `serve run` of it builds the same
    graph. `RECSERVE_DEPLOYMENT__RANKER__MAX_ONGOING_REQUESTS=8` or
    `RECSERVE_DEPLOYMENT__USER_TOWER__AUTOSCALING_CONFIG__MAX_REPLICAS=3` set one option of one
    deployment (names match case- and underscore-insensitively, values are parsed as YAML; a value
    that is not YAML raises ValueError naming the variable; variables without these prefixes are
    never read);
    `RECSERVE_HTTP__PORT=8001` sets an `http_options` field. An override naming a deployment the
    placement does not have raises ValueError rather than being ignored.
    """
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    config: dict[str, Any] = copy.deepcopy(raw)
    app = config["applications"][0]
    if placement is None:
        placement = parse_placement(environ.get("RECSERVE_PLACEMENT", "split"))
    groups = resolve_placement(placement)
    known = {d["name"]: d for d in [*app["deployments"], *config.pop("placement_deployments", [])]}
    stage_names = {*STAGE_DEPLOYMENTS.values()}
    edge = [d for d in app["deployments"] if d["name"] not in stage_names]
    hosted = []
    for group in groups:
        if group.in_ingress:
            continue
        own = known.get(group.name) or known[STAGE_DEPLOYMENTS[group.stages[0]]]
        hosted.append({**copy.deepcopy(own), "name": group.name})
    ingress = edge[0]
    if any(group.in_ingress for group in groups):
        # The Ingress hosts the stages: its own options for that (`fused_ingress` in the file).
        ingress = _merged(ingress, config.get("fused_ingress") or {})
    config.pop("fused_ingress", None)
    app["deployments"] = [ingress, *hosted, *edge[1:]]  # Ingress first, EventWriter last
    app["args"] = {**(app.get("args") or {})}
    app["args"]["settings"] = {**app["args"].get("settings", {}), "placement": placement}
    by_name = {_normalise(d["name"]): d for d in app["deployments"]}
    for key in sorted(environ):
        # Only our own variables: any other (TMUX_PANE=%0 is a YAML directive) is none of ours.
        if not key.startswith((DEPLOYMENT_ENV_PREFIX, HTTP_ENV_PREFIX)):
            continue
        try:
            value = yaml.safe_load(environ[key])
        except yaml.YAMLError as exc:
            raise ValueError(f"{key}: not a YAML value ({exc})") from exc
        if key.startswith(DEPLOYMENT_ENV_PREFIX):
            parts = key[len(DEPLOYMENT_ENV_PREFIX) :].split("__")
            if len(parts) < 2 or not all(parts):
                raise ValueError(f"{key}: expected {DEPLOYMENT_ENV_PREFIX}<NAME>__<OPTION>")
            deployment = by_name.get(_normalise(parts[0]))
            if deployment is None:
                known_names = ", ".join(d["name"] for d in app["deployments"])
                raise ValueError(
                    f"{key}: no deployment named {parts[0]!r} in placement "
                    f"{placement!r} (known: {known_names})"
                )
            _set_path(deployment, [p.lower() for p in parts[1:]], value)
        elif key.startswith(HTTP_ENV_PREFIX):
            parts = key[len(HTTP_ENV_PREFIX) :].split("__")
            _set_path(config.setdefault("http_options", {}), [p.lower() for p in parts], value)
    return config


def deployment_options(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-deployment `.options()` keyword arguments from a Serve config (name removed)."""
    app = config["applications"][0]
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
