"""What several stages know of a bundle's catalog: item ids and categories, the request filters over
them, popularity, and the manifest terms a server checks before serving a bundle.

Each table is built from the files it needs (`serve_app.bundle` loaders), so a stage that loads it
pays only for those: item ids and categories are small next to embeddings, the index or the booster.
Ids map to rows through `serve_app.ids.ItemIndex` (sorted ids, `np.searchsorted`), never a dict per
replica; the arrays are the bundle's memory maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.contract import (
    ITEM_FEATURE_NAMES,
    RANKER_FEATURE_NAMES,
    RANKER_FEATURE_NAMES_CF,
    RANKER_FEATURE_SETS,
)
from serve_app.errors import BundleIntegrityError
from serve_app.ids import ItemIndex
from serve_app.schemas import BundleManifest
from serve_app.stages.records import Filters, UserState

if TYPE_CHECKING:
    from serve_app.bundle import Bundle

DEFAULT_CANDIDATES = 100  # a bundle that does not record its training value
DEFAULT_COLD_START_MIN_EVENTS = 5  # the same, for the cold-start blend


@dataclass(frozen=True)
class BundleTerms:
    """The manifest's side of the serving contract, checked once per stage and version."""

    version: str
    categories: tuple[str, ...]
    embedding_dim: int
    user_buckets: int
    history_length: int
    n_candidates: int
    uses_collaborative: bool  # the ranker reads CF_FEATURE_NAMES (the bundle must have the models)
    cold_start_min_events: int = DEFAULT_COLD_START_MIN_EVENTS
    # The ranker's input columns (the manifest's list): a bundle from before the basket signal
    # reads a prefix of the collaborative columns serving computes.
    ranker_features: tuple[str, ...] = RANKER_FEATURE_NAMES_CF

    @property
    def cf_width(self) -> int:
        """How many collaborative columns the ranker reads (0 without them)."""
        return len(self.ranker_features) - len(RANKER_FEATURE_NAMES)

    @classmethod
    def from_manifest(
        cls,
        manifest: BundleManifest,
        version: str | None = None,
        has_collaborative: bool | None = None,
    ) -> BundleTerms:
        """`has_collaborative`: whether the bundle holds the models (default: the manifest lists
        them)."""
        features = tuple(manifest.ranker_features)
        if has_collaborative is None:
            has_collaborative = bool(manifest.collaborative)
        if features not in RANKER_FEATURE_SETS:
            raise BundleIntegrityError(
                f"ranker features {manifest.ranker_features} are none of this server's "
                f"{[list(f) for f in RANKER_FEATURE_SETS]}",
                file="manifest.json",
            )
        uses_cf = features != RANKER_FEATURE_NAMES
        if uses_cf and not has_collaborative:
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
        return cls(
            version=version or manifest.model_version or "local",
            categories=tuple(manifest.categories),
            embedding_dim=manifest.embedding_dim,
            user_buckets=user_buckets,
            history_length=history_length,
            n_candidates=int(manifest.params.get("ranker.candidates", DEFAULT_CANDIDATES)),
            uses_collaborative=uses_cf,
            cold_start_min_events=int(
                manifest.params.get("cold_start.min_events", DEFAULT_COLD_START_MIN_EVENTS)
            ),
            ranker_features=features,
        )

    def cold_start_min_events_for(self, pinned: int | None) -> int:
        """The serving config's value when it pins one, else the bundle's."""
        return self.cold_start_min_events if pinned is None else pinned


@dataclass(frozen=True, eq=False)
class Catalog:
    """Item ids, their rows and categories: what filters and responses are expressed in."""

    item_ids: np.ndarray  # unicode [n]
    item_index: ItemIndex  # item_id -> row
    item_categories: np.ndarray  # int32 [n], indexes categories
    categories: tuple[str, ...]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @cached_property  # read by every request's filters (one entry per category, not per item)
    def category_codes(self) -> dict[str, int]:
        return {name: code for code, name in enumerate(self.categories)}

    @classmethod
    def from_bundle(cls, bundle: Bundle, terms: BundleTerms) -> Catalog:
        return cls(bundle.item_ids, bundle.item_index, bundle.item_categories, terms.categories)

    @classmethod
    def load(cls, directory: Path, manifest: BundleManifest) -> Catalog:
        from serve_app.bundle import load_item_categories, load_item_ids

        item_ids, item_index = load_item_ids(directory, manifest)
        return cls(
            item_ids,
            item_index,
            load_item_categories(directory, manifest),
            tuple(manifest.categories),
        )

    def filter_rows(self, filters: Filters) -> np.ndarray:
        """Rows the request's filters leave out (sorted, unique)."""
        parts = [self.item_index.known_rows(filters.exclude_item_ids)]
        codes_of = self.category_codes
        if filters.exclude_categories:
            codes = [codes_of[c] for c in filters.exclude_categories if c in codes_of]
            parts.append(np.flatnonzero(np.isin(self.item_categories, codes)))
        if filters.categories:
            codes = [codes_of[c] for c in filters.categories if c in codes_of]
            parts.append(np.flatnonzero(~np.isin(self.item_categories, codes)))
        return np.unique(np.concatenate(parts).astype(np.int64))

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Sorted unique rows of the known ids among `item_ids` (unknown ones are skipped)."""
        return np.unique(self.item_index.known_rows(item_ids))


@dataclass(frozen=True, eq=False)
class Popularity:
    """The bundle's popularity lists as rows: the cold-start candidates and the light-user prior."""

    global_rows: np.ndarray  # int64 rows, most popular first
    by_category: Mapping[str, np.ndarray]
    prior: np.ndarray  # float32 [n_items]: 1 for the most popular, 0 if not listed

    @classmethod
    def from_lists(cls, popularity: Mapping[str, Any], catalog: Catalog) -> Popularity:
        index = catalog.item_index
        top = index.known_rows(popularity.get("global", []))
        prior = np.zeros(catalog.n_items, dtype=np.float32)
        if len(top):
            prior[top] = 1.0 - np.arange(len(top), dtype=np.float32) / len(top)
        by_category = {
            str(name): index.known_rows(ids)
            for name, ids in dict(popularity.get("by_category", {})).items()
        }
        return cls(top, by_category, prior)

    def rows(self, category: str | None, excluded: np.ndarray, count: int) -> np.ndarray:
        """Most popular rows first: the category's list (when known) ahead of the global one."""
        lists = []
        if category is not None and category in self.by_category:
            lists.append(self.by_category[category])
        lists.append(self.global_rows)
        merged = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
        _, first = np.unique(merged, return_index=True)
        merged = merged[np.sort(first)]
        merged = merged[~np.isin(merged, excluded)]
        return merged[:count].astype(np.int64)


def preferred_category(categories: Sequence[str], user: UserState) -> str | None:
    """The request's segment when the bundle knows it, else the user's top category, if any."""
    segment = user.query.segment
    if segment is not None and segment in categories:
        return segment
    prefs = user.category_prefs
    if len(prefs) and float(prefs.max()) > 0:
        return str(categories[int(np.argmax(prefs))])
    return None


PAGE_BYTES = 4096


def touch_pages(array: np.ndarray) -> int:
    """Read one value a page of `array` (a memory-mapped bundle file read at random): its pages are
    faulted in at warm-up instead of on the first few hundred requests. Returns the bytes covered."""
    if not array.size:
        return 0
    flat = array.reshape(-1)
    float(flat[:: max(PAGE_BYTES // flat.itemsize, 1)].sum())
    return int(array.nbytes)
