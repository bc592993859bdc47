"""XGBoost learning-to-rank ranker over the two-tower's top-N candidates.

Trained on labels the towers and collaborative models behind its features did not see (`training.labels`:
a late time window or each user's newest items; graded positive interactions), grouped by user (one group per simulated request), `rank:ndcg`, early stopping on held-out groups.
The feature matrix comes from `serve_app.contract.ranker_features`, the same code serving runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import xgboost as xgb
from tqdm import tqdm

from serve_app.contract import (
    CF_SIGNALS,
    RANKER_FEATURE_NAMES,
    RANKER_FEATURE_NAMES_CF,
    Collaborative,
    cf_candidates,
    cf_features,
    cf_scores,
    ranker_features,
)
from training.config import RankerConfig
from training.evaluate import score_block_rows
from training.features import UserStates

log = logging.getLogger(__name__)


def exact_candidates(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    seen: sp.csr_matrix,
    n: int,
    chunk: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items by dot product per user, seen items excluded; (items [B, n], scores [B, n]).

    Users are scored in blocks (default: `score_block_rows`, at most 256), each reduced to its top n
    before the next, so memory is a block of scores whatever the catalog size."""
    n = min(n, item_vecs.shape[0])
    chunk = chunk or score_block_rows(item_vecs.shape[0], most=256)
    items = np.empty((len(user_vecs), n), dtype=np.int64)
    scores = np.empty((len(user_vecs), n), dtype=np.float32)
    blocks = range(0, len(user_vecs), chunk)
    bar = tqdm(blocks, desc="exact top-n", unit="block", disable=not progress, leave=False)
    for s in bar:
        sc = user_vecs[s : s + chunk] @ item_vecs.T
        coo = seen[s : s + chunk].tocoo()
        sc[coo.row, coo.col] = -np.inf
        top = np.argpartition(-sc, n - 1, axis=1)[:, :n]
        top_scores = np.take_along_axis(sc, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        items[s : s + chunk] = np.take_along_axis(top, order, axis=1)
        scores[s : s + chunk] = np.take_along_axis(top_scores, order, axis=1)
    # A user who has seen nearly everything gets -inf scores: mark those slots as padding.
    items[~np.isfinite(scores)] = -1
    scores[~np.isfinite(scores)] = 0.0
    return items, scores


def candidate_matrix(
    candidates: np.ndarray,
    scores: np.ndarray,
    states: UserStates,
    item_features: np.ndarray,
    item_categories: np.ndarray,
) -> np.ndarray:
    return ranker_features(
        candidates,
        scores,
        item_features,
        item_categories,
        states.category_prefs,
        states.event_count,
        states.recent_items,
    )


@dataclass(frozen=True)
class RankingInputs:
    """Candidates of a batch of users and the ranker's matrix over them, as serving builds them."""

    retrieved: np.ndarray  # int64 [B, n]: the two-tower's top n (the "retrieval" system), -1 padded
    candidates: np.ndarray  # int64 [B, W]: retrieved, then the collaborative ones; -1 padded
    features: np.ndarray  # float32 [B * W, len(names)]
    names: tuple[str, ...]

    @property
    def valid(self) -> np.ndarray:
        return self.candidates >= 0


def ranking_inputs(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    states: UserStates,
    item_features: np.ndarray,
    item_categories: np.ndarray,
    n: int,
    collaborative: Collaborative | None,
    progress: bool = False,
) -> RankingInputs:
    """Two-tower top-n without seen items, then (with `collaborative`) each signal's top unseen
    items, and the ranker features of every candidate: `serve_app.recommend.retrieve` and
    `candidate_features` for a batch (no filters, no popularity rows)."""
    retrieved, scores = exact_candidates(user_vecs, item_vecs, states.seen, n, progress=progress)
    if collaborative is None:
        x = candidate_matrix(retrieved, scores, states, item_features, item_categories)
        return RankingInputs(retrieved, retrieved, x, RANKER_FEATURE_NAMES)
    b = len(user_vecs)
    width = retrieved.shape[1] + len(CF_SIGNALS) * collaborative.per_source
    candidates = np.full((b, width), -1, dtype=np.int64)
    cand_scores = np.zeros((b, width), dtype=np.float32)
    cf_x = np.zeros(
        (b, width, len(RANKER_FEATURE_NAMES_CF) - len(RANKER_FEATURE_NAMES)), np.float32
    )
    seen = states.seen.tocsr()
    bar = tqdm(range(b), desc="collaborative candidates", unit="user", disable=not progress)
    for row in bar:
        seen_rows = np.sort(seen.indices[seen.indptr[row] : seen.indptr[row + 1]])
        signal = cf_scores(collaborative, seen_rows, states.recent_items[row])
        base = retrieved[row][retrieved[row] >= 0]
        extra = cf_candidates(signal, seen_rows, base, collaborative.per_source)
        rows = np.concatenate([base, extra])
        candidates[row, : len(rows)] = rows
        cand_scores[row, : len(base)] = scores[row, : len(base)]
        cand_scores[row, len(base) : len(rows)] = item_vecs[extra] @ user_vecs[row]
        cf_x[row] = cf_features(signal, candidates[row], seen_rows)
    base_x = candidate_matrix(candidates, cand_scores, states, item_features, item_categories)
    x = np.concatenate([base_x.reshape(b, width, -1), cf_x], axis=2)
    return RankingInputs(
        retrieved, candidates, x.reshape(b * width, -1).astype(np.float32), RANKER_FEATURE_NAMES_CF
    )


def graded_labels(candidates: np.ndarray, labels: sp.csr_matrix) -> np.ndarray:
    """Relevance grade of each candidate ([B, N]) from a [B, n_items] grade matrix."""
    rows = np.repeat(np.arange(candidates.shape[0]), candidates.shape[1])
    cols = np.where(candidates >= 0, candidates, 0).ravel()
    grades = np.asarray(labels[rows, cols]).ravel().reshape(candidates.shape)
    return np.where(candidates >= 0, grades, 0).astype(np.float32)


class _RoundsBar(xgb.callback.TrainingCallback):
    """A tqdm bar over boosting rounds (with its ETA up to `max_rounds`; early stopping ends it)."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="ranker rounds", unit="round", leave=False)

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        self.bar.update(1)
        return False

    def after_training(self, model: Any) -> Any:
        self.bar.close()
        return model


def fit_lambdarank(
    train: xgb.DMatrix,
    valid: xgb.DMatrix,
    config: RankerConfig,
    max_depth: int,
    progress: bool = False,
) -> tuple[xgb.Booster, int, float]:
    """`rank:ndcg` with early stopping on `valid`; returns (booster cut at its best iteration,
    best iteration, valid NDCG@10). Cutting the trees means serving needs no iteration_range."""
    params = {
        "objective": "rank:ndcg",
        "eval_metric": "ndcg@10",
        "eta": config.learning_rate,
        "max_depth": max_depth,
        "min_child_weight": 1.0,
        "subsample": 0.9,
        "colsample_bytree": 0.9,
        "lambdarank_pair_method": "topk",
        "lambdarank_num_pair_per_sample": 10,
        "tree_method": "hist",
        "nthread": config.threads,
        "seed": config.seed,
    }
    evals_result: dict[str, dict[str, list[float]]] = {}
    booster = xgb.train(
        params,
        train,
        num_boost_round=config.max_rounds,
        evals=[(valid, "valid")],
        early_stopping_rounds=config.early_stopping_rounds,
        evals_result=evals_result,
        verbose_eval=False,
        callbacks=[_RoundsBar(config.max_rounds)] if progress else None,
    )
    best = int(booster.best_iteration)
    return booster[: best + 1], best, float(evals_result["valid"]["ndcg@10"][best])


@dataclass(frozen=True)
class RankerResult:
    booster: xgb.Booster
    best_iteration: int
    valid_ndcg10: float
    train_groups: int


def train_ranker(
    features: np.ndarray,
    grades: np.ndarray,
    n_candidates: int,
    config: RankerConfig,
    names: tuple[str, ...] = RANKER_FEATURE_NAMES,
    valid: np.ndarray | None = None,
    progress: bool = False,
) -> RankerResult:
    """Train `rank:ndcg` on groups of `n_candidates` rows; groups without a positive are dropped.

    `valid` (bool [groups, n_candidates]) marks real candidates; padding rows are left out.
    """
    x = features.reshape(-1, n_candidates, features.shape[1])
    y = grades.reshape(-1, n_candidates)
    ok = np.ones(y.shape, dtype=bool) if valid is None else valid.reshape(y.shape)
    useful = y.max(axis=1) > 0
    x, y, ok = x[useful], y[useful], ok[useful]
    if len(x) < 4:
        raise ValueError(f"only {len(x)} ranker groups have a positive candidate: need at least 4")
    rng = np.random.default_rng(config.seed)
    is_valid = rng.random(len(x)) < config.validation_share
    is_valid[0], is_valid[-1] = False, True  # both sides non-empty

    def dmatrix(mask: np.ndarray) -> xgb.DMatrix:
        rows = ok[mask]
        d = xgb.DMatrix(x[mask][rows], label=y[mask][rows], feature_names=list(names))
        d.set_group(rows.sum(axis=1))
        return d

    booster, best, ndcg = fit_lambdarank(
        dmatrix(~is_valid), dmatrix(is_valid), config, config.max_depth, progress
    )
    log.info("ranker: %d groups, best iteration %d, valid ndcg@10 %.4f", len(x), best, ndcg)
    return RankerResult(booster, best, ndcg, int((~is_valid).sum()))


def rerank(booster: xgb.Booster, features: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates reordered by ranker score ([B, N]); padding stays last."""
    scores = booster.inplace_predict(features).reshape(candidates.shape)
    scores = np.where(candidates >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)
