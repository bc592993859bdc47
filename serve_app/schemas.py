"""Shared records: events, catalog items and the API shapes, used by serving and by training."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_ID_LENGTH = 128
# Ids are opaque strings; this set keeps them safe in URLs, Redis keys and logs. Match it whole
# (`is_safe_id`, `fullmatch`): Python's `$` also matches before a final newline. The text is shared
# with pydantic's `pattern=` (Rust regex, where `$` is the end of the text), so it keeps its anchors.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@\-]+$")
# Any timestamp outside [1970, 2262) is refused, whatever the source: Parquet and pandas hold
# nanoseconds in an int64 (up to 2262-04-11), and nothing recserve logs predates the epoch.
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(2262, 1, 1, tzinfo=UTC)
# Validation context key of the accepted timestamp window (`EventWindow.context`).
WINDOW_CONTEXT = "timestamp_window"


class EventType(StrEnum):
    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    SKIP = "skip"


# Default training weight per event type (purchase > add_to_cart > click > view; skip is negative
# feedback and carries no positive weight). Training config may override these.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    EventType.VIEW: 0.2,
    EventType.CLICK: 1.0,
    EventType.ADD_TO_CART: 2.0,
    EventType.PURCHASE: 3.0,
    EventType.SKIP: 0.0,
}
# Events that count as a positive interaction when evaluating (a view is an exposure, not a signal).
POSITIVE_EVENT_TYPES: frozenset[str] = frozenset(
    {EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE}
)

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


def is_safe_id(value: str) -> bool:
    """The whole of `value` is an id: 1..MAX_ID_LENGTH of letters, digits and _ . : @ - (no
    whitespace, no control character, no trailing newline)."""
    return 0 < len(value) <= MAX_ID_LENGTH and ID_PATTERN.fullmatch(value) is not None


def _check_id(value: str) -> str:
    if ID_PATTERN.fullmatch(value) is None:
        raise ValueError("may contain only letters, digits and _ . : @ -")
    return value


@dataclass(frozen=True)
class EventWindow:
    """Event times a client may send: from `max_age` before now to `max_ahead` after it. Older
    events would be counted in windows long closed, far-future ones pin counters and last-event
    times; training data read from files is checked against the absolute bounds only."""

    max_age: timedelta
    max_ahead: timedelta

    def context(self, now: datetime) -> dict[str, tuple[datetime, datetime]]:
        """The validation context (`Event.model_validate(raw, context=...)`) for the time `now`."""
        return {WINDOW_CONTEXT: (now - self.max_age, now + self.max_ahead)}


class EventContext(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str | None = Field(default=None, max_length=32)
    page: str | None = Field(default=None, max_length=128)


class Event(BaseModel):
    """One user interaction with one item."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: Id
    item_id: Id
    event_type: EventType
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
    request_id: Id | None = None
    position: int | None = Field(default=None, ge=0, le=10_000)
    session_id: Id | None = None
    event_id: Id | None = Field(
        default=None,
        description="the client's id of this event (e.g. a UUID), its idempotency key: a retry "
        "with the same event_id (and user_id) is logged and counted once. Without it the event's "
        "content is its id, and a retry counts once only if it carries the same timestamp",
    )
    context: EventContext | None = None

    @field_validator("user_id", "item_id", "request_id", "session_id", "event_id")
    @classmethod
    def _safe_ids(cls, value: str | None) -> str | None:
        return None if value is None else _check_id(value)

    @field_validator("timestamp")
    @classmethod
    def _bounded_utc(cls, value: datetime, info: ValidationInfo) -> datetime:
        # Naive timestamps are taken as UTC so that ordering never depends on the host's zone.
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        if not EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP:
            raise ValueError(
                f"must be in [{EARLIEST_TIMESTAMP.isoformat()}, {LATEST_TIMESTAMP.isoformat()})"
            )
        window = (info.context or {}).get(WINDOW_CONTEXT)
        if window is not None:
            earliest, latest = window
            if not earliest <= value <= latest:
                raise ValueError(
                    f"must be between {earliest.isoformat()} and {latest.isoformat()} (the "
                    "accepted window around the server's time)"
                )
        return value


class CatalogItem(BaseModel):
    """One item of the catalog."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: Id
    category: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    price: float = Field(ge=0)
    title: str = Field(default="", max_length=1024)
    created_at: datetime

    @field_validator("item_id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return _check_id(value)


class RowError(ValueError):
    """A record failed validation; the message names the row and the field."""

    def __init__(self, row: int, field: str, message: str) -> None:
        super().__init__(f"row {row}: field '{field}': {message}")
        self.row = row
        self.field = field
        self.message = message


def _row_error(row: int, exc: ValidationError) -> RowError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<record>"
    return RowError(row, field, first["msg"])


def validate_events(rows: Iterable[Mapping[str, Any]]) -> list[Event]:
    """Validate raw event records; raise `RowError` naming the first bad row."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(Event.model_validate(dict(row)))
        except ValidationError as exc:
            raise _row_error(i, exc) from None
    return out


def validate_catalog(rows: Iterable[Mapping[str, Any]]) -> list[CatalogItem]:
    """Validate raw catalog records; raise `RowError` naming the first bad row."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(CatalogItem.model_validate(dict(row)))
        except ValidationError as exc:
            raise _row_error(i, exc) from None
    return out


# 2: the user tower ships once, as `user_tower.npz` (format 1 also carried `user_tower.pt`, the same
# weights as TorchScript: at a million items a second copy of a 512 MB history table).
BUNDLE_FORMAT_VERSION = 2
# What serving still reads: a format 1 bundle that lists `user_tower.npz` (its `user_tower.pt` is
# verified like any listed file and never opened); one without it is refused.
READABLE_FORMAT_VERSIONS = (1, 2)
# The user tower's weights as plain float32 arrays (np.savez, uncompressed: serving memory-maps them
# without pickle), named as in its state dict; serving runs the forward in numpy, without torch.
USER_TOWER_WEIGHTS_FILE = "user_tower.npz"
# Files every bundle carries; the manifest lists their sha256 (plus any extra file it ships).
BUNDLE_FILES = (
    USER_TOWER_WEIGHTS_FILE,
    "item_ids.npy",
    "item_embeddings.npy",
    "item_features.npy",
    "item_categories.npy",
    "index.faiss",
    "ranker.ubj",
    "popularity.json",
)
# The model-version tag registration sets to the hex sha256 of the manifest it uploaded; serving refuses a
# downloaded manifest with another digest (the manifest's per-file checksums then anchor every file).
MANIFEST_SHA256_TAG = "recserve.manifest_sha256"
# A file format 2 leaves out: `finalize_bundle` refuses a bundle directory that holds it.
RETIRED_BUNDLE_FILES = ("user_tower.pt",)
USER_TOWER_WEIGHT_NAMES = (
    "user_embedding.weight",  # [user_buckets + 1, H], row 0: unknown user
    "history_embedding.weight",  # [num_items + 1, H], row 0: padding
    "profile_proj.weight",  # [H, profile_dim]
    "profile_proj.bias",  # [H]
    "mlp.0.weight",  # [H, 3H]
    "mlp.0.bias",  # [H]
    "mlp.2.weight",  # [embedding_dim, H]
    "mlp.2.bias",  # [embedding_dim]
)


class FeatureSpec(BaseModel):
    """One model input: a Feast feature reference ("view:feature"), its dtype and shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: str
    shape: list[int] = Field(default_factory=list)


class IndexSpec(BaseModel):
    """The bundle's FAISS index: type, build/search parameters and its build-time recall check
    (recall@100 vs exact search on sampled users' served vectors; the build refuses < floor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str  # "flat", "ivf", "ivf_pq" or "hnsw"
    params: dict[str, float | int | str] = Field(default_factory=dict)
    recall_at_100: float | None = None  # at min(100, num_items) for tiny catalogs
    recall_queries: int | None = None  # served user vectors the check searched with
    recall_floor: float | None = None  # the floor the build checked against
    build_seconds: float | None = None
    search_p50_ms: float | None = None  # one query, one thread, on the build machine
    search_p99_ms: float | None = None
    # Why the approximate index was replaced by exact search (its recall stayed below the floor).
    fallback: str | None = None


class BundleManifest(BaseModel):
    """`manifest.json` of a model bundle: what was trained on what, how to feed it, and checksums."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = BUNDLE_FORMAT_VERSION
    model_name: str
    model_version: str | None = None  # registry version; filled in on registration
    created_at: datetime
    data_snapshot_id: str
    embedding_dim: int
    num_items: int
    user_tower: dict[str, Any]  # hash buckets, history length, profile dims, input names
    user_tower_inputs: list[FeatureSpec]
    ranker_features: list[str]
    item_feature_names: list[str]
    categories: list[str]
    index: IndexSpec
    # Optional collaborative models ({"file", "last_items", "per_source", "nnz"}); empty: none.
    collaborative: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str]  # file name -> sha256 hex digest


# Field names of an event-log stream entry, in order: what serve_app.events writes and
# training.exporter decodes (every one required).
STREAM_FIELDS = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "timestamp_us",
    "position",
    "session_id",
    "request_id",
)
