"""The chain of stages and its fallbacks, wherever the stages run (no Ray here).

`advance(progress, stages, call, fallbacks)` runs a batch through consecutive stages: the Router
(serve_app/router.py) calls it over the placement's groups, one hop each, and a group
(serve_app/deployments/group.py) over its own stages, as function calls. A stage that fails
(`call` returns None) is answered around the same way in both places, flagged degraded:
user_tower -> the user as a cold one; retriever -> popularity lists through the re-ranker's rules
(the re-ranker's `popular`, else the Ingress's own small lists, `FallbackLists`); ranker -> retrieval
order; reranker -> the ranker's order (`ranker_order`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serve_app.errors import StageUnavailable
from serve_app.placement import FINAL, STAGES
from serve_app.stages.records import (
    Recommendations,
    RecommendedItem,
    Scored,
    UserState,
    cold_user,
    final_list,
    retrieval_order,
)

RETRIEVER, RERANKER = STAGES.index("retriever"), STAGES.index("reranker")


@dataclass(frozen=True)
class Progress:
    """Where a batch stands in the chain: `batch` is the input of `STAGES[at]` (queries, users,
    candidates, scored) or, at FINAL, the final lists. `popular`: the retriever failed, so the
    re-ranker answers popularity lists for `batch` (users) instead of re-ranking."""

    at: int
    batch: list[Any]
    popular: bool = False

    @property
    def done(self) -> bool:
        return self.at >= FINAL


# `call(name, batch)`: a stage's answer for `batch`, or None when it failed (counted by the caller);
# name "popular" is the re-ranker's popularity answer for users.
StageCall = Callable[[str, list[Any]], Awaitable[list[Any] | None]]


class Fallbacks(Protocol):
    """What answers around a re-ranker that failed, where the chain runs."""

    async def popular(self, users: list[UserState]) -> list[Recommendations]:
        """Popularity lists when neither the retriever nor the re-ranker's `popular` answered."""
        ...

    async def ranker_order(self, scored: list[Scored]) -> list[Recommendations]:
        """The final lists in the ranker's order when the re-ranker did not answer."""
        ...


async def advance(
    progress: Progress, stages: Sequence[str], call: StageCall, fallbacks: Fallbacks
) -> Progress:
    """`progress` through `stages` (consecutive, in chain order); the stages it has already passed
    (a fallback jumped over them) are not called."""
    for name in stages:
        index = STAGES.index(name)
        if progress.at != index:
            continue
        if progress.popular:  # only ever at the re-ranker
            out = await call("popular", progress.batch)
            if out is None:
                out = await fallbacks.popular(progress.batch)
            progress = Progress(FINAL, out)
            continue
        out = await call(name, progress.batch)
        if out is not None:
            progress = Progress(index + 1, out)
        elif name == "user_tower":
            progress = Progress(index + 1, [cold_user(q) for q in progress.batch])
        elif name == "retriever":
            progress = Progress(RERANKER, progress.batch, popular=True)
        elif name == "ranker":
            progress = Progress(index + 1, [retrieval_order(c) for c in progress.batch])
        else:
            progress = Progress(FINAL, await fallbacks.ranker_order(progress.batch))
    return progress


def ranker_order(scored: Scored, item_ids: np.ndarray) -> Recommendations:
    """The ReRanker's fallback: the best-scored candidates (retrieval order for a cold user), no
    repeats; seen and filtered items were left out by the retriever already."""
    candidates = scored.candidates
    query = candidates.user.query
    rows = candidates.rows
    if len(scored.scores) == len(rows):
        order = np.argsort(-scored.scores, kind="stable")
    else:
        order = np.arange(len(rows))
    _, first = np.unique(rows[order], return_index=True)
    picked = order[np.sort(first)][: query.k]
    if len(scored.scores) == len(rows):
        scores = scored.scores[picked].astype(np.float32)
    else:
        scores = (1.0 - np.arange(len(picked)) / max(len(picked), 1)).astype(np.float32)
    return final_list(
        query,
        query.model_version,
        item_ids,
        candidates,
        picked,
        scores,
        "degraded",
        scored.timings,
    )


@dataclass(frozen=True)
class FallbackLists:
    """One version's most popular items, small (a few hundred per list): what the Ingress answers
    alone when every stage that could is down. `top` holds (item id, category) pairs, most popular
    first; `by_category` each category's most popular ids."""

    version: str
    top: tuple[tuple[str, str], ...]
    by_category: Mapping[str, tuple[str, ...]]

    def answer(self, user: UserState) -> Recommendations:
        """The user's list: the request's segment's items ahead of the global ones, the request's
        filters applied (seen items are not known here), flagged degraded."""
        query = user.query
        filters = query.filters
        category_of = dict(self.top)
        lists: list[Sequence[tuple[str, str]]] = []
        segment = query.segment
        if segment is not None and segment in self.by_category:
            lists.append([(i, segment) for i in self.by_category[segment]])
        lists.append(self.top)
        if filters.categories:  # only these: their own lists ahead of what else qualifies
            lists.insert(
                0,
                [(i, c) for c in sorted(filters.categories) for i in self.by_category.get(c, ())],
            )
        picked: list[str] = []
        for entries in lists:
            for item_id, category in entries:
                category = category_of.get(item_id, category)
                if item_id in picked or item_id in filters.exclude_item_ids:
                    continue
                if category in filters.exclude_categories:
                    continue
                if filters.categories and category not in filters.categories:
                    continue
                picked.append(item_id)
                if len(picked) == query.k:
                    break
            if len(picked) == query.k:
                break
        items = tuple(
            RecommendedItem(item_id, 1.0 - rank / max(len(picked), 1), rank + 1, "popularity")
            for rank, item_id in enumerate(picked)
        )
        return Recommendations(
            request_id=query.request_id,
            user_id=query.user_id,
            variant=query.variant,
            model_version=query.model_version,
            items=items,
            fallback="degraded",
            timings=user.timings,
        )


def answer_from_lists(
    lists: Mapping[str, FallbackLists], users: list[UserState]
) -> list[Recommendations]:
    """Every user's list from their version's FallbackLists (StageUnavailable if one is missing)."""
    out = []
    for user in users:
        own = lists.get(user.query.model_version)
        if own is None:
            raise StageUnavailable("retriever")
        out.append(own.answer(user))
    return out
