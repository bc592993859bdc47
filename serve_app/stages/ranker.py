"""The ranking stage, pure: the candidate x feature matrices of a batch stacked into one XGBoost
`inplace_predict`. Twin of the `serve_app.ranker` deployment; loads the booster, the item features
and categories.

The matrix is `serve_app.contract.ranker_features` (the training code path): retrieval score and
rank, the bundle's item features, the user's category affinity and recent-history features, and the
collaborative columns the retriever computed when the bundle's ranker reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serve_app.contract import ranker_features
from serve_app.schemas import BundleManifest
from serve_app.stages.catalog import BundleTerms
from serve_app.stages.explain import ranker_traces
from serve_app.stages.records import Candidates, Scored

if TYPE_CHECKING:
    import xgboost as xgb

    from serve_app.bundle import Bundle


@dataclass(frozen=True, eq=False)
class RankingModel:
    terms: BundleTerms
    booster: xgb.Booster
    item_features: np.ndarray  # float32 [n, len(ITEM_FEATURE_NAMES)]
    item_categories: np.ndarray  # int32 [n]

    @property
    def version(self) -> str:
        return self.terms.version

    @classmethod
    def from_bundle(cls, bundle: Bundle, terms: BundleTerms) -> RankingModel:
        return cls(terms, bundle.ranker, bundle.item_features, bundle.item_categories)

    @classmethod
    def from_directory(
        cls, directory: Path, version: str, manifest: BundleManifest | None = None
    ) -> RankingModel:
        """`manifest`: the bundle's, already verified (`fetch_bundle` checked every file); None:
        verify the directory here."""
        from serve_app.bundle import (
            load_item_categories,
            load_item_features,
            load_ranker,
            verify_bundle,
        )

        manifest = manifest or verify_bundle(directory)
        return cls(
            BundleTerms.from_manifest(manifest, version),
            load_ranker(directory, manifest),
            load_item_features(directory, manifest),
            load_item_categories(directory, manifest),
        )

    def warm(self) -> None:
        """The first `inplace_predict` calls are slow: make a few of the sizes a batch has."""
        width = self.booster.num_features()
        for rows in (1, 100, 1_000):
            self.booster.inplace_predict(np.zeros((rows, width), dtype=np.float32))


def feature_matrix(model: RankingModel, batch: Sequence[Candidates]) -> np.ndarray:
    """The ranker's input for a batch: one row per (user, candidate), users in order, padding
    dropped: float32 [sum of candidates, len(manifest.ranker_features)]."""
    width = max((len(c.rows) for c in batch), default=0)
    b = len(batch)
    rows = np.full((b, width), -1, dtype=np.int64)
    scores = np.zeros((b, width), dtype=np.float32)
    for i, c in enumerate(batch):
        rows[i, : len(c.rows)] = c.rows
        scores[i, : len(c.rows)] = c.retrieval_scores
    users = [c.user for c in batch]
    x = ranker_features(
        rows,
        scores,
        model.item_features,
        model.item_categories,
        np.stack([u.category_prefs for u in users]).astype(np.float32),
        np.array([u.event_count for u in users], dtype=np.float32),
        np.stack([u.recent for u in users]),
    )
    valid = (rows >= 0).reshape(-1)
    if not model.terms.uses_collaborative:
        return x[valid]
    cf = []
    for c in batch:
        assert c.cf_columns is not None, "collaborative columns are set by the retriever"
        cf.append(c.cf_columns)
    width = model.terms.cf_width  # a bundle from before the basket signal reads fewer
    return np.hstack([x[valid], np.concatenate(cf)[:, :width]]).astype(np.float32)


def score_batch(model: RankingModel, batch: Sequence[Candidates]) -> list[Scored]:
    """XGBoost scores of every candidate of a batch (one bundle version) in one prediction; a cold
    user's popularity list is not ranked (empty scores)."""
    ranked = [i for i, c in enumerate(batch) if c.user.vector is not None and len(c.rows) > 0]
    out = [Scored(c, np.zeros(0, dtype=np.float32), c.timings) for c in batch]
    if not ranked:
        return out
    chosen = [batch[i] for i in ranked]
    x = feature_matrix(model, chosen)
    predicted = np.asarray(model.booster.inplace_predict(x), dtype=np.float32).reshape(-1)
    ends = np.cumsum([len(c.rows) for c in chosen])
    traces = (
        ranker_traces(model, x, predicted, ends, chosen)
        if any(c.user.query.explain for c in chosen)
        else {}
    )
    for j, (i, c, part) in enumerate(
        zip(ranked, chosen, np.split(predicted, ends[:-1]), strict=True)
    ):
        out[i] = Scored(c, part, c.timings, traces.get(j))
    return out
