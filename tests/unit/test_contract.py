"""The ranker's feature matrix and the hashing contract, computed by hand."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from serve_app.contract import (
    CF_FEATURE_NAMES,
    CF_SIGNALS,
    ITEM_FEATURE_NAMES,
    RANKER_FEATURE_NAMES,
    RANKER_FEATURE_NAMES_CF,
    Collaborative,
    SignalScores,
    cf_candidates,
    cf_features,
    cf_scores,
    hash_bucket,
    ranker_features,
    row_sum,
    sparse_row_sum,
    title_tokens,
)


def test_hash_bucket_is_stable_across_processes_and_in_range() -> None:
    # Pinned values: a change here silently breaks every registered bundle.
    assert (
        hash_bucket("u1", 1000)
        == int.from_bytes(__import__("hashlib").blake2b(b"u1", digest_size=8).digest(), "little")
        % 1000
    )
    assert all(0 <= hash_bucket(f"x{i}", 7) < 7 for i in range(100))


def test_title_tokens_lowercase_alphanumeric() -> None:
    assert title_tokens("Red VINTAGE lamp, c3-model #12") == [
        "red",
        "vintage",
        "lamp",
        "c3",
        "model",
        "12",
    ]


def test_ranker_features_by_hand() -> None:
    # 3 items: categories 0, 1, 1; item feature rows are distinct constants.
    item_features = np.arange(3 * len(ITEM_FEATURE_NAMES), dtype=np.float32).reshape(3, -1)
    item_categories = np.array([0, 1, 1])
    candidates = np.array([[2, 0, -1]])  # one user, third slot is padding
    scores = np.array([[0.9, 0.5, 0.0]], dtype=np.float32)
    prefs = np.array([[0.25, 0.75]], dtype=np.float32)
    event_count = np.array([3.0], dtype=np.float32)
    recent = np.array([[2, 3, 0, 0]])  # items 1 and 2 (index + 1): both category 1
    x = ranker_features(
        candidates, scores, item_features, item_categories, prefs, event_count, recent
    )
    assert x.shape == (3, len(RANKER_FEATURE_NAMES))
    col = {name: i for i, name in enumerate(RANKER_FEATURE_NAMES)}
    # candidate item 2 (category 1), rank 0
    assert x[0, col["retrieval_score"]] == np.float32(0.9)
    assert x[0, col["retrieval_rank"]] == 0
    np.testing.assert_array_equal(
        x[0, col["item_log_pop_all"] : col["item_log_price"] + 1], item_features[2]
    )
    assert x[0, col["user_category_affinity"]] == 0.75
    assert x[0, col["user_recent_category_share"]] == 1.0  # both recent items are category 1
    assert x[0, col["user_log_activity"]] == np.float32(np.log1p(3.0))
    assert x[0, col["user_recent_count"]] == 2
    # candidate item 0 (category 0), rank 1
    assert x[1, col["retrieval_rank"]] == 1
    assert x[1, col["user_category_affinity"]] == 0.25
    assert x[1, col["user_recent_category_share"]] == 0.0
    # padding is all zeros
    assert not x[2].any()


# --- collaborative signals ----------------------------------------------------------------------


def _collaborative(per_source: int = 2) -> Collaborative:
    """4 items. EASE: 0 -> 1 (0.5), 0 -> 2 (0.2), 1 -> 3 (0.4); kNN: 0 -> 3 (0.9);
    transitions: 1 -> 2 (1.0)."""

    def m(entries: dict[tuple[int, int], float]) -> sp.csr_matrix:
        rows, cols = zip(*entries, strict=True)
        return sp.csr_matrix(
            (np.array(list(entries.values()), np.float32), (rows, cols)), shape=(4, 4)
        )

    return Collaborative(
        ease=m({(0, 1): 0.5, (0, 2): 0.2, (1, 3): 0.4}),
        knn=m({(0, 3): 0.9}),
        transitions=m({(1, 2): 1.0}),
        last_items=1,
        per_source=per_source,
    )


def test_cf_scores_read_all_seen_items_or_only_the_newest() -> None:
    recent = np.array([2, 1, 0])  # newest first: item 1, then item 0 (row + 1)
    sparse = cf_scores(_collaborative(), np.array([1, 0, 1]), recent)  # repeats count once
    scores = sparse.dense(4)
    assert scores.shape == (len(CF_SIGNALS), 4) and scores.dtype == np.float32
    assert sparse.rows[CF_SIGNALS.index("knn")].tolist() == [3]  # only what the rows hold
    by = dict(zip(CF_SIGNALS, scores, strict=True))
    np.testing.assert_allclose(by["ease"], [0.0, 0.5, 0.2, 0.4])  # items 0 and 1
    np.testing.assert_allclose(by["ease_last"], [0.0, 0.0, 0.0, 0.4])  # item 1 only
    np.testing.assert_allclose(by["next"], [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(by["knn"], [0.0, 0.0, 0.0, 0.9])


def test_cf_candidates_take_each_signals_top_unseen_positive_items_once() -> None:
    scores = np.array(
        [
            [0.0, 0.5, 0.2, 0.4],  # ease: 1 excluded (seen) -> 3, 2
            [0.0, 0.0, 0.0, 0.4],  # ease_last: 3 taken already -> nothing
            [0.0, 0.0, 1.0, -1.0],  # next: 2 taken; -1 is no evidence
            [0.7, 0.0, 0.0, 0.9],  # knn: 3 taken -> 0 (taken by retrieval) -> nothing
        ],
        dtype=np.float32,
    )
    scores = _sparse(scores)
    extra = cf_candidates(scores, excluded=np.array([1]), taken=np.array([0]), per_source=2)
    assert extra.tolist() == [3, 2]
    # One per signal: ease gives 3 only, and 2 comes from next instead.
    assert cf_candidates(scores, np.array([1]), np.array([0]), per_source=1).tolist() == [3, 2]
    assert cf_candidates(scores, np.array([1]), np.array([0, 2]), per_source=1).tolist() == [3]


def test_cf_features_score_share_and_rank_by_hand() -> None:
    scores = np.zeros((len(CF_SIGNALS), 4), dtype=np.float32)
    scores[0] = [9.0, 0.5, 0.2, 0.4]  # ease; item 0 is seen, so the best unseen is 0.5
    candidates = np.array([3, 2, -1])
    x = cf_features(_sparse(scores), candidates, seen=np.array([0]))
    assert x.shape == (3, len(CF_FEATURE_NAMES))
    col = {name: x[:, j] for j, name in enumerate(CF_FEATURE_NAMES)}
    np.testing.assert_allclose(col["ease_score"], [0.4, 0.2, 0.0])
    np.testing.assert_allclose(col["ease_share"], [0.8, 0.4, 0.0])
    np.testing.assert_allclose(col["ease_rank"], [0.0, 1.0, 0.0])  # padding is zeroed
    np.testing.assert_allclose(col["knn_share"], [0.0, 0.0, 0.0])  # no evidence: no blow-up
    assert RANKER_FEATURE_NAMES_CF[: len(RANKER_FEATURE_NAMES)] == RANKER_FEATURE_NAMES


def _sparse(dense: np.ndarray) -> SignalScores:
    """[signals, n_items] dense scores as SignalScores (every nonzero item scored)."""
    rows = tuple(np.flatnonzero(signal).astype(np.int64) for signal in dense)
    return SignalScores(rows, tuple(s[r] for s, r in zip(dense, rows, strict=True)))


def _dense_reference(
    model: Collaborative, seen: np.ndarray, recent: np.ndarray, taken: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates and features computed over whole [n_items] score vectors, the way they were
    before the scores went sparse: the sparse path must give the same rows and the same bits."""
    everything = np.unique(seen)
    newest = recent[: model.last_items]
    newest = newest[newest > 0] - 1
    basket = recent[: model.basket_items]
    basket = basket[basket > 0] - 1
    reads = {
        "ease": everything,
        "ease_last": newest,
        "next": newest,
        "knn": everything,
        "basket": basket,
    }
    dense = np.stack(
        [
            np.bincount(
                model.matrix(s)[reads[s]].tocoo().col,
                weights=model.matrix(s)[reads[s]].tocoo().data,
                minlength=n,
            ).astype(np.float32)
            for s in CF_SIGNALS
        ]
    )
    blocked = np.zeros(n, dtype=bool)
    blocked[everything] = True
    blocked[taken] = True
    out = []
    for signal in dense:
        open_ = np.flatnonzero((signal > 0) & ~blocked)
        values = signal[open_]
        if len(open_) > model.per_source:
            keep = np.argpartition(-values, model.per_source - 1)[: model.per_source]
            open_, values = open_[keep], values[keep]
        top = open_[np.lexsort((open_, -values))]
        blocked[top] = True
        out.append(top)
    extra = np.concatenate(out)
    candidates = np.concatenate([taken, extra])
    columns = []
    for signal in dense:
        at = signal[candidates]
        best = np.where(np.isin(np.arange(n), everything), -np.inf, signal).max(initial=0.0)
        rank = np.empty(len(candidates), dtype=np.float32)
        rank[np.argsort(-at, kind="stable")] = np.arange(len(candidates), dtype=np.float32)
        columns += [at, np.clip(at / np.maximum(best, np.float32(1e-9)), -1.0, 1.0), rank]
    return extra, np.stack(columns, axis=1).astype(np.float32)


def test_sparse_signals_match_the_dense_computation_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    n = 3000

    def random_matrix(density: float, signed: bool) -> sp.csr_matrix:
        m = sp.random(n, n, density=density, format="csr", dtype=np.float32, random_state=rng)
        if signed:
            m.data = (m.data - 0.4).astype(np.float32)  # EASE weights can be negative
        return m

    model = Collaborative(
        ease=random_matrix(0.004, signed=True),
        knn=random_matrix(0.003, signed=False),
        transitions=random_matrix(0.002, signed=False),
        last_items=4,
        per_source=25,
        basket=random_matrix(0.003, signed=False),
        basket_items=5,
    )
    for _ in range(20):
        seen = rng.integers(0, n, rng.integers(1, 80))
        recent = np.r_[rng.choice(seen, min(6, len(seen)), replace=False) + 1, 0, 0]
        taken = rng.choice(np.setdiff1d(np.arange(n), seen), 30, replace=False)
        scores = cf_scores(model, seen, recent)
        extra = cf_candidates(scores, np.unique(seen), taken, model.per_source)
        x = cf_features(scores, np.concatenate([taken, extra]), np.unique(seen))
        want_extra, want_x = _dense_reference(model, seen, recent, taken, n)
        assert extra.tolist() == want_extra.tolist()
        assert np.array_equal(x, want_x)  # the same bits, not merely close


def test_sparse_row_sum_holds_every_touched_column_and_nothing_else() -> None:
    m = sp.csr_matrix(np.array([[0.0, 1.0, -1.0], [0.0, -1.0, 0.0]], dtype=np.float32))
    columns, sums = sparse_row_sum(m, np.array([0, 1]))
    assert columns.tolist() == [1, 2] and sums.tolist() == [0.0, -1.0]  # a cancelled 0 is kept
    empty_columns, empty_sums = sparse_row_sum(m, np.zeros(0, dtype=np.int64))
    assert len(empty_columns) == 0 and len(empty_sums) == 0


def test_row_sum_adds_the_chosen_rows_of_a_sparse_matrix() -> None:
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((30, 40)) < 0.2, rng.random((30, 40)), 0.0).astype(np.float32)
    rows = np.array([3, 0, 17, 29, 5])
    got = row_sum(sp.csr_matrix(dense), rows)
    np.testing.assert_allclose(got, dense[rows].sum(axis=0), rtol=1e-6)
    assert row_sum(sp.csr_matrix(dense), np.zeros(0, dtype=np.int64)).tolist() == [0.0] * 40


def test_cf_candidates_take_excluded_rows_in_any_order_and_with_repeats() -> None:
    rng = np.random.default_rng(3)
    scores = _sparse(np.where(rng.random((len(CF_SIGNALS), 500)) < 0.3, rng.random(500), 0.0))
    excluded = rng.integers(0, 500, 400)  # most of the catalog, unsorted, repeated
    taken = np.array([7, 3])
    want = cf_candidates(scores, np.unique(excluded), taken, per_source=5)
    assert cf_candidates(scores, excluded, taken, per_source=5).tolist() == want.tolist()
    assert not np.isin(want, excluded).any() and not np.isin(want, taken).any()
