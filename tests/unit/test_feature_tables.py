"""The `user_profile` file written a chunk of users at a time from arrays holds exactly the rows the
frame-based definition (`user_profile_frame` + `user_profile_snapshots`) gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from training.config import SIZES, load_settings
from training.feature_tables import (
    user_profile_frame,
    user_profile_snapshots,
    write_user_profile_snapshots,
    write_user_profiles,
)
from training.features import encode_log, user_states_at
from training.synthetic import generate

T_END = pd.Timestamp("2030-01-01", tz="UTC")


def _rows(path: Path) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    for column in ("category_prefs", "base_embedding", "recent_items", "seen_items"):
        frame[column] = [tuple(np.asarray(v).tolist()) for v in frame[column]]
    return frame.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)


def test_chunked_user_profiles_equal_the_frame_definition(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    dataset = generate(settings.synthetic.model_copy(update=SIZES["tiny"]), progress=False)
    catalog = dataset.catalog.reset_index(drop=True)
    item_ids = catalog["item_id"].to_numpy(dtype=str)
    codes, names = pd.factorize(catalog["category"], sort=True)
    log = encode_log(dataset.events, pd.Index(item_ids), codes, len(names))
    times = [dataset.events["timestamp"].quantile(q) for q in (0.5, 0.8)]

    def embed(states) -> np.ndarray:  # any deterministic function of the state will do
        return np.hstack([states.category_prefs[:, :3], states.event_count[:, None]])

    old = tmp_path / "old.parquet"
    end = user_states_at(log, log.user_ids, None, 5)
    user_profile_frame(end, item_ids, T_END, embed(end)).to_parquet(old, index=False)
    write_user_profile_snapshots(user_profile_snapshots(log, item_ids, times, 5, embed), old)

    new = tmp_path / "new.parquet"
    # Chunks of 37 users: several chunks per pass, the last one short.
    write_user_profiles(new, log, item_ids, 5, T_END, times, embed, chunk_users=37)
    got, want = _rows(new), _rows(old)
    assert len(got) == len(want) > len(log.user_ids)  # end rows + both snapshots
    pd.testing.assert_frame_equal(got, want)
    # Every user has an end-of-log row with their recent items newest first.
    assert set(got.loc[got["event_timestamp"] == T_END, "user_id"]) == set(log.user_ids)
