"""The paths training takes on large data, forced at tiny sizes: chunked sparse training rows, sparse
embedding gradients, sampled validation users, capped ranker groups, blocked top-n, the search's
user sample. Expectations are computed here independently (direct loops, brute-force top-n)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import training.features as features
from training.config import RankerConfig, SyntheticConfig, TwoTowerConfig
from training.evaluate import score_block_rows
from training.features import first_positives, training_rows
from training.labels import label_window, relevant_lists, tail_labels
from training.ranker import exact_candidates
from training.rounds import holdout_round
from training.search import subsample_round
from training.synthetic import generate
from training.system import ItemTable, Log, ranker_group_bound
from training.two_tower import (
    item_inputs,
    optimizers,
    sample_rows,
    train_two_tower,
    uses_sparse_embeddings,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[Log, ItemTable]:
    config = SyntheticConfig(n_users=300, n_items=200, n_events=12_000, n_categories=8, seed=3)
    dataset = generate(config, progress=False)
    items = ItemTable.of(dataset.catalog)
    return Log.of(dataset.events, items), items


def _expected_rows(data: Log, history_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Profile and recent items of every training row by a direct walk over each user's events."""
    e = data.encoded
    mask = np.ones(len(e.ts), dtype=bool)
    first = first_positives(e, mask)
    profile = np.zeros((len(first), 1 + e.n_categories))
    recent = np.zeros((len(first), history_length), dtype=np.int64)
    for row, event in enumerate(first):
        user = e.user[event]
        earlier = np.flatnonzero((e.user == user) & e.positive & (np.arange(len(e.ts)) < event))
        sums = np.zeros(e.n_categories)
        for j in earlier:
            sums[e.category[j]] += e.weight[j]
        profile[row, 0] = np.log1p(len(earlier))
        profile[row, 1:] = sums / max(sums.sum(), 1e-12)
        previous = [j for j in first if e.user[j] == user and j < event][::-1][:history_length]
        recent[row, : len(previous)] = e.item[previous] + 1
    return profile, recent


def test_training_rows_in_chunks_of_a_few_users_match_a_direct_walk(
    tiny: tuple[Log, ItemTable], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = tiny
    expected_profile, expected_recent = _expected_rows(data, 4)
    # 64 dense values per chunk: 8 events of 8 categories, so nearly every user is its own chunk.
    monkeypatch.setattr(features, "_CHUNK_ELEMENTS", 64)
    rows = training_rows(data.encoded, data.positions, np.ones(len(data.encoded.ts), dtype=bool), 4)
    np.testing.assert_allclose(rows.profile(), expected_profile, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(rows.recent, expected_recent)
    idx = np.array([5, 0, 17])
    np.testing.assert_array_equal(rows.profile(idx), rows.profile()[idx])


def test_training_rows_store_compact_arrays_whose_size_follows_what_users_touched() -> None:
    # 2 users, 10_000 categories, each user touching 2 of them: a dense row layout would hold
    # rows x 10_000 float64 values; the sparse one holds at most 2 per row, in float32.
    n_cat, n_rows = 10_000, 400
    user = np.repeat([0, 1], n_rows // 2).astype(np.int64)
    item = np.arange(n_rows, dtype=np.int64)
    category = np.where(item % 2 == 0, 3, 9_000) + user
    log = features.EncodedLog(
        user_ids=np.array(["a", "b"]),
        user=user,
        item=item,
        category=category,
        ts=np.arange(n_rows, dtype=np.int64),
        weight=np.ones(n_rows, np.float32),
        positive=np.ones(n_rows, dtype=bool),
        is_view=np.zeros(n_rows, dtype=bool),
        n_items=n_rows,
        n_categories=n_cat,
    )
    rows = training_rows(log, np.full(n_rows, -1), np.ones(n_rows, dtype=bool), 5)
    assert rows.prefs.dtype == np.float32 and rows.recent.dtype == np.int32
    assert rows.prefs.shape == (n_rows, n_cat)
    assert rows.prefs.nnz <= 2 * n_rows
    # The second row of user a saw one click in category 3 (item 0): a share of 1.
    assert rows.prefs[1, 3] == pytest.approx(1.0)
    # Chunks are cut at user boundaries and hold at most _CHUNK_ELEMENTS / categories events,
    # unless one user alone has more.
    # 150 events a chunk: each 200-event user is a chunk of its own.
    bounds = features._chunk_bounds(np.sort(user), features._CHUNK_ELEMENTS // 150)
    assert bounds == [(0, 200), (200, 400)]
    many = features._chunk_bounds(np.repeat(np.arange(1_000), 10), 4096)
    assert all((hi - lo) * 4096 <= features._CHUNK_ELEMENTS for lo, hi in many)
    assert many[-1][1] == 10_000 and all(lo % 10 == 0 for lo, _ in many)


def test_sparse_embeddings_update_only_the_rows_a_batch_touched() -> None:
    config = TwoTowerConfig(sparse_embeddings_min_items=100)
    assert not uses_sparse_embeddings(config, 99) and uses_sparse_embeddings(config, 100)
    table = torch.nn.Embedding(1_000, 4, sparse=True)
    dense_part = torch.nn.Linear(4, 1)
    model = torch.nn.ModuleDict({"table": table, "dense": dense_part})
    opts = optimizers([model], config, sparse=True)
    assert [type(o).__name__ for o in opts] == ["SparseAdam", "AdamW"]
    before = table.weight.detach().clone()
    for _ in range(3):
        loss = dense_part(table(torch.tensor([1, 2, 3]))).sum()
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    changed = (table.weight.detach() != before).any(dim=1).nonzero().ravel().tolist()
    assert changed == [1, 2, 3]
    # The dense path (AdamW with weight decay on everything) moves every row.
    dense_table = torch.nn.Embedding(1_000, 4)
    (dense_opt,) = optimizers([dense_table], config.model_copy(update={"weight_decay": 0.1}), False)
    start = dense_table.weight.detach().clone()
    dense_table(torch.tensor([1])).sum().backward()
    dense_opt.step()
    assert (dense_table.weight.detach() != start).any(dim=1).all()


def _tower_inputs(data: Log, items: ItemTable, config: TwoTowerConfig) -> dict[str, object]:
    labels, mask = tail_labels(data.encoded, data.end, 0.2, config.history_length, data.event_types)
    rows = training_rows(data.encoded, data.positions, mask, config.history_length)
    return {
        "rows": rows,
        "items": item_inputs(items.frame, items.codes, config),
        "n_categories": len(items.categories),
        "propensity": np.ones(50),
        "valid_states": labels.states,
        "valid_relevant": relevant_lists(labels.grades),
    }


def test_sparse_towers_with_sampled_validation_learn_and_repeat_by_seed(
    tiny: tuple[Log, ItemTable],
) -> None:
    data, items = tiny
    config = TwoTowerConfig(
        sparse_embeddings_min_items=1,  # forced: the catalog has 200 items
        validation_max_users=40,
        epochs=4,
        patience=4,
        batch_size=256,
        hidden_dim=32,
        embedding_dim=16,
        user_buckets=1024,
        item_buckets=1024,
        token_buckets=512,
        history_length=5,
    )
    inputs = _tower_inputs(data, items, config)
    assert len(inputs["valid_states"].user_ids) > 40  # type: ignore[attr-defined]
    first = train_two_tower(config=config, progress=False, **inputs)  # type: ignore[arg-type]
    assert first.user_tower.history_embedding.sparse and first.item_tower is not None
    assert first.item_tower.id_embedding.sparse and first.item_tower.token_embedding.sparse
    recalls = [h["valid_recall@50"] for h in first.history]
    # 50 of 200 items at random find a quarter of a user's items; the planted structure more.
    assert max(recalls) > 0.35, recalls
    again = train_two_tower(config=config, progress=False, **inputs)  # type: ignore[arg-type]
    assert [h["valid_recall@50"] for h in again.history] == recalls
    np.testing.assert_array_equal(again.item_embeddings, first.item_embeddings)


def test_validation_sample_is_a_seeded_sorted_subset_and_absent_below_the_bound() -> None:
    assert sample_rows(100, 100, 0) is None
    a, b, c = sample_rows(1_000, 50, 7), sample_rows(1_000, 50, 7), sample_rows(1_000, 50, 8)
    assert a is not None and b is not None and c is not None
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_capped_ranker_groups_are_a_seeded_sample_and_the_mask_still_hides_every_label(
    tiny: tuple[Log, ItemTable],
) -> None:
    data, _ = tiny
    e = data.encoded
    full, full_mask = tail_labels(e, data.end, 0.2, 5, data.event_types)
    capped, capped_mask = tail_labels(e, data.end, 0.2, 5, data.event_types, 30, 1)
    again, _ = tail_labels(e, data.end, 0.2, 5, data.event_types, 30, 1)
    assert len(full.states.user_ids) > 30 >= len(capped.states.user_ids) > 20
    np.testing.assert_array_equal(capped.states.user_ids, again.states.user_ids)
    np.testing.assert_array_equal(capped_mask, full_mask)
    # A sampled group is the same group as without the cap: same state, same labels.
    rows = pd.Index(full.states.user_ids).get_indexer(capped.states.user_ids)
    assert (rows >= 0).all()
    np.testing.assert_array_equal(capped.states.recent_items, full.states.recent_items[rows])
    assert (capped.grades != full.grades[rows]).nnz == 0


def test_capped_window_groups_are_the_same_groups_as_uncapped(
    tiny: tuple[Log, ItemTable],
) -> None:
    data, _ = tiny
    start = pd.Timestamp(int(np.quantile(data.encoded.ts, 0.7)), tz="UTC")
    full = label_window(data.encoded, start, None, 5, data.event_types)
    capped = label_window(data.encoded, start, None, 5, data.event_types, 25, 4)
    assert len(full.states.user_ids) > 25 >= len(capped.states.user_ids) > 15
    rows = pd.Index(full.states.user_ids).get_indexer(capped.states.user_ids)
    assert (rows >= 0).all()
    np.testing.assert_array_equal(capped.states.category_prefs, full.states.category_prefs[rows])
    assert (capped.grades != full.grades[rows]).nnz == 0


def test_blocked_exact_candidates_equal_brute_force_top_n() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(300, 8))
    items = items.astype(np.float32)
    seen = sp.random(37, 300, density=0.1, format="csr", random_state=1)
    got, scores = exact_candidates(users, items, seen, 20, chunk=5)
    full = users @ items.T
    full[seen.toarray() > 0] = -np.inf
    expected = np.argsort(-full, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-6)
    # Blocks of a 1M-item catalog hold a bounded number of scores.
    assert score_block_rows(1_000_000) * 1_000_000 <= 1 << 24
    assert score_block_rows(2_000) == 1024 and score_block_rows(2_000, most=256) == 256


def test_search_round_is_a_user_sample_of_about_max_events(tiny: tuple[Log, ItemTable]) -> None:
    data, _ = tiny
    validation = holdout_round(data.events, 0.2, "validation")
    assert subsample_round(validation, len(validation.history), 0) is validation
    target = len(validation.history) // 4
    sample = subsample_round(validation, target, 0)
    assert sample.history is not validation.history
    assert 0.6 * target < len(sample.history) < 1.4 * target
    kept = set(sample.history["user_id"])
    # Every sampled user keeps all of their history and held-out items; no one else appears.
    full_counts = validation.history["user_id"].value_counts()
    sample_counts = sample.history["user_id"].value_counts()
    assert sample_counts.to_dict() == full_counts[sorted(kept)].to_dict()
    assert set(sample.targets["user_id"]) <= kept
    expected_targets = validation.targets["user_id"].isin(kept).sum()
    assert len(sample.targets) == expected_targets
    np.testing.assert_array_equal(
        subsample_round(validation, target, 0).history.index, sample.history.index
    )


def test_ranker_groups_shrink_only_where_their_exact_candidates_would_cost_too_much() -> None:
    ranker = RankerConfig()  # 40,000 groups, 4e9 scores
    assert ranker_group_bound(ranker, 2_000) == 40_000  # the demo
    assert ranker_group_bound(ranker, 100_000) == 40_000  # --size large: unchanged
    assert ranker_group_bound(ranker, 1_000_000) == 4_000  # --size xl
    assert ranker_group_bound(ranker, 10_000_000) == 2_000  # never below the floor
    assert ranker_group_bound(RankerConfig(max_groups=500), 1_000_000) == 500
