"""Offline metrics against values worked out by hand on tiny rankings, plus top-k and reporting."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from rich.console import Console

from training.evaluate import (
    catalog_coverage_at_k,
    cold_start_hit_rate,
    embedding_diversity,
    evaluate_ranking,
    hit_rate_at_k,
    intra_list_diversity,
    metrics_table,
    mrr,
    ndcg_at_k,
    recall_at_k,
    relevance_matrix,
    top_k_from_scores,
    write_metrics_json,
)

# Four users, ten items. User 1's list is padded; user 3 has nothing relevant, so every accuracy
# metric below averages over users 0, 1 and 2 only.
RANKED = np.array(
    [
        [0, 1, 2, 3],
        [4, 5, -1, -1],
        [6, 7, 8, 9],
        [1, 0, 2, 3],
    ],
    dtype=np.int64,
)
RELEVANT = [np.array([1, 3, 9]), np.array([7]), np.array([6, 8]), np.array([], dtype=np.int64)]
#                          items: 0    1    2    3    4    5    6    7    8    9
CATEGORIES = np.array(["a", "a", "b", "c", "a", "b", "c", "c", "c", "a"])
N_ITEMS = 10

L3 = math.log2(3)  # discount of rank 2 is 1/L3
L5 = math.log2(5)  # discount of rank 4 is 1/L5


@pytest.mark.parametrize("relevant", [RELEVANT, relevance_matrix(RELEVANT, n_items=N_ITEMS)])
def test_recall_divides_by_all_relevant_items(relevant: object) -> None:
    # @2: u0 {0,1}∩{1,3,9}=1 -> 1/3; u1 0/1; u2 {6,7}∩{6,8}=1 -> 1/2. (1/3+0+1/2)/3 = 5/18.
    # (The min(|rel|, k) variant would give u0 1/2 and 1/3 overall: this checks we do not use it.)
    assert recall_at_k(RANKED, relevant, 2) == pytest.approx(5 / 18)
    # @4: u0 {1,3} -> 2/3; u1 0; u2 {6,8} -> 1. (2/3+0+1)/3 = 5/9.
    assert recall_at_k(RANKED, relevant, 4) == pytest.approx(5 / 9)
    # k past the end of the lists changes nothing.
    assert recall_at_k(RANKED, relevant, 100) == pytest.approx(5 / 9)


def test_ndcg_uses_binary_gains_and_ideal_of_min_rel_k() -> None:
    # @2: u0 hit at rank 2: DCG 1/L3, IDCG (2 hits) 1+1/L3. u1 0.
    #     u2 hit at rank 1: DCG 1, same IDCG. (1/L3 + 1) / (1 + 1/L3) / 3 = 1/3.
    assert ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)
    # @4: u0 hits at ranks 2 and 4: (1/L3 + 1/L5) / (1 + 1/L3 + 1/2) [3 relevant, ideal 3 hits];
    #     u2 hits at ranks 1 and 3: (1 + 1/2) / (1 + 1/L3) [2 relevant, ideal 2 hits].
    u0 = (1 / L3 + 1 / L5) / (1 + 1 / L3 + 0.5)
    u2 = 1.5 / (1 + 1 / L3)
    assert ndcg_at_k(RANKED, RELEVANT, 4) == pytest.approx((u0 + 0 + u2) / 3)
    assert (u0 + u2) / 3 == pytest.approx(0.47264, abs=1e-5)


def test_ndcg_penalises_a_list_shorter_than_k() -> None:
    # One user, relevant {4, 5}, list [4, -1]: DCG 1; at k=2 the ideal shows both: 1 + 1/L3.
    assert ndcg_at_k(np.array([[4, -1]]), [np.array([4, 5])], 2) == pytest.approx(1 / (1 + 1 / L3))


def test_hit_rate_and_mrr() -> None:
    # @1: only u2 (item 6) -> 1/3. @2: u0 (item 1) and u2 -> 2/3.
    assert hit_rate_at_k(RANKED, RELEVANT, 1) == pytest.approx(1 / 3)
    assert hit_rate_at_k(RANKED, RELEVANT, 2) == pytest.approx(2 / 3)
    # First hits: u0 rank 2 -> 1/2, u1 none -> 0, u2 rank 1 -> 1. (0.5 + 0 + 1) / 3 = 0.5.
    assert mrr(RANKED, RELEVANT) == pytest.approx(0.5)


def test_mrr_looks_past_k_and_ignores_padding() -> None:
    # Relevant item at rank 5 behind a -1: 1/5; the padding is never a hit even if "-1" were listed.
    ranked = np.array([[3, 2, 1, -1, -1], [0, 1, 2, 3, 4]])
    # u0 relevant {7} never appears -> 0; u1 relevant {4} at rank 5 -> 1/5. Mean 0.1.
    assert mrr(ranked, [np.array([7]), np.array([4])]) == pytest.approx(0.1)


def test_no_relevant_items_anywhere_gives_nan() -> None:
    empty = [np.array([], dtype=np.int64)] * 4
    assert math.isnan(recall_at_k(RANKED, empty, 10))
    assert math.isnan(ndcg_at_k(RANKED, empty, 10))
    assert math.isnan(mrr(RANKED, empty))


def test_coverage_counts_distinct_items_in_top_k() -> None:
    # top-2 lists: {0,1}, {4,5}, {6,7}, {1,0} -> 6 distinct of 10.
    assert catalog_coverage_at_k(RANKED, 2, N_ITEMS) == pytest.approx(0.6)
    # top-4: items 0..9 all appear (padding is not an item) -> 10 of 12.
    assert catalog_coverage_at_k(RANKED, 4, 12) == pytest.approx(10 / 12)
    with pytest.raises(ValueError, match="out of range"):
        catalog_coverage_at_k(RANKED, 4, 9)


def test_intra_list_diversity_counts_pairs_of_different_categories() -> None:
    # @3: u0 a,a,b -> 2 of 3 pairs differ; u1 a,b (padded) -> 1 of 1; u2 c,c,c -> 0 of 3;
    # u3 a,a,b -> 2/3. Mean (2/3 + 1 + 0 + 2/3) / 4 = 7/12.
    assert intra_list_diversity(RANKED, 3, CATEGORIES) == pytest.approx(7 / 12)
    # @2: u0 a,a 0; u1 a,b 1; u2 c,c 0; u3 a,a 0 -> 1/4.
    assert intra_list_diversity(RANKED, 2, CATEGORIES) == pytest.approx(0.25)
    # Integer codes give the same answer as labels.
    codes = np.array([0, 0, 1, 2, 0, 1, 2, 2, 2, 0])
    assert intra_list_diversity(RANKED, 3, codes) == pytest.approx(7 / 12)


def test_diversity_skips_lists_without_pairs() -> None:
    # u0 [4] has no pair and is skipped; u1 [0, 2] is a,b -> 1.
    ranked = np.array([[4, -1, -1], [0, 2, -1]])
    assert intra_list_diversity(ranked, 3, CATEGORIES) == pytest.approx(1.0)
    assert math.isnan(intra_list_diversity(RANKED, 1, CATEGORIES))


def test_embedding_diversity_is_one_minus_mean_pairwise_cosine() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    # list [0,1,2]: cosines 0, 1/√2, 1/√2 -> mean √2/3; list [0,3]: cosine 1 -> diversity 0.
    ranked = np.array([[0, 1, 2], [0, 3, -1]])
    expected = ((1 - math.sqrt(2) / 3) + 0.0) / 2
    assert embedding_diversity(ranked, 3, emb) == pytest.approx(expected)


def test_cold_start_hit_rate_covers_only_cold_users_with_relevant_items() -> None:
    # cold {1,2,3}: u1 misses, u2 hits at @2, u3 has nothing relevant -> 1/2.
    assert cold_start_hit_rate(RANKED, RELEVANT, 2, np.array([0, 1, 1, 1], bool)) == 0.5
    # cold {0}: u0 hits item 1 at rank 2 -> 1.
    assert cold_start_hit_rate(RANKED, RELEVANT, 2, np.array([1, 0, 0, 0], bool)) == 1.0
    assert math.isnan(cold_start_hit_rate(RANKED, RELEVANT, 2, np.array([0, 0, 0, 1], bool)))


def test_evaluate_ranking_default_keys() -> None:
    result = evaluate_ranking(RANKED, RELEVANT, n_items=N_ITEMS, item_categories=CATEGORIES)
    assert list(result) == [
        "recall@10",
        "recall@50",
        "recall@100",
        "ndcg@10",
        "hit_rate@10",
        "mrr",
        "coverage@10",
        "diversity@10",
        "cold_start_hit_rate@10",
        "users",
    ]
    assert result["users"] == 3
    assert math.isnan(result["cold_start_hit_rate@10"])
    assert result["recall@10"] == pytest.approx(5 / 9)
    assert result["coverage@10"] == pytest.approx(1.0)


def test_evaluate_ranking_agrees_with_hand_values_at_small_k() -> None:
    cold = np.array([0, 1, 1, 1], bool)
    result = evaluate_ranking(
        RANKED, RELEVANT, n_items=N_ITEMS, item_categories=CATEGORIES, cold_mask=cold, ks=(2, 4)
    )
    assert result == pytest.approx(
        {
            "recall@2": 5 / 18,
            "recall@4": 5 / 9,
            "ndcg@2": 1 / 3,
            "hit_rate@2": 2 / 3,
            "mrr": 0.5,
            "coverage@2": 0.6,
            "diversity@2": 0.25,
            "cold_start_hit_rate@2": 0.5,
            "users": 3,
        }
    )


def test_bad_rankings_are_rejected() -> None:
    with pytest.raises(ValueError, match="repeats"):
        recall_at_k(np.array([[1, 2, 1]]), [np.array([1])], 3)
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(RANKED, relevance_matrix(RELEVANT[:3]), 3)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(RANKED, RELEVANT, 0)


def test_relevance_matrix_dedupes_and_drops_explicit_zeros() -> None:
    m = relevance_matrix([np.array([3, 1, 3]), np.array([], dtype=np.int64)], n_items=5)
    assert m.shape == (2, 5)
    assert m.indices.tolist() == [1, 3] and m.indptr.tolist() == [0, 2, 2]
    explicit_zero = sp.csr_matrix((np.array([0.0, 2.0]), (np.array([0, 0]), np.array([1, 2]))))
    assert relevance_matrix(explicit_zero).indices.tolist() == [2]


def test_top_k_orders_by_score_and_breaks_ties_by_lower_index() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert top_k_from_scores(scores, 3).tolist() == [[4, 1, 2], [0, 1, 2]]
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0, 0], [1, 0, 1, 0, 0]]))
    assert top_k_from_scores(scores, 3, exclude).tolist() == [[4, 2, 3], [1, 3, 4]]
    # k past the catalog: pad with -1 after the 4 eligible items of row 0 and 3 of row 1.
    assert top_k_from_scores(scores, 6, exclude).tolist() == [
        [4, 2, 3, 0, -1, -1],
        [1, 3, 4, -1, -1, -1],
    ]
    assert scores[0, 1] == 0.5  # the caller's array is untouched


def test_top_k_never_returns_nan_or_minus_inf() -> None:
    scores = np.array([[np.nan, 2.0, -np.inf, 1.0]])
    assert top_k_from_scores(scores, 4).tolist() == [[1, 3, -1, -1]]


def test_top_k_matches_a_full_stable_sort_with_many_ties() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, size=(300, 200)).astype(np.float32)  # heavy ties
    exclude = sp.random(300, 200, density=0.2, random_state=3, format="csr")
    masked = scores.astype(np.float64)
    masked[exclude.nonzero()] = -np.inf
    expected = np.argsort(-masked, axis=1, kind="stable")[:, :25]
    assert np.array_equal(top_k_from_scores(scores, 25, exclude), expected)


def test_metrics_table_has_a_row_per_system_and_a_column_per_metric() -> None:
    results = {
        "popularity": {"recall@10": 0.1234567, "users": 42, "cold_start_hit_rate@10": math.nan},
        "ease": {"recall@10": 0.5, "users": 42},
    }
    table = metrics_table(results, "offline")
    assert [c.header for c in table.columns] == [
        "system",
        "recall@10",
        "users",
        "cold_start_hit_rate@10",
    ]
    assert table.row_count == 2
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "popularity" in text and "0.1235" in text and "0.5000" in text and "42" in text


def test_write_metrics_json_is_strict_json(tmp_path: Path) -> None:
    results = {"ease": {"recall@10": 0.5, "users": 3, "cold_start_hit_rate@10": math.nan}}
    path = write_metrics_json(results, tmp_path / "out" / "metrics.json")
    assert json.loads(path.read_text()) == {
        "ease": {"recall@10": 0.5, "users": 3, "cold_start_hit_rate@10": None}
    }


def test_evaluation_of_5k_users_takes_milliseconds() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 5000, 3700
    # 100 distinct items per user (a stride-37 comb at a random offset: 37 * 99 < 3700) and 5
    # relevant ones on an independent comb; each relevant item lands in the list w.p. 100/3700.
    ranked = (rng.integers(0, n_items, (n_users, 1)) + 37 * np.arange(100)) % n_items
    relevant = list((rng.integers(0, n_items, (n_users, 1)) + 701 * np.arange(5)) % n_items)
    categories = rng.integers(0, 20, n_items)
    start = time.perf_counter()
    result = evaluate_ranking(ranked, relevant, n_items=n_items, item_categories=categories)
    elapsed = time.perf_counter() - start
    # Random lists: expected recall@100 is 100/3700 ≈ 0.027.
    assert result["recall@100"] == pytest.approx(100 / n_items, rel=0.15)
    assert elapsed < 0.5, f"evaluate_ranking took {elapsed:.3f}s"
