"""The whole recommendation pipeline in one process: the four stages of the online graph over one
fully loaded bundle (benchmarks, the parity test, the simulator).

user features -> `stages.user_tower.embed_users` -> `stages.retriever.retrieve_batch` ->
`stages.ranker.score_batch` -> `stages.reranker.rerank_batch`: the very functions the deployments
call, batch for batch. No I/O here: features are read by the caller.

With no real-time events, MMR lambda 1 and no category cap, the ranking is the offline ranking
(`training.pipeline`'s evaluation; `tests/integration/test_serving_parity.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve_app.bundle import Bundle
from serve_app.config import RankingConfig
from serve_app.contract import Collaborative
from serve_app.stages.catalog import BundleTerms
from serve_app.stages.ranker import RankingModel, score_batch
from serve_app.stages.records import Query, Recommendations
from serve_app.stages.reranker import ReRankingModel, rerank_batch
from serve_app.stages.retriever import RetrievalModel, retrieve_batch, warm_user
from serve_app.stages.user_tower import TowerModel, embed_users

if TYPE_CHECKING:
    from serve_app.features import UserFeatures


@dataclass(frozen=True, eq=False)
class ServingModel:
    """A fully loaded bundle as the four stage models of one version."""

    bundle: Bundle
    terms: BundleTerms
    tower: TowerModel
    retrieval: RetrievalModel
    ranking: RankingModel
    reranking: ReRankingModel

    @property
    def version(self) -> str:
        return self.terms.version

    @property
    def n_items(self) -> int:
        return len(self.bundle.item_ids)

    @property
    def history_length(self) -> int:
        return self.terms.history_length

    @property
    def user_buckets(self) -> int:
        return self.terms.user_buckets

    @property
    def n_candidates(self) -> int:
        return self.terms.n_candidates

    @property
    def collaborative(self) -> Collaborative | None:
        return self.retrieval.collaborative

    @classmethod
    def from_bundle(cls, bundle: Bundle, version: str | None = None) -> ServingModel:
        """Check the bundle speaks this server's contract, then derive every stage's tables."""
        terms = BundleTerms.from_manifest(
            bundle.manifest, version or bundle.version, bundle.collaborative is not None
        )
        return cls(
            bundle,
            terms,
            TowerModel.from_bundle(bundle, terms),
            RetrievalModel.from_bundle(bundle, terms),
            RankingModel.from_bundle(bundle, terms),
            ReRankingModel.from_bundle(bundle, terms),
        )

    def warm(self) -> None:
        """First calls of TorchScript, FAISS and XGBoost are slow: make them here, not on a request."""
        self.tower.warm()
        self.retrieval.warm()
        self.ranking.warm()
        user = warm_user(self.bundle.item_embeddings[0], len(self.terms.categories), self.terms)
        ranking = RankingConfig(candidates=min(self.n_candidates, self.n_items))
        rerank_batch(
            self.reranking,
            score_batch(self.ranking, retrieve_batch(self.retrieval, [user], ranking)),
            ranking,
        )


def limit_threads() -> None:
    """One thread per library per process: small batches only lose to thread hand-offs, and the
    stages share two cores (XGBoost gets nthread=1 when its booster is loaded). No torch: serving
    runs the user tower in numpy (bundle format 2)."""
    import faiss

    faiss.omp_set_num_threads(1)


def recommend_in_process(
    model: ServingModel,
    queries: Sequence[Query],
    features: UserFeatures,
    seen_items: Sequence[Sequence[str]] | None,
    ranking: RankingConfig,
) -> list[Recommendations]:
    """All four stages in one process for a batch of queries (one version), batch by batch."""
    users = embed_users(model.tower, queries, features, seen_items, ranking)
    candidates = retrieve_batch(model.retrieval, users, ranking)
    return rerank_batch(model.reranking, score_batch(model.ranking, candidates), ranking)
