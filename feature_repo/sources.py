"""Feast data sources: the Parquet tables the offline pipeline writes, and the real-time push sources.

Paths are relative: Feast resolves them against `RepoConfig.repo_path`, which `feature_repo.store` sets to
the configured data dir, so the same definitions serve a laptop, CI and a cluster volume.
"""

from __future__ import annotations

from feast import FileSource, PushSource

# Written by `training.pipeline.write_feature_tables` (end of log) and
# `training.feature_tables.write_user_profile_snapshots` (earlier snapshots, for training).
USER_PROFILE_PATH = "features/user_profile.parquet"
ITEM_PROFILE_PATH = "features/item_profile.parquet"
# Push sources need a batch source; nothing materializes from these (real-time state is written
# online on every event), they only name where an offline copy would go.
USER_REALTIME_PATH = "features/user_realtime.parquet"
ITEM_REALTIME_PATH = "features/item_realtime.parquet"

user_profile_source = FileSource(
    name="user_profile_source",
    path=USER_PROFILE_PATH,
    timestamp_field="event_timestamp",
    description="Per-user snapshots: activity, category shares, base embedding, recent items.",
)

item_profile_source = FileSource(
    name="item_profile_source",
    path=ITEM_PROFILE_PATH,
    timestamp_field="event_timestamp",
    description="Per-item snapshots: category, price, popularity windows, CTR, age.",
)

user_realtime_push_source = PushSource(
    name="user_realtime_push",
    batch_source=FileSource(
        name="user_realtime_batch",
        path=USER_REALTIME_PATH,
        timestamp_field="event_timestamp",
    ),
    description="Real-time user state, updated on every event.",
)

item_realtime_push_source = PushSource(
    name="item_realtime_push",
    batch_source=FileSource(
        name="item_realtime_batch",
        path=ITEM_REALTIME_PATH,
        timestamp_field="event_timestamp",
    ),
    description="Real-time item counters, updated on every event.",
)
