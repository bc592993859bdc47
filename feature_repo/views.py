"""Feast feature views: batch profiles from Parquet and the real-time views fed on every event.

Batch profiles carry `ttl=0` (no expiry): each row is a cumulative snapshot, valid until the next one
replaces it, so a label is joined with the latest snapshot at or before its time however old.
The real-time views' values live in Redis hashes maintained atomically by `serve_app.events`; their
schema here is the contract the serving reader (`serve_app.features`) returns, field for field.
"""

from __future__ import annotations

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Float32, Float64, Int64, String, UnixTimestamp

from feature_repo.entities import item, user
from feature_repo.sources import (
    item_profile_source,
    item_realtime_push_source,
    user_profile_source,
    user_realtime_push_source,
)

user_profile_fv = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="event_count", dtype=Float32, description="positive interactions so far"),
        Field(
            name="category_prefs",
            dtype=Array(Float32),
            description="share of positive event weight per category (bundle category order)",
        ),
        Field(
            name="base_embedding",
            dtype=Array(Float32),
            description="user tower output at snapshot time (empty when not computed)",
        ),
        Field(
            name="recent_items",
            dtype=Array(String),
            description="distinct positively interacted item ids, newest first",
        ),
        Field(
            name="seen_items",
            dtype=Array(String),
            description="every item id the user interacted with positively before the snapshot "
            "(retrieval excludes them)",
        ),
    ],
    source=user_profile_source,
    online=True,
    description="User state as of the snapshot time (training.features.user_states_at).",
)

item_profile_fv = FeatureView(
    name="item_profile",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="category", dtype=String, description="catalog category"),
        Field(name="price", dtype=Float64, description="catalog price"),
        Field(name="log_pop_all", dtype=Float32, description="log1p positive weight, all time"),
        Field(name="log_pop_7d", dtype=Float32, description="log1p positive weight, last 7 days"),
        Field(name="log_pop_1d", dtype=Float32, description="log1p positive weight, last day"),
        Field(name="ctr", dtype=Float32, description="smoothed positives / views"),
        Field(name="age_days", dtype=Float32, description="days since the item was created"),
        Field(name="log_price", dtype=Float32, description="log1p price"),
    ],
    source=item_profile_source,
    online=True,
    description="Item statistics as of the snapshot time (training.features.item_stats_at).",
)

user_realtime_fv = FeatureView(
    name="user_realtime",
    entities=[user],
    ttl=timedelta(days=30),
    schema=[
        Field(
            name="delta_embedding",
            dtype=Array(Float32),
            description="EMA of interacted item embeddings, weighted by event type (zero start)",
        ),
        Field(
            name="delta_model_version",
            dtype=String,
            description="bundle version whose item embeddings built delta_embedding",
        ),
        Field(
            name="recent_items",
            dtype=Array(String),
            description="items of positive events since the last snapshot, newest first, distinct",
        ),
        Field(name="count_5m", dtype=Int64, description="events in the last 5 minutes"),
        Field(name="count_1h", dtype=Int64, description="events in the last hour"),
        Field(name="last_event_ts", dtype=UnixTimestamp, description="latest event time seen"),
    ],
    source=user_realtime_push_source,
    online=True,
    description="Real-time user state, updated atomically on every event.",
)

item_realtime_fv = FeatureView(
    name="item_realtime",
    entities=[item],
    ttl=timedelta(hours=1),
    schema=[
        Field(name="clicks_5m", dtype=Int64, description="positive events, last 5 minutes"),
        Field(name="views_5m", dtype=Int64, description="view events, last 5 minutes"),
        Field(name="clicks_1h", dtype=Int64, description="positive events, last hour"),
        Field(name="views_1h", dtype=Int64, description="view events, last hour"),
    ],
    source=item_realtime_push_source,
    online=True,
    description="Short-window item counters, updated on every event.",
)

BATCH_VIEWS = (user_profile_fv, item_profile_fv)
REALTIME_VIEWS = (user_realtime_fv, item_realtime_fv)
