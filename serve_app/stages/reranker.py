"""The re-ranking stage, pure: business rules, cold-start blends and MMR diversity, then the final
list. Twin of the `serve_app.reranker` deployment; loads item ids, categories, embeddings (for MMR's
similarities) and popularity.

No repeats (seen and duplicate items), the request's filters, a per-category cap, MMR with a
configurable lambda (1 = the ranker's order); unknown users get popularity (`cold_start`), light users a
blend of popularity and the ranker's score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serve_app.config import RankingConfig
from serve_app.schemas import BundleManifest
from serve_app.stages.catalog import (
    BundleTerms,
    Catalog,
    Popularity,
    preferred_category,
    touch_pages,
)
from serve_app.stages.explain import explain_trace
from serve_app.stages.records import (
    Candidates,
    Fallback,
    Recommendations,
    Scored,
    UserState,
    final_list,
)

if TYPE_CHECKING:
    from serve_app.bundle import Bundle


@dataclass(frozen=True, eq=False)
class ReRankingModel:
    terms: BundleTerms
    catalog: Catalog
    item_embeddings: np.ndarray  # float32 [n, d]: MMR's similarities
    popularity: Popularity

    @property
    def version(self) -> str:
        return self.terms.version

    @classmethod
    def from_bundle(cls, bundle: Bundle, terms: BundleTerms) -> ReRankingModel:
        catalog = Catalog.from_bundle(bundle, terms)
        return cls(
            terms,
            catalog,
            bundle.item_embeddings,
            Popularity.from_lists(bundle.popularity, catalog),
        )

    @classmethod
    def from_directory(
        cls, directory: Path, version: str, manifest: BundleManifest | None = None
    ) -> ReRankingModel:
        """`manifest`: the bundle's, already verified (`fetch_bundle` checked every file); None:
        verify the directory here."""
        from serve_app.bundle import load_item_embeddings, load_popularity, verify_bundle

        manifest = manifest or verify_bundle(directory)
        catalog = Catalog.load(directory, manifest)
        return cls(
            BundleTerms.from_manifest(manifest, version),
            catalog,
            load_item_embeddings(directory, manifest),
            Popularity.from_lists(load_popularity(directory), catalog),
        )

    def warm(self) -> None:
        """Nothing to compile (numpy only); MMR reads the mapped embeddings at random: fault them in."""
        touch_pages(self.item_embeddings)


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


def rerank(model: ReRankingModel, scored: Scored, ranking: RankingConfig) -> Recommendations:
    """Final list: cold-start and light-user blends, no repeats, filters, category cap, MMR."""
    candidates = scored.candidates
    user = candidates.user
    query = user.query
    rows = candidates.rows
    # No repeats and the request's filters, enforced here whatever the earlier stages returned.
    banned = np.union1d(user.seen, model.catalog.filter_rows(query.filters))
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
        cold_below = model.terms.cold_start_min_events_for(ranking.cold_start_min_events)
        if user.interactions < cold_below:
            relevance = blend(
                relevance, model.popularity.prior[rows], user.interactions / max(cold_below, 1)
            )
    lam = ranking.mmr_lambda if query.mmr_lambda is None else query.mmr_lambda
    cap = category_cap(query.k, ranking.max_category_share) if query.category_cap else None
    picked, final = mmr_select(
        relevance,
        model.item_embeddings[rows],
        model.catalog.item_categories[rows],
        query.k,
        lam,
        cap,
    )
    trace = (
        explain_trace(
            model, scored, ranking.delta_weight, positions, relevance, picked, final, lam, cap
        )
        if query.explain
        else None
    )
    return final_list(
        query,
        model.version,
        model.catalog.item_ids,
        candidates,
        positions[picked],
        final,
        fallback,
        scored.timings,
        trace,
    )


def rerank_batch(
    model: ReRankingModel, batch: Sequence[Scored], ranking: RankingConfig
) -> list[Recommendations]:
    """Final lists of a batch (one bundle version), in order. MMR is a greedy loop per list: a
    batch shares the model and the call, not the loop."""
    return [rerank(model, scored, ranking) for scored in batch]


def popular_batch(
    model: ReRankingModel, users: Sequence[UserState], ranking: RankingConfig
) -> list[Recommendations]:
    """The Retriever's fallback, answered here (this stage holds popularity and the catalog): each
    user's popularity list, by segment or top category when known, through the same rules (no
    repeats, filters, category cap, MMR), flagged degraded."""
    out = []
    for user in users:
        excluded = np.union1d(user.seen, model.catalog.filter_rows(user.query.filters))
        rows = model.popularity.rows(
            preferred_category(model.terms.categories, user),
            excluded,
            max(ranking.popularity_candidates, 4 * user.query.k),
        )
        unknown = replace(user, vector=None, degraded=True)
        candidates = Candidates(unknown, rows, np.zeros(len(rows), np.float32), 0, user.timings)
        out.append(
            rerank(model, Scored(candidates, np.zeros(0, np.float32), user.timings), ranking)
        )
    return out
