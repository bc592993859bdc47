"""Offline data contract: the events and catalog frames every training stage reads, and their I/O.

Frames are validated column-wise (fast enough for 10M rows) with the same rules as the pydantic
records in `serve_app.schemas`; the first bad row is named in the error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from serve_app.schemas import DEFAULT_EVENT_WEIGHTS, ID_PATTERN, MAX_ID_LENGTH, EventType, RowError

EVENT_COLUMNS = [
    "user_id",  # str
    "item_id",  # str
    "event_type",  # str, one of EventType
    "timestamp",  # datetime64[ns, UTC]
    "position",  # int32, -1 when unknown
    "session_id",  # str, "" when unknown
    "weight",  # float32: training weight (event type, rating)
]
CATALOG_COLUMNS = [
    "item_id",  # str
    "category",  # str
    "price",  # float64
    "title",  # str
    "created_at",  # datetime64[ns, UTC]
]
EVENT_TYPES = frozenset(e.value for e in EventType)


@dataclass(frozen=True)
class Dataset:
    """Events and catalog of one data set; `truth` holds a generator's planted structure, if any."""

    name: str
    events: pd.DataFrame
    catalog: pd.DataFrame
    truth: dict[str, np.ndarray] = field(default_factory=dict)


def _check_ids(series: pd.Series, column: str) -> None:
    values = series.astype("string")
    bad = values.isna() | (values.str.len() == 0)
    if bad.any():
        raise RowError(int(np.flatnonzero(bad.to_numpy())[0]), column, "must not be empty")
    bad = values.str.len() > MAX_ID_LENGTH
    if bad.any():
        raise RowError(
            int(np.flatnonzero(bad.to_numpy())[0]), column, f"longer than {MAX_ID_LENGTH} chars"
        )
    # Checking the distinct values keeps this cheap on 10M-row frames with ~1M distinct ids.
    uniques = pd.Series(values.unique())
    bad_values = uniques[~uniques.str.fullmatch(ID_PATTERN.pattern).astype(bool)]
    if len(bad_values):
        row = int(np.flatnonzero(values.isin(bad_values).to_numpy())[0])
        raise RowError(row, column, "may contain only letters, digits and _ . : @ -")


def _utc(series: pd.Series, column: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(series):
        out = pd.to_datetime(series, utc=True)
    else:
        # ISO 8601 in any of its forms, per value (a column may mix dates and date-times).
        out = pd.to_datetime(series, utc=True, errors="coerce", format="ISO8601")
    bad = out.isna()
    if bad.any():
        raise RowError(int(np.flatnonzero(bad.to_numpy())[0]), column, "not a valid timestamp")
    return out.astype("datetime64[ns, UTC]")


def normalize_events(df: pd.DataFrame) -> pd.DataFrame:
    """Validate an events frame and return it with canonical columns, dtypes and time order."""
    df = df.reset_index(drop=True)
    for column in ("user_id", "item_id", "event_type", "timestamp"):
        if column not in df.columns:
            raise RowError(0, column, "column is missing")
    _check_ids(df["user_id"], "user_id")
    _check_ids(df["item_id"], "item_id")
    types = df["event_type"].astype("string")
    bad = ~types.isin(EVENT_TYPES)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise RowError(row, "event_type", f"unknown event type {types.iloc[row]!r}")
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype(str),
            "item_id": df["item_id"].astype(str),
            "event_type": types.astype(str),
            "timestamp": _utc(df["timestamp"], "timestamp"),
        }
    )
    position = df["position"] if "position" in df else pd.Series(-1, index=df.index)
    out["position"] = pd.to_numeric(position, errors="coerce").fillna(-1).astype("int32")
    session = df["session_id"] if "session_id" in df else pd.Series("", index=df.index)
    out["session_id"] = session.fillna("").astype(str)
    if "weight" in df:
        out["weight"] = pd.to_numeric(df["weight"], errors="coerce").astype("float32")
        if out["weight"].isna().any() or (out["weight"] < 0).any():
            row = int(np.flatnonzero((out["weight"].isna() | (out["weight"] < 0)).to_numpy())[0])
            raise RowError(row, "weight", "must be a non-negative number")
    else:
        out["weight"] = out["event_type"].map(DEFAULT_EVENT_WEIGHTS).astype("float32")
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


def normalize_catalog(df: pd.DataFrame) -> pd.DataFrame:
    """Validate a catalog frame and return it with canonical columns and dtypes."""
    df = df.reset_index(drop=True)
    for column in ("item_id", "category", "price", "created_at"):
        if column not in df.columns:
            raise RowError(0, column, "column is missing")
    _check_ids(df["item_id"], "item_id")
    dup = df["item_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise RowError(row, "item_id", f"duplicate item id {df['item_id'].iloc[row]!r}")
    category = df["category"].astype("string")
    bad = category.isna() | (category.str.len() == 0)
    if bad.any():
        raise RowError(int(np.flatnonzero(bad.to_numpy())[0]), "category", "must not be empty")
    price = pd.to_numeric(df["price"], errors="coerce")
    bad = price.isna() | (price < 0)
    if bad.any():
        raise RowError(int(np.flatnonzero(bad.to_numpy())[0]), "price", "must be a number >= 0")
    title = df["title"] if "title" in df else pd.Series("", index=df.index)
    return pd.DataFrame(
        {
            "item_id": df["item_id"].astype(str),
            "category": category.astype(str),
            "price": price.astype("float64"),
            "title": title.fillna("").astype(str),
            "created_at": _utc(df["created_at"], "created_at"),
        }
    )


def write_dataset(dataset: Dataset, directory: Path) -> dict[str, Path]:
    """Write events and catalog as Parquet (and planted truth as .npy) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"events": directory / "events.parquet", "catalog": directory / "catalog.parquet"}
    dataset.events.to_parquet(paths["events"], index=False)
    dataset.catalog.to_parquet(paths["catalog"], index=False)
    for key, array in dataset.truth.items():
        paths[f"truth_{key}"] = directory / f"truth_{key}.npy"
        np.save(paths[f"truth_{key}"], array, allow_pickle=False)
    return paths


def read_dataset(directory: Path, name: str | None = None) -> Dataset:
    """Read a data set written by `write_dataset` (or any events/catalog Parquet pair)."""
    events = normalize_events(pd.read_parquet(directory / "events.parquet"))
    catalog = normalize_catalog(pd.read_parquet(directory / "catalog.parquet"))
    truth = {
        p.stem.removeprefix("truth_"): np.load(p, allow_pickle=False)
        for p in sorted(directory.glob("truth_*.npy"))
    }
    return Dataset(name=name or directory.name, events=events, catalog=catalog, truth=truth)


def snapshot_id(dataset: Dataset) -> str:
    """A short content hash of a data set, recorded in the bundle manifest."""
    h = hashlib.sha256()
    for frame in (dataset.events, dataset.catalog):
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]
