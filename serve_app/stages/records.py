"""Records passed between the stages of the online graph: one per request, carried in batches.

A request's variant and bundle version ride in its `Query`, so a batch may mix versions: each stage
splits it by version (`by_version`) and answers in the order it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

if TYPE_CHECKING:  # the trace records import these ones
    from serve_app.stages.explain import ExplainTrace, RankerTrace

Source = Literal["retrieval", "collaborative", "popularity"]
# model_missing: the user's variant had no loaded version; another variant's version answered.
Fallback = Literal["cold_start", "degraded", "model_missing"]
Timings = tuple[tuple[str, float], ...]

T = TypeVar("T")


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
    explain: bool = False  # True: every stage keeps what `stages.explain` needs for a trace


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
    # Only when the query asks to explain: the tower's output and the real-time delta (float32 [D]).
    base_vector: np.ndarray | None = None
    delta_vector: np.ndarray | None = None


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

    @property
    def n_popularity(self) -> int:
        return len(self.rows) - self.n_retrieved - self.n_collaborative


@dataclass(frozen=True)
class Scored:
    """Ranker output: one XGBoost score per candidate (empty for a cold user: nothing to rank)."""

    candidates: Candidates
    scores: np.ndarray  # float32 [N]
    timings: Timings = ()
    ranker_trace: RankerTrace | None = None  # only when the query asks to explain


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
    trace: ExplainTrace | None = None  # only when the query asks to explain


def source_of(position: int, candidates: Candidates) -> Source:
    """Which source put candidate `position` in the list (retrieval, collaborative, popularity)."""
    if position < candidates.n_retrieved:
        return "retrieval"
    if position < candidates.n_retrieved + candidates.n_collaborative:
        return "collaborative"
    return "popularity"


def final_list(
    query: Query,
    model_version: str,
    item_ids: np.ndarray,
    candidates: Candidates,
    chosen: np.ndarray,
    scores: np.ndarray,
    fallback: Fallback | None,
    timings: Timings,
    trace: ExplainTrace | None = None,
) -> Recommendations:
    """The answer: candidates at positions `chosen` (in final order) with their `scores`, each named
    by item id and labelled with the source that found it."""
    items = tuple(
        RecommendedItem(
            item_id=str(item_ids[candidates.rows[p]]),
            score=float(scores[i]),
            rank=i + 1,
            source=source_of(int(p), candidates),
        )
        for i, p in enumerate(chosen)
    )
    return Recommendations(
        request_id=query.request_id,
        user_id=query.user_id,
        variant=query.variant,
        model_version=model_version,
        items=items,
        fallback=fallback,
        timings=timings,
        trace=trace,
    )


def cold_user(query: Query) -> UserState:
    """The UserTower's fallback: the user as an unknown one (the retriever answers popularity, by
    the request's segment when the bundle knows it), flagged degraded."""
    empty = np.zeros(0, dtype=np.int64)
    return UserState(
        query=query,
        vector=None,
        event_count=0.0,
        category_prefs=np.zeros(0, dtype=np.float32),
        recent=empty,
        seen=empty,
        interactions=0,
        degraded=True,
    )


def retrieval_order(candidates: Candidates) -> Scored:
    """The Ranker's fallback: candidates scored by retrieval (user . item), flagged degraded."""
    user = replace(candidates.user, degraded=True)
    scores = candidates.retrieval_scores if user.vector is not None else np.zeros(0, np.float32)
    return Scored(replace(candidates, user=user), scores, candidates.timings)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)


def with_timing(timings: Timings, stage: str, start: float, end: float) -> Timings:
    return (*timings, (stage, _ms(start, end)))


def stamp(query: Query, model_version: str, variant: str) -> Query:
    """The query as the router sends it: bound to one bundle version and variant."""
    return replace(query, model_version=model_version, variant=variant)


def version_of(record: Query | UserState | Candidates | Scored) -> str:
    """The bundle version a record of any stage belongs to (set by the router on its query)."""
    if isinstance(record, Query):
        return record.model_version
    if isinstance(record, UserState):
        return record.query.model_version
    if isinstance(record, Candidates):
        return record.user.query.model_version
    return record.candidates.user.query.model_version


def by_version(records: Sequence[T], version: Callable[[T], str]) -> dict[str, list[int]]:
    """Positions of the records of each version, versions in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        groups.setdefault(version(record), []).append(position)
    return groups
