"""The generator is deterministic and its planted structure shows in the events it writes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.config import SyntheticConfig
from training.data import normalize_catalog, normalize_events
from training.synthetic import POSITION_BIAS, click_probability, generate

SMALL = SyntheticConfig(n_users=400, n_items=300, n_events=40_000, n_categories=10, seed=3)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = generate(SMALL, progress=False), generate(SMALL, progress=False)
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.catalog, b.catalog)
    c = generate(SMALL.model_copy(update={"seed": 4}), progress=False)
    assert not a.events["item_id"].equals(c.events["item_id"])


def test_events_follow_the_schemas_and_time_order() -> None:
    data = generate(SMALL, progress=False)
    pd.testing.assert_frame_equal(normalize_events(data.events), data.events)
    pd.testing.assert_frame_equal(normalize_catalog(data.catalog), data.catalog)
    assert data.events["timestamp"].is_monotonic_increasing
    assert 0.8 * SMALL.n_events < len(data.events) < 1.2 * SMALL.n_events
    assert set(data.events["event_type"]) == {"view", "click", "add_to_cart", "purchase", "skip"}
    # An item never appears in an event before it was created.
    created = data.catalog.set_index("item_id")["created_at"]
    assert (data.events["timestamp"] >= created.loc[data.events["item_id"]].to_numpy()).all()


def test_clicks_concentrate_in_each_users_planted_categories() -> None:
    data = generate(SMALL, progress=False)
    truth_cats, truth_w = data.truth["user_categories"], data.truth["user_category_weights"]
    prefs = np.zeros((SMALL.n_users, SMALL.n_categories))
    np.add.at(prefs, (np.arange(SMALL.n_users)[:, None], truth_cats), truth_w)
    clicks = data.events[data.events["event_type"] == "click"]
    users = clicks["user_id"].str[1:].astype(int).to_numpy()
    cats = data.truth["item_categories"][clicks["item_id"].str[1:].astype(int).to_numpy()]
    # Share of clicks that land in the user's top-2 planted categories, vs. the share of the
    # catalog those categories hold (what a structure-free log would give).
    top2 = np.argsort(-prefs, axis=1)[:, :2]
    in_top2 = (top2[users] == cats[:, None]).any(axis=1).mean()
    catalog_share = np.mean(
        [np.isin(data.truth["item_categories"], top2[u]).mean() for u in np.unique(users)]
    )
    assert in_top2 > 0.6
    assert in_top2 > 2.5 * catalog_share


def test_click_through_falls_with_position_as_planted() -> None:
    data = generate(SMALL, progress=False)
    events = data.events
    shown = events[events["event_type"].isin(["view", "skip"])]["position"].value_counts()
    clicked = events[events["event_type"] == "click"]["position"].value_counts()
    ctr = (clicked / shown).sort_index().to_numpy()
    assert ctr[0] > ctr[4] > ctr[9]
    # The empirical ratio tracks the planted examination bias within sampling noise.
    assert abs(ctr[9] / ctr[0] - POSITION_BIAS[9] / POSITION_BIAS[0]) < 0.1


def test_click_probability_prefers_aligned_users() -> None:
    data = generate(SMALL, progress=False)
    truth = data.truth
    user = np.zeros(300, dtype=int)
    items = np.arange(300)
    p = click_probability(truth, user, items, np.zeros(300, dtype=int))
    affinity = truth["item_vectors"] @ truth["user_vectors"][0]
    assert np.corrcoef(p, affinity)[0, 1] > 0.5
    assert p.max() <= POSITION_BIAS[0]
