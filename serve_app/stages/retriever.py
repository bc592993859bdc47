"""The retrieval stage, pure: one FAISS search over the batch's query matrix, then each user's
collaborative and popularity candidates. Twin of the `serve_app.retriever` deployment; loads the
index, the item embeddings, the collaborative arrays, item categories and popularity.

Top-N by inner product without the items the user interacted with positively or the request filters
out; light and cold users get popularity candidates (by category when known).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.config import RankingConfig
from serve_app.contract import Collaborative, cf_candidates, cf_features, cf_scores
from serve_app.schemas import BundleManifest
from serve_app.stages.catalog import (
    BundleTerms,
    Catalog,
    Popularity,
    preferred_category,
    touch_pages,
)
from serve_app.stages.records import Candidates, UserState

if TYPE_CHECKING:
    import faiss

    from serve_app.bundle import Bundle

# Up to this many excluded rows, search over-fetches and drops them; beyond, the allowed rows are
# either few enough to score exactly (`RankingConfig.exact_filter_below`) or passed to the index as
# a bitmap selector (a filter to a few categories can exclude most of the catalog).
OVERFETCH_LIMIT = 1_000
# A filtered search still spends its beam on rows that fail the filter, so the beam (HNSW efSearch,
# IVF nprobe) is widened by 1 / (share of rows allowed), at most this many times: at 10% allowed,
# HNSW efSearch 256 finds ~0.86 of the exact top-100 and 2048 ~0.99 (100k items, d=32); IVF at 1M
# items finds 0.998 at 1% allowed, 1.0 from 2% (nprobe 512, p99 <= 3.7 ms up to 50% allowed but one
# 12 ms outlier at 10%: bench/results/index_recall_1m_d128.json). Smaller shares go to the exact path
# (`RankingConfig.exact_filter_below`).
FILTERED_BEAM_GROWTH = 8


@dataclass(frozen=True, eq=False)
class RetrievalModel:
    terms: BundleTerms
    catalog: Catalog
    index: faiss.Index
    # float32 [n, d], a read-only map of item_embeddings.npy: scores of the candidates not from the
    # index. Not a second copy: the ReRanker maps the same file (one page-cache copy per node), and
    # the index maps its own file; reconstructing from the index instead would not save the npy's
    # pages (the ReRanker needs them) and is lossy for compressed indexes.
    item_embeddings: np.ndarray
    popularity: Popularity
    collaborative: Collaborative | None  # set when the ranker reads collaborative features

    @property
    def version(self) -> str:
        return self.terms.version

    @classmethod
    def from_bundle(cls, bundle: Bundle, terms: BundleTerms) -> RetrievalModel:
        catalog = Catalog.from_bundle(bundle, terms)
        return cls(
            terms,
            catalog,
            bundle.index,
            bundle.item_embeddings,
            Popularity.from_lists(bundle.popularity, catalog),
            bundle.collaborative if terms.uses_collaborative else None,
        )

    @classmethod
    def from_directory(
        cls, directory: Path, version: str, manifest: BundleManifest | None = None
    ) -> RetrievalModel:
        """`manifest`: the bundle's, already verified (`fetch_bundle` checked every file); None:
        verify the directory here."""
        from serve_app.bundle import (
            load_collaborative,
            load_index,
            load_item_embeddings,
            load_popularity,
            verify_bundle,
        )

        manifest = manifest or verify_bundle(directory)
        terms = BundleTerms.from_manifest(manifest, version)
        catalog = Catalog.load(directory, manifest)
        return cls(
            terms,
            catalog,
            load_index(directory, manifest),
            load_item_embeddings(directory, manifest),
            Popularity.from_lists(load_popularity(directory), catalog),
            load_collaborative(directory, manifest) if terms.uses_collaborative else None,
        )

    def warm(self) -> None:
        """The first FAISS searches allocate; a one-item user runs every signal once; the memory-
        mapped vectors read at random are faulted in (`touch_mapped_vectors`)."""
        touch_mapped_vectors(self.index, self.item_embeddings)
        users = [warm_user(self.item_embeddings[:1][0], len(self.terms.categories), self.terms)]
        retrieve_batch(self, users, RankingConfig(popularity_candidates=0))


def touch_mapped_vectors(index: faiss.Index, embeddings: np.ndarray | None = None) -> int:
    """Read one value a page of the memory-mapped vectors a search reads at random: the index's flat
    storage (`ivf_pq`'s exact re-scoring, a flat or HNSW index) and the item embeddings (collaborative
    candidates' scores). Otherwise the first few hundred requests of a replica each pay thousands of
    page faults: at 1M items a search's p99 was 54 ms on a fresh mapping, 2 ms once touched (~0.4 s
    for the 256 MB of `ivf_pq` storage). Returns the bytes covered."""
    import faiss

    flat: Any = None
    if isinstance(index, faiss.IndexRefine):
        flat = faiss.downcast_index(index.refine_index)
    elif isinstance(index, faiss.IndexHNSW):
        flat = faiss.downcast_index(index.storage)
    elif isinstance(index, faiss.IndexFlat):
        flat = index
    covered = 0
    if isinstance(flat, faiss.IndexFlat) and flat.ntotal > 0:
        covered += touch_pages(faiss.rev_swig_ptr(flat.get_xb(), int(flat.ntotal) * int(flat.d)))
    if embeddings is not None:
        covered += touch_pages(embeddings)
    return covered


def warm_user(vector: np.ndarray, n_categories: int, terms: BundleTerms) -> UserState:
    """A user who has seen item row 0 only: every stage's warm-up request."""
    from serve_app.stages.records import Query

    recent = np.zeros(terms.history_length, dtype=np.int64)
    recent[0] = 1
    return UserState(
        query=Query("warm", "warm", 1, model_version=terms.version),
        vector=np.asarray(vector, dtype=np.float32),
        event_count=1.0,
        category_prefs=np.zeros(n_categories, dtype=np.float32),
        recent=recent,
        seen=np.zeros(1, dtype=np.int64),
        interactions=1,
        degraded=False,
    )


def _selector_params(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters admitting only the rows where `allowed` (bool [ntotal]) is true: a bitmap
    (n/8 bytes, built in O(n)), not a hash set of up to n excluded ids."""
    import faiss

    bitmap = np.packbits(allowed, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
    share = max(int(allowed.sum()), 1) / len(allowed)
    params: faiss.SearchParameters
    if isinstance(index, faiss.IndexRefine):
        # ivf_pq: the selector filters the PQ scan; re-scoring only sees rows that passed it.
        base: Any = faiss.downcast_index(index.base_index)
        base_params = faiss.SearchParametersIVF()
        base_params.nprobe = min(_widened(int(base.nprobe), share), int(base.nlist))
        base_params.sel = selector
        refine = faiss.IndexRefineSearchParameters()
        refine.k_factor = float(index.k_factor)
        refine.base_index_params = base_params
        refine.referenced_objects = [selector, bitmap, base_params]  # type: ignore[attr-defined]
        return refine
    if isinstance(index, faiss.IndexHNSW):
        # Missing from faiss' bundled type stubs.
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = _widened(int(index.hnsw.efSearch), share)  # type: ignore[attr-defined]
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = min(_widened(int(index.nprobe), share), int(index.nlist))
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    # The selector and its bitmap must outlive the search: FAISS keeps raw pointers to both.
    params.referenced_objects = [selector, bitmap]  # type: ignore[attr-defined]
    return params


def _widened(beam: int, share: float) -> int:
    return int(min(beam * FILTERED_BEAM_GROWTH, math.ceil(beam / share)))


def exact_top(
    embeddings: np.ndarray, vector: np.ndarray, allowed_rows: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` of `allowed_rows` (sorted) by inner product with `vector`, scored exactly: what a
    narrow filter gets instead of an index walk in which almost no node passes."""
    scores = (embeddings[allowed_rows] @ np.asarray(vector, dtype=np.float32)).astype(np.float32)
    n = min(n, len(allowed_rows))
    top = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    top = top[np.lexsort((allowed_rows[top], -scores[top]))]  # best first, ties by row
    return allowed_rows[top].astype(np.int64), scores[top]


def search_batch(
    index: faiss.Index,
    vectors: np.ndarray,
    wanted: Sequence[int],
    excluded: Sequence[np.ndarray],
    embeddings: np.ndarray | None = None,
    exact_below: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query row: its top-`wanted[i]` rows by inner product, best first, none of `excluded[i]`
    (sorted unique rows). Queries excluding few rows share one search that over-fetches by the
    largest exclusion; a query leaving fewer than `exact_below` rows is scored exactly over them
    (needs `embeddings`, the index's vectors); the others search the index with a selector."""
    out: list[tuple[np.ndarray, np.ndarray]] = [
        (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    ] * len(vectors)
    ntotal = int(index.ntotal)
    shared: list[int] = []
    alone: list[int] = []
    for i, (n, ex) in enumerate(zip(wanted, excluded, strict=True)):
        if min(n, ntotal - len(ex)) <= 0:
            continue
        (shared if len(ex) <= OVERFETCH_LIMIT else alone).append(i)
    if shared:
        k = min(ntotal, max(wanted[i] + len(excluded[i]) for i in shared))
        query = np.ascontiguousarray(vectors[shared], dtype=np.float32)
        scores, rows = index.search(query, k)
        for j, i in enumerate(shared):
            keep = (rows[j] >= 0) & ~np.isin(rows[j], excluded[i])
            n = min(wanted[i], ntotal - len(excluded[i]))
            out[i] = (
                rows[j][keep][:n].astype(np.int64),
                scores[j][keep][:n].astype(np.float32),
            )
    for i in alone:
        n = min(wanted[i], ntotal - len(excluded[i]))
        allowed = np.ones(ntotal, dtype=bool)
        allowed[excluded[i]] = False
        if embeddings is not None and ntotal - len(excluded[i]) < exact_below:
            out[i] = exact_top(embeddings, vectors[i], np.flatnonzero(allowed), n)
            continue
        query = np.ascontiguousarray(vectors[i : i + 1], dtype=np.float32)
        scores, rows = index.search(query, n, params=_selector_params(index, allowed))
        keep = rows[0] >= 0
        out[i] = (rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32))
    return out


def _excluded_rows(n_items: int, seen: np.ndarray, filtered: np.ndarray) -> np.ndarray:
    """Sorted unique rows a user must not get: seen or filtered out. A filter can leave out most
    of a 1M catalog; a bitmap then costs O(n) where a sorted union would sort ~n rows."""
    if len(filtered) <= OVERFETCH_LIMIT:
        return np.union1d(seen, filtered)
    blocked = np.zeros(n_items, dtype=bool)
    blocked[filtered] = True
    blocked[np.asarray(seen, dtype=np.int64)] = True
    return np.flatnonzero(blocked)


def retrieve_batch(
    model: RetrievalModel, users: Sequence[UserState], ranking: RankingConfig
) -> list[Candidates]:
    """Candidates of every user of a batch (one bundle version), in order."""
    n_items = model.catalog.n_items
    excluded = [
        _excluded_rows(n_items, u.seen, model.catalog.filter_rows(u.query.filters)) for u in users
    ]
    warm = [i for i, u in enumerate(users) if u.vector is not None]
    n = ranking.candidates or model.terms.n_candidates
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if warm:
        vectors = np.stack([users[i].vector for i in warm])  # type: ignore[misc]
        results = search_batch(
            model.index,
            vectors,
            [max(n, users[i].query.k) for i in warm],
            [excluded[i] for i in warm],
            model.item_embeddings,
            ranking.exact_filter_below,
        )
        found = dict(zip(warm, results, strict=True))
    return [
        _user_candidates(model, user, excluded[i], found.get(i), ranking)
        for i, user in enumerate(users)
    ]


def _user_candidates(
    model: RetrievalModel,
    user: UserState,
    excluded: np.ndarray,
    searched: tuple[np.ndarray, np.ndarray] | None,
    ranking: RankingConfig,
) -> Candidates:
    if user.vector is None or searched is None:
        rows = model.popularity.rows(
            preferred_category(model.terms.categories, user),
            excluded,
            max(ranking.popularity_candidates, 4 * user.query.k),
        )
        return Candidates(user, rows, np.zeros(len(rows), dtype=np.float32), 0, user.timings)
    rows, scores = searched
    n_retrieved = len(rows)
    cf = model.collaborative
    signal_scores = None
    if cf is not None:
        signal_scores = cf_scores(cf, user.seen, user.recent)
        extra = cf_candidates(signal_scores, excluded, rows, cf.per_source)
        rows, scores = _append(model, user.vector, rows, scores, extra)
    n_collaborative = len(rows) - n_retrieved
    cold_below = model.terms.cold_start_min_events_for(ranking.cold_start_min_events)
    if user.interactions < cold_below and ranking.popularity_candidates > 0:
        extra = model.popularity.rows(
            preferred_category(model.terms.categories, user),
            np.union1d(excluded, rows),
            ranking.popularity_candidates,
        )
        rows, scores = _append(model, user.vector, rows, scores, extra)
    cf_columns = None
    if signal_scores is not None:
        cf_columns = cf_features(signal_scores, rows, user.seen)
    return Candidates(user, rows, scores, n_retrieved, user.timings, n_collaborative, cf_columns)


def _append(
    model: RetrievalModel,
    vector: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
    extra: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Extra candidates after the others, each with its retrieval score (user . item vector)."""
    extra_scores = (model.item_embeddings[extra] @ vector).astype(np.float32)
    return np.concatenate([rows, extra]), np.concatenate([scores, extra_scores])
