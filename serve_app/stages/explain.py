"""Why a list is what it is: the trace of one request through the stages, built only when the request
asks (`"explain": true`); the stages call in here from their explain branch and nowhere else.

The trace is bounded whatever the catalog: the top `TOP_PER_SOURCE` candidates of each source, at most
`MAX_LISTED` item ids per rule, `TOP_FEATURES` ranker features per item, one entry per item served.
Its records are the API's (pydantic), so the ingress returns what the re-ranker built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve_app.contract import CF_FEATURE_NAMES
from serve_app.stages.records import Candidates, Scored, Source, UserState

if TYPE_CHECKING:
    from serve_app.stages.ranker import RankingModel
    from serve_app.stages.reranker import ReRankingModel

TOP_PER_SOURCE = 10  # candidates listed per source
MAX_LISTED = 20  # item ids listed per rule (the count says how many there were)
TOP_FEATURES = 3  # ranker features listed per item, by |contribution|
SHAP_PER_K, SHAP_MIN = 3, 30  # candidates given SHAP contributions: the best max(3k, 30) scored
MAX_VECTOR_DIM = 1_024  # a longer user vector is cut (the trace says its full dimension)
DIGITS = 5

Rule = Literal["duplicate", "seen", "filters", "category_cap"]


# --- the trace as the API returns it ---------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class UserVectors(_Out):
    """The user vector the retriever searched with, and its two parts."""

    dim: int = Field(description="embedding dimension (the vectors below hold its first 1024)")
    base: list[float] | None = Field(None, description="the user tower's output (None: no tower)")
    delta: list[float] | None = Field(
        None, description="real-time delta: EMA of the embeddings of items interacted with"
    )
    combined: list[float] | None = Field(
        None, description="normalised base + delta_weight * delta (None: cold user, popularity)"
    )
    delta_weight: float
    event_count: float = Field(description="positive interactions in the feature snapshot")
    interactions: int = Field(description="distinct positive items known, snapshot and since")


class CandidateOut(_Out):
    item_id: str
    score: float = Field(
        description="the source's own score: retrieval = user . item, collaborative = summed "
        "item-item scores, popularity = popularity prior in [0, 1]"
    )
    similarity: float = Field(description="user vector . item vector (0 for a cold user)")


class SourceCandidates(_Out):
    source: Source
    count: int = Field(description="candidates this source contributed")
    top: list[CandidateOut] = Field(max_length=TOP_PER_SOURCE, description="best first")


class FeatureContribution(_Out):
    name: str
    value: float
    contribution: float = Field(description="SHAP contribution to the ranker's score")


class ItemExplanation(_Out):
    item_id: str
    rank: int
    source: Source
    category: str
    score: float = Field(description="the final score (after blends and MMR)")
    similarity: float = Field(description="user vector . item vector")
    ranker_score: float | None = Field(None, description="XGBoost margin (None: not ranked)")
    relevance: float = Field(description="what MMR weighed: ranker score, or its popularity blend")
    relevance_rank: int = Field(description="rank by relevance among what the rules left")
    features: list[FeatureContribution] = Field(
        default_factory=list,
        max_length=TOP_FEATURES,
        description="strongest ranker features (empty: not ranked, or far down the ranker's order)",
    )


class RuleRemoval(_Out):
    rule: Rule
    count: int = Field(description="items this rule kept out of the list")
    item_ids: list[str] = Field(max_length=MAX_LISTED, description="the first of them")
    at_rerank: int = Field(
        description="of them, candidates dropped by the re-ranker (the retriever leaves seen and "
        "filtered items out of its search: those never become candidates)"
    )


class MmrTrace(_Out):
    """What diversity changed against the relevance order (with the category cap applied)."""

    mmr_lambda: float
    category_cap: int | None = Field(description="items allowed per category (None: no cap)")
    moved: int = Field(description="items whose rank differs from their relevance rank")
    promoted: list[str] = Field(max_length=MAX_LISTED, description="served, not in relevance top-k")
    displaced: list[str] = Field(max_length=MAX_LISTED, description="relevance top-k, not served")


class ExplainTrace(_Out):
    user: UserVectors
    candidates: list[SourceCandidates]
    removed: list[RuleRemoval]
    mmr: MmrTrace
    items: list[ItemExplanation]
    ranker_bias: float | None = Field(None, description="the ranker's base score (SHAP bias)")


# --- the ranker's part ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RankerTrace:
    """Per candidate of one request: its feature row and, for the best-scored ones, each feature's
    SHAP contribution (the others cannot be served: their rows stay 0, `explained` False)."""

    names: tuple[str, ...]
    features: np.ndarray  # float32 [N, F]
    contributions: np.ndarray  # float32 [N, F]
    explained: np.ndarray  # bool [N]
    bias: float


def shap_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The candidates whose contributions are computed: the `SHAP_PER_K * k` best scored (a SHAP
    pass costs per row; MMR and the cap pick from the top of the ranker's order)."""
    n = min(len(scores), max(SHAP_PER_K * k, SHAP_MIN))
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def ranker_traces(
    model: RankingModel,
    x: np.ndarray,
    predicted: np.ndarray,
    ends: np.ndarray,
    chosen: Sequence[Candidates],
) -> dict[int, RankerTrace]:
    """Traces of the requests of `chosen` that ask to explain (position in `chosen` -> trace), from
    the batch's feature matrix `x` and scores (request j's rows end at `ends[j]`): one SHAP pass."""
    import xgboost as xgb

    asked = [j for j, c in enumerate(chosen) if c.user.query.explain]
    if not asked:
        return {}
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    picks = [shap_rows(predicted[starts[j] : ends[j]], chosen[j].user.query.k) for j in asked]
    rows = np.concatenate([starts[j] + p for j, p in zip(asked, picks, strict=True)])
    booster = model.booster
    # nthread=1: the default thread pool costs several times the pass itself on these sizes.
    matrix = xgb.DMatrix(x[rows], feature_names=booster.feature_names, nthread=1)
    shap = np.asarray(booster.predict(matrix, pred_contribs=True), dtype=np.float32)
    names = model.terms.ranker_features
    out = {}
    offset = 0
    for j, pick in zip(asked, picks, strict=True):
        part = x[starts[j] : ends[j]]
        contributions = np.zeros_like(part, dtype=np.float32)
        explained = np.zeros(len(part), dtype=bool)
        block = shap[offset : offset + len(pick)]
        offset += len(pick)
        contributions[pick] = block[:, :-1]
        explained[pick] = True
        bias = float(block[0, -1]) if len(block) else 0.0
        out[j] = RankerTrace(tuple(names), part, contributions, explained, bias)
    return out


# --- the whole trace, at the re-ranker ---------------------------------------------------------------


def _round(value: float) -> float:
    return round(float(value), DIGITS)


def _vector(values: np.ndarray | None) -> list[float] | None:
    if values is None:
        return None
    return [_round(v) for v in np.asarray(values, dtype=np.float32)[:MAX_VECTOR_DIM]]


def user_vectors(user: UserState, delta_weight: float, dim: int) -> UserVectors:
    return UserVectors(
        dim=dim,
        base=_vector(user.base_vector),
        delta=_vector(user.delta_vector),
        combined=_vector(user.vector),
        delta_weight=delta_weight,
        event_count=user.event_count,
        interactions=user.interactions,
    )


def source_of(position: int, candidates: Candidates) -> Source:
    if position < candidates.n_retrieved:
        return "retrieval"
    if position < candidates.n_retrieved + candidates.n_collaborative:
        return "collaborative"
    return "popularity"


def source_scores(model: ReRankingModel, candidates: Candidates) -> np.ndarray:
    """Each candidate's score in its own source (see `CandidateOut.score`)."""
    scores = candidates.retrieval_scores.astype(np.float32).copy()
    start, end = candidates.n_retrieved, candidates.n_retrieved + candidates.n_collaborative
    if candidates.cf_columns is not None and end > start:
        score_columns = [i for i, n in enumerate(CF_FEATURE_NAMES) if n.endswith("_score")]
        scores[start:end] = candidates.cf_columns[start:end, score_columns].sum(axis=1)
    scores[end:] = model.popularity.prior[candidates.rows[end:]]
    return scores


def candidates_by_source(model: ReRankingModel, candidates: Candidates) -> list[SourceCandidates]:
    item_ids = model.catalog.item_ids
    rows = candidates.rows
    scores = source_scores(model, candidates)
    bounds = {
        "retrieval": (0, candidates.n_retrieved),
        "collaborative": (
            candidates.n_retrieved,
            candidates.n_retrieved + candidates.n_collaborative,
        ),
        "popularity": (candidates.n_retrieved + candidates.n_collaborative, len(rows)),
    }
    out = []
    source: Source
    for source, (start, end) in bounds.items():  # type: ignore[assignment]
        # Popularity keeps its list order (most popular first); the others best score first.
        order = np.arange(start, end)
        if source != "popularity":
            order = start + np.argsort(-scores[start:end], kind="stable")
        top = [
            CandidateOut(
                item_id=str(item_ids[rows[p]]),
                score=_round(scores[p]),
                similarity=_round(candidates.retrieval_scores[p]),
            )
            for p in order[:TOP_PER_SOURCE]
        ]
        out.append(SourceCandidates(source=source, count=end - start, top=top))
    return out


def _removal(
    rule: Rule, rows: np.ndarray, item_ids: np.ndarray, before: np.ndarray | None = None
) -> RuleRemoval:
    """`rows`: candidates the re-ranker dropped; `before`: catalog rows the retriever left out."""
    kept_out = rows if before is None else np.union1d(before, rows)
    return RuleRemoval(
        rule=rule,
        count=len(kept_out),
        item_ids=[str(item_ids[r]) for r in kept_out[:MAX_LISTED]],
        at_rerank=len(rows),
    )


def rule_removals(
    model: ReRankingModel, candidates: Candidates
) -> tuple[RuleRemoval, RuleRemoval, RuleRemoval]:
    """What the no-repeat and filter rules took out of the candidates, in the order `rerank` applies
    them: a repeated candidate, then an item the user has seen, then one the filters leave out."""
    user = candidates.user
    rows = candidates.rows
    item_ids = model.catalog.item_ids
    _, first = np.unique(rows, return_index=True)
    repeated = np.ones(len(rows), dtype=bool)
    repeated[first] = False
    seen = ~repeated & np.isin(rows, user.seen)
    filter_rows = model.catalog.filter_rows(user.query.filters)
    filtered = ~repeated & ~seen & np.isin(rows, filter_rows)
    return (
        _removal("duplicate", rows[repeated], item_ids),
        _removal("seen", rows[seen], item_ids, user.seen),
        _removal("filters", rows[filtered], item_ids, np.setdiff1d(filter_rows, user.seen)),
    )


def _strongest(trace: RankerTrace | None, position: int) -> list[FeatureContribution]:
    if trace is None or not trace.explained[position]:
        return []
    contributions = trace.contributions[position]
    top = np.argsort(-np.abs(contributions), kind="stable")[:TOP_FEATURES]
    return [
        FeatureContribution(
            name=trace.names[f],
            value=_round(trace.features[position, f]),
            contribution=_round(contributions[f]),
        )
        for f in top
    ]


def explain_trace(
    model: ReRankingModel,
    scored: Scored,
    delta_weight: float,
    positions: np.ndarray,
    relevance: np.ndarray,
    picked: np.ndarray,
    final: np.ndarray,
    mmr_lambda: float,
    cap: int | None,
) -> ExplainTrace:
    """The trace of one request from what `rerank` computed: `positions` (candidates left by the
    rules), their `relevance`, the MMR `picked` positions (into `positions`) and `final` scores."""
    from serve_app.stages.reranker import mmr_select

    candidates = scored.candidates
    user = candidates.user
    k = user.query.k
    rows = candidates.rows[positions]
    item_ids = model.catalog.item_ids
    categories = model.catalog.item_categories[rows]
    embeddings = model.item_embeddings[rows]
    # The relevance order with and without the cap (lambda 1: no diversity, no similarities).
    plain, _ = mmr_select(relevance, embeddings, categories, k, 1.0, None)
    capped, _ = mmr_select(relevance, embeddings, categories, k, 1.0, cap)
    cap_removed = np.setdiff1d(plain, capped)
    order = np.argsort(-relevance, kind="stable")
    relevance_rank = np.empty(len(order), dtype=np.int64)
    relevance_rank[order] = np.arange(1, len(order) + 1)
    capped_rank = {int(p): r for r, p in enumerate(capped)}
    served = set(picked.tolist())
    promoted = [int(p) for p in picked if int(p) not in capped_rank]
    displaced = [int(p) for p in capped if int(p) not in served]
    ranker = scored.ranker_trace
    items = []
    for rank, (p, score) in enumerate(zip(picked, final, strict=True)):
        candidate = int(positions[p])
        items.append(
            ItemExplanation(
                item_id=str(item_ids[rows[p]]),
                rank=rank + 1,
                source=source_of(candidate, candidates),
                category=model.catalog.categories[int(categories[p])],
                score=_round(score),
                similarity=_round(candidates.retrieval_scores[candidate]),
                ranker_score=(_round(scored.scores[candidate]) if len(scored.scores) else None),
                relevance=_round(relevance[p]),
                relevance_rank=int(relevance_rank[p]),
                features=_strongest(ranker, candidate),
            )
        )
    moved = sum(1 for rank, p in enumerate(picked) if capped_rank.get(int(p)) != rank)
    return ExplainTrace(
        user=user_vectors(user, delta_weight, model.terms.embedding_dim),
        candidates=candidates_by_source(model, candidates),
        removed=[
            *rule_removals(model, candidates),
            _removal("category_cap", rows[cap_removed], item_ids),
        ],
        mmr=MmrTrace(
            mmr_lambda=mmr_lambda,
            category_cap=cap,
            moved=moved,
            promoted=[str(item_ids[rows[p]]) for p in promoted[:MAX_LISTED]],
            displaced=[str(item_ids[rows[p]]) for p in displaced[:MAX_LISTED]],
        ),
        items=items,
        ranker_bias=None if ranker is None else _round(ranker.bias),
    )
