"""The recommendation pipeline as pure, in-process functions, one per stage of the online graph.

user features -> tower input -> user vector (+ real-time delta) -> FAISS search without seen and filtered
items -> collaborative candidates (when the bundle has them) -> popularity merge -> ranker features
(`serve_app.contract.ranker_features`, `cf_features`) -> XGBoost scores -> re-rank (cold-start blend,
per-category cap, MMR). The Ray Serve deployments (`user_tower`, `retriever`, `ranker`, `reranker`) are
thin shells over `embed_users`, `retrieve`, `score` and `rerank`; the benchmark and the parity test
chain the same functions in one process. No I/O here: features are read by the caller.

Semantics follow the offline evaluation exactly (`training.pipeline`, `training.two_tower.encode_users`):
user bucket = hash_bucket(user_id, user_buckets) + 1, or 0 for a user whose snapshot has no positive
event; profile = [log1p(event_count), category_prefs] in float32; history = item row + 1, newest first,
0-padded; top-N by inner product without the items the user interacted with positively. With no
real-time events, MMR lambda 1 and no category cap, the ranking is the offline ranking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import faiss
import numpy as np
import torch

from serve_app.bundle import Bundle
from serve_app.config import RankingConfig
from serve_app.contract import (
    ITEM_FEATURE_NAMES,
    RANKER_FEATURE_NAMES_CF,
    RANKER_FEATURE_SETS,
    Collaborative,
    cf_candidates,
    cf_features,
    cf_scores,
    hash_bucket,
    ranker_features,
)
from serve_app.errors import BundleIntegrityError

if TYPE_CHECKING:  # serve_app.features imports Feast (seconds): only the user tower needs it
    from serve_app.features import UserFeatures

Source = Literal["retrieval", "collaborative", "popularity"]
# model_missing: the user's variant had no loaded version; another variant's version answered.
Fallback = Literal["cold_start", "degraded", "model_missing"]
Timings = tuple[tuple[str, float], ...]

DEFAULT_CANDIDATES = 100  # a bundle that does not record its training value
# Up to this many excluded rows, search over-fetches and drops them; beyond, a FAISS ID selector
# skips them inside the search (a filter to a few categories can exclude most of the catalog).
OVERFETCH_LIMIT = 1_000


# --- records passed between stages ---------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Request filters: items and categories to leave out, or the only categories allowed."""

    exclude_item_ids: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()  # non-empty: only these categories


@dataclass(frozen=True)
class Query:
    """One recommendation request as the graph sees it (validated by the ingress)."""

    request_id: str
    user_id: str
    k: int
    filters: Filters = field(default_factory=Filters)
    segment: str | None = None  # a category known for a cold user (request context)
    mmr_lambda: float | None = None  # request override of RankingConfig.mmr_lambda
    category_cap: bool = True  # False: no per-category cap (filters and no-repeat still hold)
    model_version: str = ""  # set by the router
    variant: str = ""


@dataclass(frozen=True)
class UserState:
    """UserTower output: the user vector and what later stages need to know about the user."""

    query: Query
    vector: np.ndarray | None  # float32 [D]; None when nothing is known (cold start)
    event_count: float  # positive interactions at the snapshot
    category_prefs: np.ndarray  # float32 [C]
    recent: np.ndarray  # int64 [L]: item row + 1, newest first, 0 = padding
    seen: np.ndarray  # int64 rows, sorted, unique: never recommended again
    interactions: int  # distinct positive items known, snapshot and since
    degraded: bool
    timings: Timings = ()


@dataclass(frozen=True)
class Candidates:
    """Retriever output: rows[:n_retrieved] from the index in score order, then the collaborative
    rows (n_collaborative of them), then popularity rows."""

    user: UserState
    rows: np.ndarray  # int64 [N]
    retrieval_scores: np.ndarray  # float32 [N]: user vector . item vector (0 for a cold user)
    n_retrieved: int
    timings: Timings = ()
    n_collaborative: int = 0
    # float32 [N, len(CF_FEATURE_NAMES)] when the bundle's ranker reads collaborative features.
    cf_columns: np.ndarray | None = None


@dataclass(frozen=True)
class Scored:
    """Ranker output: one XGBoost score per candidate (empty for a cold user: nothing to rank)."""

    candidates: Candidates
    scores: np.ndarray  # float32 [N]
    timings: Timings = ()


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    rank: int  # 1-based
    source: Source


@dataclass(frozen=True)
class Recommendations:
    """ReRanker output: the response body's content."""

    request_id: str
    user_id: str
    variant: str
    model_version: str
    items: tuple[RecommendedItem, ...]
    fallback: Fallback | None
    timings: Timings = ()


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)


def with_timing(timings: Timings, stage: str, start: float, end: float) -> Timings:
    return (*timings, (stage, _ms(start, end)))


# --- the model of one bundle version -------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ServingModel:
    """A loaded bundle plus what serving derives from it once (popularity rows, tower sizes)."""

    bundle: Bundle
    version: str
    user_buckets: int
    history_length: int
    n_candidates: int
    category_codes: Mapping[str, int]
    popularity_global: np.ndarray  # int64 rows, most popular first
    popularity_by_category: Mapping[str, np.ndarray]
    popularity_prior: np.ndarray  # float32 [n_items]: 1 for the most popular, 0 if not listed
    collaborative: Collaborative | None = None  # set when the ranker reads collaborative features

    @property
    def n_items(self) -> int:
        return len(self.bundle.item_ids)

    @classmethod
    def from_bundle(cls, bundle: Bundle, version: str | None = None) -> ServingModel:
        """Check the bundle speaks this server's contract, then derive the serving tables."""
        manifest = bundle.manifest
        features = tuple(manifest.ranker_features)
        if features not in RANKER_FEATURE_SETS:
            raise BundleIntegrityError(
                f"ranker features {manifest.ranker_features} are none of this server's "
                f"{[list(f) for f in RANKER_FEATURE_SETS]}",
                file="manifest.json",
            )
        uses_cf = features == RANKER_FEATURE_NAMES_CF
        if uses_cf and bundle.collaborative is None:
            raise BundleIntegrityError(
                "the ranker reads collaborative features but the bundle has no collaborative models",
                file="manifest.json",
            )
        if tuple(manifest.item_feature_names) != ITEM_FEATURE_NAMES:
            raise BundleIntegrityError(
                f"item features {manifest.item_feature_names} are not {list(ITEM_FEATURE_NAMES)}",
                file="manifest.json",
            )
        tower = manifest.user_tower
        try:
            user_buckets = int(tower["user_buckets"])
            history_length = int(tower["history_length"])
        except (KeyError, TypeError, ValueError):
            raise BundleIntegrityError(
                "user_tower lacks user_buckets/history_length", file="manifest.json"
            ) from None
        if int(tower.get("profile_dim", 1 + len(manifest.categories))) != 1 + len(
            manifest.categories
        ):
            raise BundleIntegrityError(
                "user_tower profile_dim is not 1 + categories", file="manifest.json"
            )
        index = bundle.item_index
        top = [index[i] for i in bundle.popularity.get("global", []) if i in index]
        prior = np.zeros(len(bundle.item_ids), dtype=np.float32)
        if top:
            prior[top] = 1.0 - np.arange(len(top), dtype=np.float32) / len(top)
        by_category = {
            str(name): np.array([index[i] for i in ids if i in index], dtype=np.int64)
            for name, ids in dict(bundle.popularity.get("by_category", {})).items()
        }
        return cls(
            bundle=bundle,
            version=version or bundle.version or "local",
            user_buckets=user_buckets,
            history_length=history_length,
            n_candidates=int(manifest.params.get("ranker.candidates", DEFAULT_CANDIDATES)),
            category_codes={name: code for code, name in enumerate(manifest.categories)},
            popularity_global=np.array(top, dtype=np.int64),
            popularity_by_category=by_category,
            popularity_prior=prior,
            collaborative=bundle.collaborative if uses_cf else None,
        )

    def warm(self) -> None:
        """First calls of TorchScript, FAISS and XGBoost are slow: make them here, not on a request."""
        c = len(self.bundle.manifest.categories)
        for batch in (1, 2, 4):
            user_vectors(
                self,
                np.zeros(batch, dtype=np.int64),
                np.zeros((batch, 1 + c), dtype=np.float32),
                np.zeros((batch, self.history_length), dtype=np.int64),
            )
        vector = self.bundle.item_embeddings[:1].astype(np.float32)
        n = min(self.n_candidates, self.n_items)
        # A one-item user through search, the collaborative signals and the ranker.
        recent = np.zeros(self.history_length, dtype=np.int64)
        recent[0] = 1
        user = UserState(
            query=Query("warm", "warm", 1),
            vector=vector[0],
            event_count=1.0,
            category_prefs=np.zeros(c, dtype=np.float32),
            recent=recent,
            seen=np.zeros(1, dtype=np.int64),
            interactions=1,
            degraded=False,
        )
        ranking = RankingConfig(candidates=n, popularity_candidates=0)
        self.bundle.ranker.inplace_predict(candidate_features(self, retrieve(self, user, ranking)))


def limit_threads() -> None:
    """One thread per library per replica: small batches only lose to thread hand-offs, and
    replicas share two cores (XGBoost gets nthread=1 when the bundle is loaded)."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


# --- user tower ----------------------------------------------------------------------------------


def encode_recent(
    item_ids: Sequence[str], item_index: Mapping[str, int], length: int
) -> np.ndarray:
    """History as the tower reads it: row + 1 per known item, newest first, 0-padded to `length`.

    Items the bundle does not know (newer than its catalog) are skipped.
    """
    out = np.zeros(length, dtype=np.int64)
    rows = [item_index[i] + 1 for i in item_ids if i in item_index][:length]
    out[: len(rows)] = rows
    return out


def tower_inputs(
    model: ServingModel,
    user_ids: Sequence[str],
    event_count: np.ndarray,
    category_prefs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(user bucket int64 [B], profile float32 [B, 1 + C]) exactly as `encode_users` builds them."""
    buckets = np.fromiter(
        (hash_bucket(u, model.user_buckets) + 1 for u in user_ids), np.int64, len(user_ids)
    )
    buckets[event_count == 0] = 0
    count = np.log1p(event_count.astype(np.float32))[:, None].astype(np.float32)
    profile = np.hstack([count, category_prefs.astype(np.float32)]).astype(np.float32)
    return buckets, profile


def user_vectors(
    model: ServingModel, buckets: np.ndarray, profile: np.ndarray, recent: np.ndarray
) -> np.ndarray:
    """The user tower's forward pass: float32 [B, D], unit rows."""
    with torch.no_grad():
        out = model.bundle.user_tower(
            torch.from_numpy(buckets), torch.from_numpy(profile), torch.from_numpy(recent)
        )
    return np.asarray(out.numpy(), dtype=np.float32)


def add_delta(vectors: np.ndarray, delta: np.ndarray, weight: float) -> np.ndarray:
    """Move each user vector toward its real-time delta embedding (EMA of interacted items).

    Rows without a delta are returned bit for bit: re-normalising an already unit vector would
    change its last digits and with them the offline/online parity.
    """
    out = vectors.copy()
    has = np.abs(delta).sum(axis=1) > 0
    if weight <= 0 or not has.any():
        return out
    moved = vectors[has] + np.float32(weight) * delta[has]
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    out[has] = moved / np.maximum(norms, 1e-12)
    return out


def embed_users(
    model: ServingModel,
    queries: Sequence[Query],
    features: UserFeatures,
    seen_items: Sequence[Sequence[str]] | None,
    ranking: RankingConfig,
) -> list[UserState]:
    """User states for a batch of queries (same bundle version) from their online features.

    `seen_items` is `user_profile:seen_items` per user (None: unread, then only the recent items are
    excluded and the results are marked degraded).
    """
    index = model.bundle.item_index
    user_ids = [q.user_id for q in queries]
    recent = np.stack(
        [encode_recent(r, index, model.history_length) for r in features.recent_items]
    )
    buckets, profile = tower_inputs(model, user_ids, features.event_count, features.category_prefs)
    vectors = add_delta(
        user_vectors(model, buckets, profile, recent),
        features.delta_embedding,
        ranking.delta_weight,
    )
    states = []
    for row, query in enumerate(queries):
        seen_ids = set(features.recent_items[row])
        if seen_items is not None:
            seen_ids.update(seen_items[row])
        seen = np.unique(np.array([index[i] for i in seen_ids if i in index], dtype=np.int64))
        count = float(features.event_count[row])
        interactions = max(int(count), len(seen_ids))
        states.append(
            UserState(
                query=query,
                vector=vectors[row] if interactions > 0 else None,
                event_count=count,
                category_prefs=features.category_prefs[row],
                recent=recent[row],
                seen=seen,
                interactions=interactions,
                degraded=features.degraded or seen_items is None,
            )
        )
    return states


# --- retriever -----------------------------------------------------------------------------------


def filter_rows(model: ServingModel, filters: Filters) -> np.ndarray:
    """Rows the request's filters leave out (sorted, unique)."""
    parts = [
        np.array(
            [
                model.bundle.item_index[i]
                for i in filters.exclude_item_ids
                if i in model.bundle.item_index
            ],
            dtype=np.int64,
        )
    ]
    categories = model.bundle.item_categories
    if filters.exclude_categories:
        codes = [
            model.category_codes[c] for c in filters.exclude_categories if c in model.category_codes
        ]
        parts.append(np.flatnonzero(np.isin(categories, codes)))
    if filters.categories:
        codes = [model.category_codes[c] for c in filters.categories if c in model.category_codes]
        parts.append(np.flatnonzero(~np.isin(categories, codes)))
    return np.unique(np.concatenate(parts).astype(np.int64))


def _search_params(index: faiss.Index, excluded: np.ndarray) -> faiss.SearchParameters:
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded.astype(np.int64)))
    params: faiss.SearchParameters
    if isinstance(index, faiss.IndexHNSW):
        # Missing from faiss' bundled type stubs.
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = index.hnsw.efSearch  # type: ignore[attr-defined]
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = index.nprobe
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    # The selector must outlive the search: FAISS keeps a raw pointer to it.
    params.referenced_selector = selector  # type: ignore[attr-defined]
    return params


def search(
    index: faiss.Index, vector: np.ndarray, n: int, excluded: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` rows by inner product, best first, none of `excluded` (sorted unique rows)."""
    query = np.ascontiguousarray(vector[None, :], dtype=np.float32)
    available = int(index.ntotal) - len(excluded)
    n = min(n, available)
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    if len(excluded) <= OVERFETCH_LIMIT:
        k = min(int(index.ntotal), n + len(excluded))
        scores, rows = index.search(query, k)
        rows, scores = rows[0], scores[0]
        keep = (rows >= 0) & ~np.isin(rows, excluded)
        rows, scores = rows[keep][:n], scores[keep][:n]
    else:
        scores, rows = index.search(query, n, params=_search_params(index, excluded))
        keep = rows[0] >= 0
        rows, scores = rows[0][keep], scores[0][keep]
    return rows.astype(np.int64), scores.astype(np.float32)


def popularity_rows(
    model: ServingModel, category: str | None, excluded: np.ndarray, count: int
) -> np.ndarray:
    """Most popular rows first: the category's list (when known) ahead of the global one."""
    lists = []
    if category is not None and category in model.popularity_by_category:
        lists.append(model.popularity_by_category[category])
    lists.append(model.popularity_global)
    merged = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    _, first = np.unique(merged, return_index=True)
    merged = merged[np.sort(first)]
    merged = merged[~np.isin(merged, excluded)]
    return merged[:count].astype(np.int64)


def preferred_category(model: ServingModel, user: UserState) -> str | None:
    """The request's segment when the bundle knows it, else the user's top category, if any."""
    segment = user.query.segment
    if segment is not None and segment in model.category_codes:
        return segment
    prefs = user.category_prefs
    if len(prefs) and float(prefs.max()) > 0:
        return str(model.bundle.manifest.categories[int(np.argmax(prefs))])
    return None


def retrieve(model: ServingModel, user: UserState, ranking: RankingConfig) -> Candidates:
    """FAISS top-N without seen and filtered items; popularity merged in for light and cold users."""
    excluded = np.union1d(user.seen, filter_rows(model, user.query.filters))
    k = user.query.k
    if user.vector is None:
        rows = popularity_rows(
            model,
            preferred_category(model, user),
            excluded,
            max(ranking.popularity_candidates, 4 * k),
        )
        return Candidates(user, rows, np.zeros(len(rows), dtype=np.float32), 0, user.timings)
    n = ranking.candidates or model.n_candidates
    rows, scores = search(model.bundle.index, user.vector, max(n, k), excluded)
    n_retrieved = len(rows)
    cf = model.collaborative
    signal_scores = None
    if cf is not None:
        signal_scores = cf_scores(cf, user.seen, user.recent)
        extra = cf_candidates(signal_scores, excluded, rows, cf.per_source)
        rows, scores = _append(model, user.vector, rows, scores, extra)
    n_collaborative = len(rows) - n_retrieved
    if user.interactions < ranking.cold_start_min_events and ranking.popularity_candidates > 0:
        extra = popularity_rows(
            model,
            preferred_category(model, user),
            np.union1d(excluded, rows),
            ranking.popularity_candidates,
        )
        rows, scores = _append(model, user.vector, rows, scores, extra)
    cf_columns = None
    if signal_scores is not None:
        seen = np.zeros((1, model.n_items), dtype=bool)
        seen[0, user.seen] = True
        cf_columns = cf_features(signal_scores[:, None, :], rows[None, :], seen)[0]
    return Candidates(user, rows, scores, n_retrieved, user.timings, n_collaborative, cf_columns)


def _append(
    model: ServingModel, vector: np.ndarray, rows: np.ndarray, scores: np.ndarray, extra: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Extra candidates after the others, each with its retrieval score (user . item vector)."""
    extra_scores = (model.bundle.item_embeddings[extra] @ vector).astype(np.float32)
    return np.concatenate([rows, extra]), np.concatenate([scores, extra_scores])


# --- ranker --------------------------------------------------------------------------------------


def candidate_features(model: ServingModel, candidates: Candidates) -> np.ndarray:
    """The ranker's input matrix for one request (the training code path, one user)."""
    user = candidates.user
    x = ranker_features(
        candidates.rows[None, :],
        candidates.retrieval_scores[None, :],
        model.bundle.item_features,
        model.bundle.item_categories,
        user.category_prefs[None, :].astype(np.float32),
        np.array([user.event_count], dtype=np.float32),
        user.recent[None, :],
    )
    if model.collaborative is None:
        return x
    assert candidates.cf_columns is not None, "collaborative columns are set by the retriever"
    return np.hstack([x, candidates.cf_columns]).astype(np.float32)


def score(model: ServingModel, candidates: Candidates) -> Scored:
    """XGBoost scores of the candidates; a cold user's popularity list is not ranked."""
    if candidates.user.vector is None or len(candidates.rows) == 0:
        return Scored(candidates, np.zeros(0, dtype=np.float32), candidates.timings)
    x = candidate_features(model, candidates)
    scores = np.asarray(model.bundle.ranker.inplace_predict(x), dtype=np.float32).reshape(-1)
    return Scored(candidates, scores, candidates.timings)


# --- re-ranker -----------------------------------------------------------------------------------


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; all equal -> ones."""
    if len(values) == 0:
        return values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high - low <= 0:
        return np.ones(len(values), dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def blend(relevance: np.ndarray, prior: np.ndarray, retrieval_weight: float) -> np.ndarray:
    """Light users: w * normalised ranker score + (1 - w) * popularity prior, w in [0, 1]."""
    w = min(max(retrieval_weight, 0.0), 1.0)
    return (w * normalise(relevance) + (1.0 - w) * prior).astype(np.float32)


def category_cap(k: int, share: float) -> int | None:
    """Items of one category allowed in a list of k (None: no cap)."""
    return None if share >= 1.0 else max(1, math.ceil(share * k))


def mmr_select(
    relevance: np.ndarray,
    embeddings: np.ndarray,
    categories: np.ndarray,
    k: int,
    mmr_lambda: float,
    cap: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy MMR over the candidates: (positions chosen, their final scores), at most k.

    Each pick maximises lambda * rel - (1 - lambda) * max similarity to the items already picked,
    with rel the min-max normalised relevance and similarity the inner product clipped at 0: the
    value of every remaining item can only fall, so the chosen scores never increase. Ties go to
    the earlier candidate. lambda = 1 is the relevance order itself, with the raw relevance as score.
    `cap`: a category holding `cap` picks is closed; when only closed categories remain and the list
    is short, they reopen (a short list is worse than a concentrated one), with scores capped at the
    last one so that the list stays in score order.
    """
    n = len(relevance)
    pure = mmr_lambda >= 1.0
    rel = relevance.astype(np.float32) if pure else normalise(relevance)
    max_sim = np.zeros(n, dtype=np.float32)
    taken = np.zeros(n, dtype=bool)
    closed = np.zeros(n, dtype=bool)
    counts: dict[int, int] = {}
    relaxed = False
    picked: list[int] = []
    scores: list[float] = []
    while len(picked) < min(k, n):
        open_ = ~taken if relaxed else ~taken & ~closed
        if not open_.any():
            relaxed = True
            continue
        value = rel if pure else mmr_lambda * rel - (1.0 - mmr_lambda) * max_sim
        best = int(np.argmax(np.where(open_, value, -np.inf)))
        score = float(value[best])
        picked.append(best)
        scores.append(min(score, scores[-1]) if relaxed and scores else score)
        taken[best] = True
        cat = int(categories[best])
        counts[cat] = counts.get(cat, 0) + 1
        if cap is not None and counts[cat] >= cap:
            closed |= categories == cat
        if not pure:
            sim = np.clip(embeddings @ embeddings[best], 0.0, None).astype(np.float32)
            max_sim = np.maximum(max_sim, sim)
    return np.array(picked, dtype=np.int64), np.array(scores, dtype=np.float32)


def rerank(model: ServingModel, scored: Scored, ranking: RankingConfig) -> Recommendations:
    """Final list: cold-start and light-user blends, no repeats, filters, category cap, MMR."""
    candidates = scored.candidates
    user = candidates.user
    query = user.query
    rows = candidates.rows
    # No repeats and the request's filters, enforced here whatever the earlier stages returned.
    banned = np.union1d(user.seen, filter_rows(model, query.filters))
    _, first = np.unique(rows, return_index=True)
    keep = np.zeros(len(rows), dtype=bool)
    keep[first] = True
    keep &= ~np.isin(rows, banned)
    positions = np.flatnonzero(keep)
    rows = rows[positions]

    fallback: Fallback | None = "degraded" if user.degraded else None
    if user.vector is None:
        fallback = fallback or "cold_start"
        relevance = (1.0 - np.arange(len(rows), dtype=np.float32) / max(len(rows), 1)).astype(
            np.float32
        )
    else:
        relevance = scored.scores[positions]
        if user.interactions < ranking.cold_start_min_events:
            relevance = blend(
                relevance,
                model.popularity_prior[rows],
                user.interactions / max(ranking.cold_start_min_events, 1),
            )
    lam = ranking.mmr_lambda if query.mmr_lambda is None else query.mmr_lambda
    cap = category_cap(query.k, ranking.max_category_share) if query.category_cap else None
    picked, final = mmr_select(
        relevance,
        model.bundle.item_embeddings[rows],
        model.bundle.item_categories[rows],
        query.k,
        lam,
        cap,
    )
    item_ids = model.bundle.item_ids
    items = tuple(
        RecommendedItem(
            item_id=str(item_ids[rows[p]]),
            score=float(final[i]),
            rank=i + 1,
            source=_source(positions[p], candidates),
        )
        for i, p in enumerate(picked)
    )
    return Recommendations(
        request_id=query.request_id,
        user_id=query.user_id,
        variant=query.variant,
        model_version=model.version,
        items=items,
        fallback=fallback,
        timings=scored.timings,
    )


def _source(position: int, candidates: Candidates) -> Source:
    if position < candidates.n_retrieved:
        return "retrieval"
    if position < candidates.n_retrieved + candidates.n_collaborative:
        return "collaborative"
    return "popularity"


def recommend_in_process(
    model: ServingModel,
    queries: Sequence[Query],
    features: UserFeatures,
    seen_items: Sequence[Sequence[str]] | None,
    ranking: RankingConfig,
) -> list[Recommendations]:
    """All four stages in one process for a batch of queries (benchmark and parity test)."""
    return [
        rerank(model, score(model, retrieve(model, user, ranking)), ranking)
        for user in embed_users(model, queries, features, seen_items, ranking)
    ]


def stamp(query: Query, model_version: str, variant: str) -> Query:
    """The query as the router sends it: bound to one bundle version and variant."""
    return replace(query, model_version=model_version, variant=variant)
