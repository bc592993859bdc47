"""Offline side of the feature store: point-in-time user snapshots for Feast, and historical retrieval.

`user_profile_snapshots` computes the `user_profile` view at several cutoffs with the same definitions
as training (`training.features.user_states_at`); `write_user_profile_snapshots` merges them into the
Parquet file the view's batch source reads; `historical_user_features` asks Feast for the latest
snapshot at or before each label time, so no value from after a label reaches its training row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.services import feature_refs, user_tower_v1
from training.features import EncodedLog, UserStates, user_states_at

# Columns of `features/user_profile.parquet` (also written by training.pipeline.write_feature_tables).
USER_PROFILE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("event_timestamp", pa.timestamp("ns", tz="UTC")),
        ("event_count", pa.float32()),
        ("category_prefs", pa.list_(pa.float32())),
        ("base_embedding", pa.list_(pa.float32())),
        ("recent_items", pa.list_(pa.string())),
        ("seen_items", pa.list_(pa.string())),
    ]
)
# The batch part of the user tower's service: what training joins point-in-time.
USER_PROFILE_FEATURES = tuple(
    r for r in feature_refs(user_tower_v1) if r.startswith("user_profile:")
)


def user_profile_frame(
    states: UserStates,
    item_ids: np.ndarray,
    stamp: pd.Timestamp,
    base_embeddings: np.ndarray | None = None,
) -> pd.DataFrame:
    """The `user_profile` rows for `states`, stamped `stamp`: the one definition of that table.

    `seen_items` lists every item the user interacted with positively (what retrieval excludes).
    """
    n = len(states.user_ids)
    seen = states.seen.tocsr()
    return pd.DataFrame(
        {
            "user_id": states.user_ids.astype(str),
            "event_timestamp": stamp,
            "event_count": states.event_count.astype(np.float32),
            "category_prefs": list(states.category_prefs.astype(np.float32)),
            "base_embedding": (
                list(base_embeddings.astype(np.float32))
                if base_embeddings is not None
                else [np.zeros(0, np.float32)] * n
            ),
            "recent_items": [
                [str(item_ids[i - 1]) for i in row if i > 0] for row in states.recent_items
            ],
            "seen_items": [
                item_ids[seen.indices[seen.indptr[r] : seen.indptr[r + 1]]].astype(str).tolist()
                for r in range(n)
            ],
        }
    )


def _lists(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), values)


def user_profile_table(
    states: UserStates,
    item_ids: np.ndarray,
    stamp: pd.Timestamp,
    base_embeddings: np.ndarray | None = None,
) -> pa.Table:
    """`user_profile_frame`'s rows as an Arrow table built from the arrays, with no Python object
    per value: what writing a million users' rows needs (the frame's lists of strings took ~20 GB)."""
    n = len(states.user_ids)
    prefs = np.ascontiguousarray(states.category_prefs, dtype=np.float32)
    recent = states.recent_items
    held = recent > 0
    seen = states.seen.tocsr()
    if base_embeddings is None:
        base = _lists(np.zeros(n + 1), pa.array(np.zeros(0, dtype=np.float32)))
    else:
        vectors = np.ascontiguousarray(base_embeddings, dtype=np.float32)
        base = _lists(np.arange(n + 1) * vectors.shape[1], pa.array(vectors.ravel()))
    ids = np.asarray(item_ids).astype(str)
    columns = [
        pa.array(np.asarray(states.user_ids).astype(str)),
        pa.array(np.full(n, pd.Timestamp(stamp).value, dtype=np.int64)).cast(
            pa.timestamp("ns", tz="UTC")
        ),
        pa.array(states.event_count.astype(np.float32)),
        _lists(np.arange(n + 1) * prefs.shape[1], pa.array(prefs.ravel())),
        base,
        _lists(np.r_[0, np.cumsum(held.sum(axis=1))], pa.array(ids[recent[held] - 1])),
        _lists(seen.indptr, pa.array(ids[seen.indices])),
    ]
    return pa.Table.from_arrays(columns, schema=USER_PROFILE_SCHEMA)


def write_user_profiles(
    path: Path,
    log: EncodedLog,
    item_ids: np.ndarray,
    history_length: int,
    as_of: pd.Timestamp,
    snapshot_times: Sequence[pd.Timestamp] = (),
    embed: Callable[[UserStates], np.ndarray] | None = None,
    chunk_users: int = 250_000,
) -> Path:
    """The whole `user_profile` file in one pass, a chunk of users at a time (memory bounded by the
    chunk, not the user count): every user's state at the end of the log stamped `as_of`, then each
    snapshot time's rows (`user_profile_snapshots`' definition). Written atomically (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    passes: list[tuple[pd.Timestamp, pd.Timestamp | None, np.ndarray]] = [
        (as_of, None, log.user_ids)
    ]
    for t in snapshot_times:
        t = (
            pd.Timestamp(t).tz_convert("UTC")
            if pd.Timestamp(t).tzinfo
            else pd.Timestamp(t, tz="UTC")
        )
        passes.append((t, t, log.user_ids[np.unique(log.user[log.before(t)])]))
    with pq.ParquetWriter(tmp, USER_PROFILE_SCHEMA) as writer:
        for stamp, cutoff, users in passes:
            for start in range(0, len(users), chunk_users):
                states = user_states_at(
                    log, users[start : start + chunk_users], cutoff, history_length
                )
                vectors = embed(states) if embed is not None else None
                writer.write_table(user_profile_table(states, item_ids, stamp, vectors))
    tmp.replace(path)
    return path


def user_profile_snapshots(
    log: EncodedLog,
    item_ids: np.ndarray,
    times: Sequence[pd.Timestamp],
    history_length: int,
    embed: Callable[[UserStates], np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per (user, snapshot time) for users with an event before that time.

    A row stamped `t` holds the state from events strictly before `t` (`user_states_at(cutoff=t)`),
    so it is known at `t`. `embed` maps states to base embeddings (the user tower); without it the
    column holds empty lists.
    """
    frames = []
    for t in times:
        t = (
            pd.Timestamp(t).tz_convert("UTC")
            if pd.Timestamp(t).tzinfo
            else pd.Timestamp(t, tz="UTC")
        )
        users = log.user_ids[np.unique(log.user[log.before(t)])]
        if len(users) == 0:
            continue
        states = user_states_at(log, users, t, history_length)
        frames.append(user_profile_frame(states, item_ids, t, embed(states) if embed else None))
    if not frames:
        return USER_PROFILE_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def write_user_profile_snapshots(snapshots: pd.DataFrame, path: Path) -> Path:
    """Merge snapshots into the `user_profile` Parquet file (a row of the same user and timestamp
    is replaced); the end-of-log rows the pipeline wrote stay. Written atomically (tmp + rename)."""
    new = pa.Table.from_pandas(snapshots, schema=USER_PROFILE_SCHEMA, preserve_index=False)
    if path.exists():
        old = pq.read_table(path).select(USER_PROFILE_SCHEMA.names).cast(USER_PROFILE_SCHEMA)
        merged = pa.concat_tables([old, new]).to_pandas()
        merged = merged.drop_duplicates(["user_id", "event_timestamp"], keep="last")
        new = pa.Table.from_pandas(merged, schema=USER_PROFILE_SCHEMA, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(new, tmp)
    tmp.replace(path)
    return path


def historical_user_features(
    store: Any, entity_df: pd.DataFrame, features: Sequence[str] = USER_PROFILE_FEATURES
) -> pd.DataFrame:
    """Point-in-time `user_profile` features for (user_id, event_timestamp) label rows, in the order
    of `entity_df`. `store` is a `feast.FeatureStore`; users without a snapshot at or before their
    label time get nulls."""
    missing = {"user_id", "event_timestamp"} - set(entity_df.columns)
    if missing:
        raise ValueError(f"entity_df lacks columns {sorted(missing)}")
    rows = entity_df.reset_index(drop=True).assign(_row=np.arange(len(entity_df)))
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    got = store.get_historical_features(entity_df=rows, features=list(features)).to_df()
    # Feast's file offline store drops an entity row whose every source row is after its label
    # time (instead of returning nulls): join back onto the labels so every row is there.
    got = got.set_index("_row")
    values = got[[c for c in got.columns if c not in rows.columns]]
    out = rows.set_index("_row").join(values, how="left").sort_index().reset_index(drop=True)
    for column in values.columns:
        if out[column].dtype == object:  # list features: None, not NaN, when there is no value
            out[column] = out[column].where(out[column].notna(), None)
    return out
