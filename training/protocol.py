"""Issue 9's evaluation protocol end to end: first-purchase split, tuned baselines, recserve's systems.

The protocol, as the issue states it: keep the first purchase of each (customer, product); per
customer the last 20% by time (at least 1; ties in row order, i.e. invoice line order) are test,
the rest train; each system ranks ALL products for each customer except that customer's training
products; relevant = the customer's test products. A customer whose only pair is a test pair has
no history: every system ranks popularity for them (recserve's cold-start path) and they make up
cold_start_hit_rate@10. Metrics come from `evaluate.evaluate_ranking`.

It runs in two rounds ("settings") of the same shape:
- validation: history = train minus the last 20% of each customer's training pairs (carved by the
  same `first_purchase_split`), targets = those pairs. Every hyper-parameter is chosen here: EASE
  lambda, kNN neighbours, recency half-life, two-tower temperature and epochs, ranker depth and
  rounds; and the ranker learns its labels here (features from the validation history, labels =
  validation items; early stopping and depth on a held-out share of these customers).
- test: history = the whole train part, targets = the test pairs. Every model is refit on this
  history with the chosen hyper-parameters (the two-tower for the tuned number of epochs) and each
  system ranks once. No number computed on test pairs feeds back into any choice.

Leak-freedom, concretely: within a round every model, user state and feature reads that round's
history pairs only; the validation round's targets serve only as targets (tuning, early stopping,
ranker labels), and nothing reads a test pair before the single test ranking is scored. Time-dependent features look backwards from the customer's own as-of time (their
last history pair): item sales in the 1/7/30 days up to it and item age at it; an item first sold
after it has no age (NaN). Whole-history quantities (EASE, kNN, transitions, item popularity) use
all customers' history pairs, later ones included, exactly as the protocol lets every baseline do.
Catalog metadata (title, price, category) is used as given.

recserve's systems: "recserve retrieval" is the two-tower (`training.two_tower`) over user states
built from each customer's history pairs. "recserve retrieval + ranker" merges the two-tower's
top candidates with collaborative ones (EASE on the whole history, on a recency-weighted history
and on the customer's last few items; "next line in the invoice" transitions; item-kNN) and
reorders them with XGBoost `rank:ndcg` over the contract's ranker features plus those scores.
The last items matter because the per-customer cut usually falls inside an invoice (on Online
Retail, 91% of customers' first test pair shares its timestamp with their last training pair):
what they bought a moment ago says most about what comes next, as the user_realtime view does
online.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import xgboost as xgb
from pydantic import BaseModel, ConfigDict, Field
from sklearn.feature_extraction.text import TfidfVectorizer

from serve_app.contract import (
    ITEM_FEATURE_NAMES,
    RANKER_FEATURE_NAMES,
    ranker_features,
    title_tokens,
)
from serve_app.schemas import POSITIVE_EVENT_TYPES
from training.baselines import (
    EASERecommender,
    ItemKNNRecommender,
    PopularityRecommender,
    tune_ease_lambda,
)
from training.config import TrainingSettings, TwoTowerConfig
from training.data import Dataset
from training.evaluate import evaluate_ranking, ndcg_at_k, top_k_from_scores
from training.features import UserStates, encode_log, training_rows, user_states_at
from training.ranker import fit_lambdarank
from training.split import first_purchase_split
from training.two_tower import encode_users, item_inputs, train_two_tower

log = logging.getLogger(__name__)

SYSTEMS = ("popularity", "item-kNN", "EASE", "recserve retrieval", "recserve retrieval + ranker")
RETRIEVAL, FINAL = SYSTEMS[3], SYSTEMS[4]
SECONDS_PER_DAY = 86_400.0
# Collaborative signals the ranker reads besides the two-tower, each as score / share / rank.
CF_SIGNALS = ("ease", "ease_recent", "ease_last", "next", "knn")
# Signals that read a customer's last items: the "within the current invoice" evidence.
SEQUENCE_SIGNALS = ("ease_last", "next")


class ProtocolConfig(BaseModel):
    """Knobs of the protocol and the grids tuned on its validation round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share per customer")
    ks: tuple[int, ...] = Field((10, 50), description="cutoffs; NDCG/hit rate/coverage at the min")
    ease_lambdas: tuple[float, ...] = (100.0, 200.0, 400.0, 800.0)
    knn_neighbors: tuple[int, ...] = (20, 50, 100, 200)
    knn_shrink: float = Field(10.0, ge=0.0)
    recency_days: tuple[float, ...] = Field(
        (7.0, 30.0, 90.0, 365.0), description="half-life grid of the recency-weighted history"
    )
    last_items: int = Field(3, ge=1, description="a customer's last pairs read as the context")
    next_gap: int = Field(3, ge=1, description="invoice lines apart still counted as 'next'")
    two_tower_temperatures: tuple[float, ...] = (0.1, 0.2)
    two_tower_epochs: int = Field(5, ge=1, description="epoch cap while tuning the two-tower")
    candidates_per_source: int = Field(50, ge=1, description="top-n merged from each source")
    ranker_depths: tuple[int, ...] = (4, 6)
    ranker_features: tuple[str, ...] = Field(
        ("contract", "cf", "sequence"),
        description="feature groups: contract (serve_app.contract), cf, sequence (last items)",
    )


# ---------------------------------------------------------------------------------------------
# The split


@dataclass(frozen=True)
class Setting:
    """One round of the protocol: the pairs models learn from and the held-out pairs to find."""

    name: str
    history: pd.DataFrame  # first-purchase event rows, time order, ties in row order
    targets: pd.DataFrame


@dataclass(frozen=True)
class ProtocolSplit:
    validation: Setting  # history = train minus validation pairs, targets = validation pairs
    test: Setting  # history = train, targets = test pairs


def protocol_split(events: pd.DataFrame, test_fraction: float = 0.2) -> ProtocolSplit:
    """The issue's split, and the validation split carved the same way out of its train part.

    Every frame comes back in time order, ties in the input's row order (the split's tie rule).
    """
    train, test = first_purchase_split(events, test_fraction)
    fit, valid = first_purchase_split(train, test_fraction)

    def ordered(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values("timestamp", kind="stable")

    return ProtocolSplit(
        Setting("validation", ordered(fit), ordered(valid)),
        Setting("test", ordered(train), ordered(test)),
    )


@dataclass(frozen=True)
class Encoded:
    """A setting over fixed user/item indices; pair arrays are in sequence (time, row) order."""

    history: sp.csr_matrix  # [n_users, n_items] 1 = history pair
    targets: sp.csr_matrix  # [n_users, n_items] 1 = held-out pair
    pair_user: np.ndarray  # int64
    pair_item: np.ndarray  # int64
    pair_time: np.ndarray  # float64 seconds since epoch
    pair_session: np.ndarray  # int64 invoice code (-1: unknown)
    as_of: np.ndarray  # float64 [n_users]: last history pair's time, NaN without history

    @property
    def users(self) -> np.ndarray:
        """The evaluated customers: every one with at least one held-out pair."""
        return np.flatnonzero(np.diff(self.targets.indptr) > 0)


def _binary(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)
    m.data[:] = 1.0
    return m


def encode_setting(setting: Setting, user_index: pd.Index, item_index: pd.Index) -> Encoded:
    """Integer arrays and matrices of a setting (pairs on items outside `item_index` dropped)."""
    shape = (len(user_index), len(item_index))
    h = setting.history
    item = item_index.get_indexer(pd.Index(h["item_id"]))
    known = item >= 0
    h = h.loc[known]
    user = user_index.get_indexer(pd.Index(h["user_id"])).astype(np.int64)
    item = item[known].astype(np.int64)
    times = pd.DatetimeIndex(h["timestamp"]).asi8 / 1e9
    session = (
        pd.factorize(h["session_id"].where(h["session_id"] != ""))[0].astype(np.int64)
        if "session_id" in h
        else np.full(len(h), -1, dtype=np.int64)
    )
    as_of = np.full(len(user_index), np.nan)
    np.fmax.at(as_of, user, times)
    t = setting.targets
    t_item = item_index.get_indexer(pd.Index(t["item_id"]))
    t = t.loc[t_item >= 0]
    targets = _binary(user_index.get_indexer(pd.Index(t["user_id"])), t_item[t_item >= 0], shape)
    return Encoded(_binary(user, item, shape), targets, user, item, times, session, as_of)


@dataclass(frozen=True)
class Tuned:
    """Hyper-parameters chosen on the validation round, with the validation figures behind them."""

    ease_lambda: float
    knn_neighbors: int
    half_life_days: float
    two_tower_temperature: float
    two_tower_epochs: int
    ranker_depth: int = 0
    ranker_rounds: int = 0
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Collaborative signals: dense scores [len(users), n_items] from a setting's history


def _last_items_matrix(enc: Encoded, n: int) -> sp.csr_matrix:
    """1 on each customer's last `n` history pairs (sequence order)."""
    from_end = pd.Series(enc.pair_user).groupby(enc.pair_user).cumcount(ascending=False).to_numpy()
    keep = from_end < n
    return _binary(enc.pair_user[keep], enc.pair_item[keep], enc.history.shape)


def _recency_matrix(enc: Encoded, half_life_days: float) -> sp.csr_matrix:
    """History weighted by 2^(-age / half-life), age counted back from the customer's as-of."""
    age_days = (enc.as_of[enc.pair_user] - enc.pair_time) / SECONDS_PER_DAY
    weight = np.exp2(-age_days / half_life_days)
    return sp.csr_matrix((weight, (enc.pair_user, enc.pair_item)), shape=enc.history.shape)


def transition_matrix(enc: Encoded, max_gap: int) -> sp.csr_matrix:
    """T[a, b] = sum of 1/gap over invoices where b comes `gap` <= `max_gap` lines after a."""
    n_items = enc.history.shape[1]
    # Each invoice's lines together, in sequence order (invoices sharing a timestamp may interleave).
    order = np.lexsort((np.arange(len(enc.pair_session)), enc.pair_session))
    session, item = enc.pair_session[order], enc.pair_item[order]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for gap in range(1, max_gap + 1):
        same = (session[gap:] == session[:-gap]) & (session[gap:] >= 0)
        rows.append(item[:-gap][same])
        cols.append(item[gap:][same])
        vals.append(np.full(int(same.sum()), 1.0 / gap))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_items, n_items),
    )


@dataclass(frozen=True)
class CFModels:
    """The collaborative models of one round, fit on its history with the tuned settings."""

    ease: EASERecommender
    knn: ItemKNNRecommender
    transitions: sp.csr_matrix
    half_life_days: float
    last_items: int


def fit_cf_models(enc: Encoded, tuned: Tuned, config: ProtocolConfig) -> CFModels:
    """EASE, kNN and transitions on the round's history, with the tuned hyper-parameters."""
    return CFModels(
        ease=EASERecommender(lam=tuned.ease_lambda).fit(enc.history),
        knn=ItemKNNRecommender(tuned.knn_neighbors, config.knn_shrink).fit(enc.history),
        transitions=transition_matrix(enc, config.next_gap),
        half_life_days=tuned.half_life_days,
        last_items=config.last_items,
    )


def cf_signals(models: CFModels, enc: Encoded, users: np.ndarray) -> dict[str, np.ndarray]:
    """Every collaborative score [len(users), n_items] (float32) for these customers."""
    history = enc.history[users]
    recent = _recency_matrix(enc, models.half_life_days)[users]
    last = _last_items_matrix(enc, models.last_items)[users]
    dense = {
        "ease": models.ease.score_history(history),
        "ease_recent": models.ease.score_history(recent),
        "ease_last": models.ease.score_history(last),
        "next": np.asarray((last @ models.transitions).todense()),
        "knn": models.knn.score_history(history),
    }
    return {name: scores.astype(np.float32) for name, scores in dense.items()}


# ---------------------------------------------------------------------------------------------
# Tuning on the validation round


def _ndcg_of_scores(scores: np.ndarray, enc: Encoded, users: np.ndarray, k: int) -> float:
    ranked = top_k_from_scores(scores, k, enc.history[users])
    return ndcg_at_k(ranked, enc.targets[users], k)


def tune_cf(enc: Encoded, config: ProtocolConfig) -> Tuned:
    """EASE lambda, kNN neighbours and the recency half-life by NDCG@k on validation targets."""
    k = min(config.ks)
    warm = enc.users[np.diff(enc.history.indptr)[enc.users] > 0]
    lam, ease_scores = tune_ease_lambda(enc.history, enc.targets, config.ease_lambdas, k)
    knn_scores = {
        float(n): _ndcg_of_scores(
            ItemKNNRecommender(n, config.knn_shrink)
            .fit(enc.history)
            .score_history(enc.history[warm]),
            enc,
            warm,
            k,
        )
        for n in config.knn_neighbors
    }
    ease = EASERecommender(lam=lam).fit(enc.history)
    recency_scores = {
        days: _ndcg_of_scores(ease.score_history(_recency_matrix(enc, days)[warm]), enc, warm, k)
        for days in config.recency_days
    }
    scores = {
        "ease_lambda": ease_scores,
        "knn_neighbors": knn_scores,
        "half_life_days": recency_scores,
    }
    return Tuned(
        ease_lambda=lam,
        knn_neighbors=int(max(knn_scores, key=lambda n: knn_scores[n])),
        half_life_days=max(recency_scores, key=lambda d: recency_scores[d]),
        two_tower_temperature=math.nan,
        two_tower_epochs=0,
        scores={name: {str(key): v for key, v in s.items()} for name, s in scores.items()},
    )


# ---------------------------------------------------------------------------------------------
# The two-tower (recserve retrieval)


@dataclass(frozen=True)
class TowerRun:
    """A trained two-tower's outputs for one round's evaluated customers."""

    user_vecs: np.ndarray  # [len(users), dim]
    item_vecs: np.ndarray  # [n_items, dim]
    states: UserStates
    best_epoch: int
    valid_recall50: float


def _tower_config(base: TwoTowerConfig, n_users: int, n_items: int) -> TwoTowerConfig:
    # Hash tables sized to the data (2x distinct ids keeps collisions rare), as the pipeline does.
    return base.model_copy(
        update={
            "user_buckets": min(base.user_buckets, max(1024, 2 * n_users)),
            "item_buckets": min(base.item_buckets, max(1024, 2 * n_items)),
        }
    )


def train_tower(
    history: pd.DataFrame,
    catalog: pd.DataFrame,
    category_codes: np.ndarray,
    n_categories: int,
    valid: tuple[UserStates, list[np.ndarray]],
    eval_user_ids: np.ndarray,
    config: TwoTowerConfig,
    progress: bool = False,
) -> TowerRun:
    """Train on `history` (one row per first purchase, state just before it) and encode users.

    `valid` is the (states, relevant items) pair `train_two_tower` keeps its best epoch by.
    User states of `eval_user_ids` come from their history pairs alone (no time cutoff needed).
    """
    item_index = pd.Index(catalog["item_id"])
    encoded = encode_log(history, item_index, category_codes, n_categories)
    everything = np.ones(len(encoded.ts), dtype=bool)
    no_position = np.full(len(encoded.ts), -1, dtype=np.int64)
    rows = training_rows(encoded, no_position, everything, config.history_length)
    items = item_inputs(catalog, category_codes, config)
    # Purchases carry no slate position, so the position-bias propensity is flat.
    result = train_two_tower(
        rows, items, n_categories, np.ones(50), valid[0], valid[1], config, progress=progress
    )
    states = user_states_at(encoded, eval_user_ids, None, config.history_length)
    best = max(h["valid_recall@50"] for h in result.history)
    return TowerRun(
        encode_users(result.user_tower, states, config),
        result.item_embeddings,
        states,
        result.best_epoch,
        float(best),
    )


def tower_states(
    history: pd.DataFrame,
    catalog: pd.DataFrame,
    category_codes: np.ndarray,
    n_categories: int,
    user_ids: np.ndarray,
    history_length: int,
) -> UserStates:
    """User states from each customer's history pairs alone."""
    encoded = encode_log(history, pd.Index(catalog["item_id"]), category_codes, n_categories)
    return user_states_at(encoded, user_ids, None, history_length)


def dot_scores(user_vecs: np.ndarray, item_vecs: np.ndarray) -> np.ndarray:
    """The two-tower's retrieval scores [users, n_items] (exact search: ~3.7k items)."""
    return (user_vecs @ item_vecs.T).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Candidates and ranker features


def merge_candidates(
    sources: Sequence[np.ndarray], exclude: sp.csr_matrix, per_source: int, order_by: np.ndarray
) -> np.ndarray:
    """Union of each source's top-`per_source` (excluded items never), ordered by `order_by` desc.

    Returns int64 [n_users, width], -1 padded at the end; width = the largest union.
    """
    tops = np.concatenate([top_k_from_scores(s, per_source, exclude) for s in sources], axis=1)
    tops = np.sort(tops, axis=1)
    repeated = np.zeros(tops.shape, dtype=bool)
    repeated[:, 1:] = tops[:, 1:] == tops[:, :-1]
    tops[repeated] = -1
    safe = np.maximum(tops, 0)
    key = np.where(tops >= 0, -np.take_along_axis(order_by, safe, axis=1), np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    merged = np.take_along_axis(tops, order, axis=1)
    width = int((merged >= 0).sum(axis=1).max(initial=0))
    return merged[:, : max(width, 1)]


def _at(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return np.take_along_axis(scores, np.maximum(candidates, 0), axis=1)


def _rank_within(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """0 = the best candidate of the row by `values` (padding ranked last)."""
    order = np.argsort(np.where(valid, -values, np.inf), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :], axis=1)
    return ranks.astype(np.float32)


WINDOW_DAYS = (1, 7, 30)


def item_features_as_of(
    enc: Encoded, users: np.ndarray, candidates: np.ndarray, log_price: np.ndarray
) -> dict[str, np.ndarray]:
    """Item statistics of each candidate as of its customer's as-of time, from history pairs.

    The contract's item table is one snapshot "as of now" for serving; here "now" is each
    customer's last history pair, so sales windows [as_of - d, as_of] and age are counted per
    (customer, candidate). Whole-history sales and the price are per item.
    """
    items = np.maximum(candidates, 0)
    n_items = len(log_price)
    # One sorted key per pair, item-major (item * span + time): a window of one item's sales is
    # then a searchsorted range. span leaves room for the longest window below t = 0.
    t0 = float(enc.pair_time.min(initial=0.0))
    span = float(enc.pair_time.max(initial=0.0)) - t0 + (max(WINDOW_DAYS) + 1) * SECONDS_PER_DAY
    keys = np.sort(enc.pair_item * span + (enc.pair_time - t0))
    base = items * span
    as_of = (enc.as_of[users] - t0)[:, None]
    known = ~np.isnan(as_of)
    as_of = np.where(known, as_of, 0.0)
    out = {"item_log_pop_all": np.log1p(np.bincount(enc.pair_item, minlength=n_items))[items]}
    for days in WINDOW_DAYS:
        lo = np.searchsorted(keys, base + as_of - days * SECONDS_PER_DAY, side="left")
        hi = np.searchsorted(keys, base + as_of, side="right")
        out[f"item_log_pop_{days}d"] = np.log1p(np.where(known, hi - lo, 0))
    first_sale = np.full(n_items, np.inf)
    np.fmin.at(first_sale, enc.pair_item, enc.pair_time - t0)
    age = (as_of - first_sale[items]) / SECONDS_PER_DAY
    out["item_age_days"] = np.where(known & (age >= 0), age, np.nan)  # not sold yet: no age
    out["item_log_price"] = log_price[items]
    return {name: np.asarray(v, dtype=np.float32) for name, v in out.items()}


def title_similarity(catalog: pd.DataFrame) -> np.ndarray:
    """Cosine of TF-IDF title vectors [n_items, n_items] (contract tokens), 0 on the diagonal."""
    titles = catalog["title"].fillna("").astype(str).tolist()
    try:
        vectors = TfidfVectorizer(analyzer=title_tokens).fit_transform(titles)
    except ValueError:  # no token in any title
        return np.zeros((len(titles), len(titles)), dtype=np.float32)
    sim = np.asarray((vectors @ vectors.T).todense(), dtype=np.float32)
    np.fill_diagonal(sim, 0.0)
    return sim


@dataclass(frozen=True)
class RankerInputs:
    """One round's candidate lists and their feature tensor, each feature tagged with its group."""

    users: np.ndarray  # [U] evaluated customers with a history
    candidates: np.ndarray  # int64 [U, N], -1 padded
    features: np.ndarray  # float32 [U, N, F], NaN on padding
    names: tuple[str, ...]
    # Per feature: "contract" (serve_app.contract's names), "cf" (collaborative scores and the
    # 30-day sales window) or "sequence" (read from the customer's last items).
    groups: tuple[str, ...]

    @property
    def valid(self) -> np.ndarray:
        return self.candidates >= 0

    def select(self, groups: Sequence[str]) -> RankerInputs:
        """The same candidates with only the features of `groups`."""
        keep = [j for j, g in enumerate(self.groups) if g in groups]
        if not keep:
            raise ValueError(f"no ranker feature in groups {list(groups)}")
        return RankerInputs(
            self.users,
            self.candidates,
            self.features[:, :, keep],
            tuple(self.names[j] for j in keep),
            tuple(self.groups[j] for j in keep),
        )


@dataclass(frozen=True)
class ItemSide:
    """Catalog-derived arrays shared by both rounds."""

    categories: np.ndarray  # int64 [n_items]
    log_price: np.ndarray  # float64 [n_items]
    title_sim: np.ndarray  # float32 [n_items, n_items]


def _evidence(scores: np.ndarray) -> np.ndarray:
    # A collaborative score of 0 means "no evidence": never a candidate on that source's account.
    return np.where(scores > 0, scores, -np.inf)


def ranker_inputs(
    enc: Encoded,
    users: np.ndarray,
    tower: TowerRun,
    cf: dict[str, np.ndarray],
    item_side: ItemSide,
    config: ProtocolConfig,
) -> RankerInputs:
    """Candidates from every source, the contract's features and the CF and sequence extras.

    `tower` and `cf` hold rows for exactly `users`. Candidates are ordered by two-tower score, so
    the contract's retrieval_rank is the two-tower's rank among them.
    """
    tt = dot_scores(tower.user_vecs, tower.item_vecs)
    exclude = enc.history[users]
    sources = [tt, *(_evidence(cf[name]) for name in CF_SIGNALS)]
    candidates = merge_candidates(sources, exclude, config.candidates_per_source, tt)
    valid = candidates >= 0
    b, n = candidates.shape
    columns: dict[str, tuple[str, np.ndarray]] = {}
    contract = ranker_features(
        candidates,
        _at(tt, candidates),
        np.zeros((len(item_side.categories), len(ITEM_FEATURE_NAMES)), np.float32),
        item_side.categories,
        tower.states.category_prefs,
        tower.states.event_count,
        tower.states.recent_items,
    ).reshape(b, n, len(RANKER_FEATURE_NAMES))
    for j, name in enumerate(RANKER_FEATURE_NAMES):
        columns[name] = ("contract", contract[:, :, j])
    # The item columns were zeros above: they are counted per customer's as-of time here. No views
    # are logged in a purchase log, so a click-through rate is undefined and stays 0.
    for name, values in item_features_as_of(enc, users, candidates, item_side.log_price).items():
        columns[name] = ("contract" if name in columns else "cf", values)
    seen = exclude.toarray() > 0
    for name in CF_SIGNALS:
        at = _at(cf[name], candidates)
        best = np.where(seen, -np.inf, cf[name]).max(axis=1)
        group = "sequence" if name in SEQUENCE_SIGNALS else "cf"
        columns[f"{name}_score"] = (group, at)
        columns[f"{name}_share"] = (group, at / np.maximum(best, 1e-9)[:, None])
        columns[f"{name}_rank"] = (group, _rank_within(at, valid))
    last = _last_items_matrix(enc, config.last_items)[users]
    similar = np.zeros((b, n), np.float32)
    for row in range(b):
        context = last.indices[last.indptr[row] : last.indptr[row + 1]]
        if context.size:
            similar[row] = item_side.title_sim[context][:, np.maximum(candidates[row], 0)].max(0)
    columns["title_similarity_last"] = ("sequence", similar)
    names = tuple(columns)
    features = np.stack([columns[k][1] for k in names], axis=2).astype(np.float32)
    features[~valid] = np.nan
    return RankerInputs(users, candidates, features, names, tuple(columns[k][0] for k in names))


# ---------------------------------------------------------------------------------------------
# The ranker


def _labels(inputs: RankerInputs, targets: sp.csr_matrix) -> np.ndarray:
    """bool [U, N]: the candidate is one of its customer's targets."""
    dense = targets[inputs.users].toarray() > 0
    return np.take_along_axis(dense, np.maximum(inputs.candidates, 0), axis=1) & inputs.valid


def _dmatrix(inputs: RankerInputs, labels: np.ndarray, mask: np.ndarray) -> xgb.DMatrix:
    valid = inputs.valid[mask]
    d = xgb.DMatrix(
        inputs.features[mask][valid],
        label=labels[mask][valid].astype(np.float32),
        feature_names=list(inputs.names),
    )
    d.set_group(valid.sum(axis=1))
    return d


@dataclass(frozen=True)
class RankerFit:
    booster: xgb.Booster
    depth: int
    rounds: int
    holdout_ndcg10: dict[int, float]
    groups: int


def fit_ranker(
    inputs: RankerInputs,
    targets: sp.csr_matrix,
    depths: Sequence[int],
    settings: TrainingSettings,
) -> RankerFit:
    """XGBoost rank:ndcg on the validation round; depth and rounds by held-out customers' NDCG@10.

    Customers without a relevant candidate teach nothing and are dropped; a random
    `ranker.validation_share` of the rest is held out for early stopping and the depth choice.
    """
    rk = settings.ranker
    labels = _labels(inputs, targets)
    useful = np.asarray(labels.any(axis=1))
    rng = np.random.default_rng(rk.seed)
    held = np.asarray(rng.random(useful.shape[0]) < rk.validation_share)
    train = _dmatrix(inputs, labels, useful & ~held)
    holdout = _dmatrix(inputs, labels, useful & held)
    fits: dict[int, tuple[xgb.Booster, float]] = {}
    for depth in depths:
        booster, best, ndcg = fit_lambdarank(train, holdout, rk, depth)
        fits[depth] = (booster, ndcg)
        log.info(
            "ranker depth %d: %d rounds, holdout ndcg@10 %.4f", depth, best + 1, fits[depth][1]
        )
    depth = max(fits, key=lambda d: fits[d][1])
    booster = fits[depth][0]
    return RankerFit(
        booster,
        depth,
        booster.num_boosted_rounds(),
        {d: f[1] for d, f in fits.items()},
        int((useful & ~held).sum()),
    )


def fill_from(ranked: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Each row's -1 slots filled, in order, with that row's `fallback` items it lacks."""
    out = ranked.copy()
    for row in np.flatnonzero((ranked < 0).any(axis=1)):
        have = ranked[row][ranked[row] >= 0]
        extra = [i for i in fallback[row] if i >= 0 and i not in set(have.tolist())]
        filled = np.concatenate([have, np.asarray(extra, dtype=np.int64)])[: ranked.shape[1]]
        out[row] = -1
        out[row, : len(filled)] = filled
    return out


def rank_candidates(booster: xgb.Booster, inputs: RankerInputs, k: int) -> np.ndarray:
    """Top-k of each customer's candidates by ranker score; -1 padded."""
    b, n, f = inputs.features.shape
    scores = booster.inplace_predict(inputs.features.reshape(b * n, f)).reshape(b, n)
    scores = np.where(inputs.valid, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(inputs.candidates, order, axis=1)[:, :k]
    if ranked.shape[1] < k:
        ranked = np.hstack([ranked, np.full((b, k - ranked.shape[1]), -1, dtype=np.int64)])
    return ranked


# ---------------------------------------------------------------------------------------------
# The whole protocol


@dataclass
class ProtocolResult:
    """Test-round metrics per system, and how they were reached."""

    metrics: dict[str, dict[str, float]]
    tuned: Tuned
    timings: dict[str, float]
    sizes: dict[str, int]
    user_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))  # test customers
    item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    # Per system: int64 [len(user_ids), max(ks)] item indices into item_ids, best first, -1 padded.
    rankings: dict[str, np.ndarray] = field(default_factory=dict)
    ranker: dict[str, object] = field(default_factory=dict)
    ablations: dict[str, dict[str, float]] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        log.info("protocol: %s done in %.1fs", name, self.timings[name])


def _relevant_lists(targets: sp.csr_matrix, users: np.ndarray) -> list[np.ndarray]:
    rows = targets[users]
    return [rows.indices[rows.indptr[i] : rows.indptr[i + 1]] for i in range(len(users))]


def _with_cold_rows(
    warm_ranked: np.ndarray, warm: np.ndarray, users: np.ndarray, cold_ranked: np.ndarray
) -> np.ndarray:
    """Rankings of `users`: warm users' rows from the system, the others' from `cold_ranked`."""
    out = cold_ranked.copy()
    out[np.searchsorted(users, warm)] = warm_ranked
    return out


@dataclass(frozen=True)
class Rounds:
    """Both rounds of the protocol over one user and item index, and the catalog's arrays."""

    split: ProtocolSplit
    user_ids: np.ndarray  # str, sorted
    catalog: pd.DataFrame
    items: ItemSide
    n_categories: int
    validation: Encoded
    test: Encoded

    @staticmethod
    def warm(enc: Encoded) -> np.ndarray:
        """Evaluated customers with at least one history pair."""
        return enc.users[np.diff(enc.history.indptr)[enc.users] > 0]


def prepare_rounds(dataset: Dataset, config: ProtocolConfig) -> Rounds:
    """Split the data set's positive interactions on catalog products and encode both rounds."""
    catalog = dataset.catalog.reset_index(drop=True)
    item_index = pd.Index(catalog["item_id"].astype(str))
    events = dataset.events
    # A purchase log holds nothing else; other logs keep their clicks and carts as "purchases".
    keep = events["event_type"].isin(POSITIVE_EVENT_TYPES) & (
        item_index.get_indexer(pd.Index(events["item_id"])) >= 0
    )
    events = events.loc[keep.to_numpy()]
    split = protocol_split(events, config.test_fraction)
    user_index = pd.Index(np.sort(events["user_id"].astype(str).unique()))
    codes, names = pd.factorize(catalog["category"], sort=True)
    items = ItemSide(
        codes.astype(np.int64),
        np.log1p(catalog["price"].to_numpy(np.float64)),
        title_similarity(catalog),
    )
    return Rounds(
        split=split,
        user_ids=user_index.to_numpy(dtype=str),
        catalog=catalog,
        items=items,
        n_categories=len(names),
        validation=encode_setting(split.validation, user_index, item_index),
        test=encode_setting(split.test, user_index, item_index),
    )


def fit_towers(
    rounds: Rounds,
    settings: TrainingSettings,
    config: ProtocolConfig,
    progress: bool = False,
) -> tuple[TowerRun, TowerRun, dict[float, float]]:
    """The two-tower of each round: tuned on validation, then refit on the whole train part.

    Returns (validation-round run, test-round run, validation recall@50 per temperature).
    """
    base = _tower_config(settings.two_tower, len(rounds.user_ids), len(rounds.catalog))
    v_warm, t_warm = Rounds.warm(rounds.validation), Rounds.warm(rounds.test)
    common = (rounds.catalog, rounds.items.categories, rounds.n_categories)
    v_states = tower_states(
        rounds.split.validation.history, *common, rounds.user_ids[v_warm], base.history_length
    )
    valid = (v_states, _relevant_lists(rounds.validation.targets, v_warm))
    runs = {
        temperature: train_tower(
            rounds.split.validation.history,
            *common,
            valid,
            rounds.user_ids[v_warm],
            base.model_copy(update={"temperature": temperature, "epochs": config.two_tower_epochs}),
            progress,
        )
        for temperature in config.two_tower_temperatures
    }
    temperature = max(runs, key=lambda t: runs[t].valid_recall50)
    epochs = runs[temperature].best_epoch
    # The refit runs the tuned number of epochs (patience = epochs: it never stops early).
    # train_two_tower still keeps its best epoch by recall on the validation pairs, which the
    # refit trains on: a sanity signal that can only prefer later epochs, never a test number.
    refit = base.model_copy(
        update={"temperature": temperature, "epochs": epochs, "patience": epochs}
    )
    test_run = train_tower(
        rounds.split.test.history, *common, valid, rounds.user_ids[t_warm], refit, progress
    )
    return runs[temperature], test_run, {t: r.valid_recall50 for t, r in runs.items()}


def evaluate_protocol(
    dataset: Dataset,
    settings: TrainingSettings,
    config: ProtocolConfig | None = None,
    *,
    ablations: Sequence[Sequence[str]] = (),
    progress: bool = False,
) -> ProtocolResult:
    """Run the protocol on `dataset`: tune on validation, refit, rank the test pairs once.

    `ablations` names extra feature-group sets (e.g. ("contract",)) for which a ranker is trained
    with the tuned depth on the same candidates and reported as "ranker on <groups>".
    """
    config = config or ProtocolConfig()
    timer = _Timer()
    k_max = max(config.ks)
    torch.set_num_threads(settings.two_tower.threads)

    with timer("split"):
        rounds = prepare_rounds(dataset, config)
        v_enc, t_enc = rounds.validation, rounds.test
        v_warm, t_warm = Rounds.warm(v_enc), Rounds.warm(t_enc)

    with timer("tune collaborative models"):
        tuned = tune_cf(v_enc, config)

    with timer("two-tower"):
        v_tower, t_tower, tower_scores = fit_towers(rounds, settings, config, progress)
        temperature = max(tower_scores, key=lambda t: tower_scores[t])
        tuned = replace(
            tuned,
            two_tower_temperature=temperature,
            two_tower_epochs=v_tower.best_epoch,
            scores={
                **tuned.scores,
                "two_tower_temperature": {str(t): v for t, v in tower_scores.items()},
            },
        )

    with timer("ranker: validation round"):
        v_cf = cf_signals(fit_cf_models(v_enc, tuned, config), v_enc, v_warm)
        v_inputs = ranker_inputs(v_enc, v_warm, v_tower, v_cf, rounds.items, config)
        del v_cf
        chosen = v_inputs.select(config.ranker_features)
        ranker = fit_ranker(chosen, v_enc.targets, config.ranker_depths, settings)
        tuned = replace(tuned, ranker_depth=ranker.depth, ranker_rounds=ranker.rounds)

    with timer("test round"):
        history, users = t_enc.history, t_enc.users
        models = fit_cf_models(t_enc, tuned, config)
        popularity = PopularityRecommender().fit(history)
        # Customers without history get this list in every system: the cold-start path.
        cold_lists = popularity.recommend(users, k_max, history)
        ranked: dict[str, np.ndarray] = {
            "popularity": cold_lists,
            "item-kNN": models.knn.recommend(users, k_max, history),
            "EASE": models.ease.recommend(users, k_max, history),
        }
        tt_scores = dot_scores(t_tower.user_vecs, t_tower.item_vecs)
        ranked[RETRIEVAL] = _with_cold_rows(
            top_k_from_scores(tt_scores, k_max, history[t_warm]), t_warm, users, cold_lists
        )
        t_cf = cf_signals(models, t_enc, t_warm)
        t_inputs = ranker_inputs(t_enc, t_warm, t_tower, t_cf, rounds.items, config)
        del t_cf
        # A customer with fewer candidates than k_max gets the rest by popularity.
        warm_popular = popularity.recommend(t_warm, k_max, history)

        def final_lists(booster: xgb.Booster, groups: Sequence[str]) -> np.ndarray:
            lists = rank_candidates(booster, t_inputs.select(groups), k_max)
            return _with_cold_rows(fill_from(lists, warm_popular), t_warm, users, cold_lists)

        ranked[FINAL] = final_lists(ranker.booster, config.ranker_features)
        cold = np.diff(history.indptr)[users] == 0

        def metrics_of(lists: np.ndarray) -> dict[str, float]:
            return evaluate_ranking(
                lists,
                t_enc.targets[users],
                n_items=len(rounds.catalog),
                item_categories=rounds.items.categories,
                cold_mask=cold,
                ks=config.ks,
            )

        metrics = {name: metrics_of(lists) for name, lists in ranked.items()}

    ablation_metrics: dict[str, dict[str, float]] = {}
    for groups in ablations:
        with timer(f"ablation {'+'.join(groups)}"):
            fit = fit_ranker(v_inputs.select(groups), v_enc.targets, [ranker.depth], settings)
            ablation_metrics[f"ranker on {'+'.join(groups)}"] = metrics_of(
                final_lists(fit.booster, groups)
            )

    found = _labels(t_inputs, t_enc.targets).sum(axis=1)
    gains = ranker.booster.get_score(importance_type="gain")
    return ProtocolResult(
        metrics=metrics,
        tuned=tuned,
        timings=timer.timings,
        sizes={
            "customers": len(rounds.user_ids),
            "products": len(rounds.catalog),
            "train_pairs": len(rounds.split.test.history),
            "test_pairs": len(rounds.split.test.targets),
            "validation_pairs": len(rounds.split.validation.targets),
            "test_customers": len(users),
            "cold_test_customers": int(cold.sum()),
        },
        user_ids=rounds.user_ids[users],
        item_ids=rounds.catalog["item_id"].to_numpy(dtype=str),
        rankings=ranked,
        ranker={
            "features": list(chosen.names),
            "depth": ranker.depth,
            "rounds": ranker.rounds,
            "holdout_ndcg@10": {str(d): v for d, v in ranker.holdout_ndcg10.items()},
            "train_groups": ranker.groups,
            "test_candidates_per_customer": float(t_inputs.valid.sum(axis=1).mean()),
            "test_candidate_recall": float((found / np.diff(t_enc.targets[t_warm].indptr)).mean()),
            "importance_gain": {
                name: round(float(np.sum(gains[name])), 3)
                for name in sorted(gains, key=lambda n: -float(np.sum(gains[n])))
            },
        },
        ablations=ablation_metrics,
    )


def run_protocol(dataset: Dataset, settings: TrainingSettings) -> dict[str, dict[str, float]]:
    """Test-round metrics of every system in `SYSTEMS` order (what `recserve evaluate` prints)."""
    return evaluate_protocol(dataset, settings).metrics
