"""Serving memory at catalog scale: ids are looked up without a per-replica dict (and give the rows a
dict would), and the stages' catalog-sized arrays and index are memory maps of the bundle's files,
not copies in the process."""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_app.bundle import load_item_ids, read_manifest
from serve_app.errors import BundleIntegrityError
from serve_app.ids import ItemIndex
from serve_app.stages.catalog import Catalog
from serve_app.stages.ranker import RankingModel
from serve_app.stages.records import Filters
from serve_app.stages.reranker import ReRankingModel
from serve_app.stages.retriever import RetrievalModel
from serve_app.stages.user_tower import TowerModel, encode_recent
from tests.bundle_factory import make_serving_bundle, make_tiny_bundle
from training.registry import finalize_bundle

N_ITEMS, DIM = 40, 8


def test_id_lookup_gives_the_rows_a_dict_gives() -> None:
    rng = np.random.default_rng(0)
    # Unsorted ids of mixed widths, non-ASCII ones, one empty and prefixes of one another.
    ids = np.array(["b7", "a", "", "a1", "zz9", "é", "日本", "a10", "b", "Z"])[rng.permutation(10)]
    by_dict = {str(item): row for row, item in enumerate(ids.tolist())}
    index = ItemIndex.from_ids(ids)
    queries = [*ids.tolist(), "a100", "a1 ", "b7\x00", "日", "x", "A", "zz9", "a", "a"]
    expected = [by_dict.get(q, -1) for q in queries]
    assert index.rows(queries).tolist() == expected
    assert index.known_rows(queries).tolist() == [r for r in expected if r >= 0]
    assert [q in index for q in queries] == [q in by_dict for q in queries]
    assert index["a10"] == by_dict["a10"] and index.get("nope") is None
    with pytest.raises(KeyError):
        index["a100"]
    assert list(index) == ids.tolist() and len(index) == len(ids)
    assert index.rows([]).tolist() == []
    assert ItemIndex.from_ids(np.array([], dtype="<U1")).rows(["a"]).tolist() == [-1]


def test_a_repeated_id_is_refused_by_the_loader(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate item id 'b'"):
        ItemIndex.from_ids(np.array(["a", "b", "c", "b"]))
    make_tiny_bundle(tmp_path, n_items=N_ITEMS, dim=DIM)
    ids = np.load(tmp_path / "item_ids.npy")
    ids[7] = ids[3]
    np.save(tmp_path / "item_ids.npy", ids)
    manifest = finalize_bundle(tmp_path, read_manifest(tmp_path))
    with pytest.raises(BundleIntegrityError, match="duplicate item id 'item_0003'") as exc:
        load_item_ids(tmp_path, manifest)
    assert exc.value.file == "item_ids.npy"


def test_filters_and_histories_resolve_ids_as_a_dict_would(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path, n_items=N_ITEMS, dim=DIM)
    catalog = Catalog.load(tmp_path, read_manifest(tmp_path))
    by_dict = {f"item_{i:04d}": i for i in range(N_ITEMS)}
    asked = ["item_0012", "gone", "item_0003", "item_0012", "item_003", "item_00030"]
    expected = sorted({by_dict[i] for i in asked if i in by_dict})
    assert catalog.rows_of(asked).tolist() == expected == [3, 12]
    assert catalog.filter_rows(Filters(exclude_item_ids=tuple(asked))).tolist() == expected
    # Newest first, unknown ids skipped, row + 1, 0-padded.
    recent = encode_recent(["item_0005", "gone", "item_0000", "item_0039"], catalog.item_index, 5)
    assert recent.tolist() == [6, 1, 40, 0, 0]


def _reachable(value: Any, depth: int = 0) -> Iterator[Any]:
    """Every object held by a stage model: dataclass fields, mapping values, sequence items."""
    yield value
    if depth > 6:
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _reachable(getattr(value, field.name), depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _reachable(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _reachable(item, depth + 1)


def _is_file_mapped(array: np.ndarray) -> bool:
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)


def test_stage_models_hold_no_dict_of_the_catalog_and_map_its_arrays(tmp_path: Path) -> None:
    make_serving_bundle(tmp_path, n_items=N_ITEMS, dim=DIM, hidden=6)
    manifest = read_manifest(tmp_path)
    tower = TowerModel.from_directory(tmp_path, "1", manifest)
    retrieval = RetrievalModel.from_directory(tmp_path, "1", manifest)
    reranking = ReRankingModel.from_directory(tmp_path, "1", manifest)
    ranking = RankingModel.from_directory(tmp_path, "1", manifest)

    for model in (tower, retrieval, reranking, ranking):
        model.warm()  # serves from the maps (searches, gathers, a forward pass)
        held = list(_reachable(model))
        catalog_sized = [
            v
            for v in held
            if isinstance(v, (Mapping, list, set)) and not isinstance(v, ItemIndex)
            if len(v) >= N_ITEMS
        ]
        assert not catalog_sized, f"{type(model).__name__} holds {type(catalog_sized[0])}"
    for catalog in (retrieval.catalog, reranking.catalog):
        assert isinstance(catalog.item_index, ItemIndex)
        assert _is_file_mapped(catalog.item_ids) and _is_file_mapped(catalog.item_categories)
    assert isinstance(tower.item_index, ItemIndex)

    # One copy of the embeddings: the bundle file's pages, in both stages that read them.
    for embeddings in (retrieval.item_embeddings, reranking.item_embeddings):
        assert _is_file_mapped(embeddings) and not embeddings.flags.writeable
        np.testing.assert_array_equal(embeddings, np.load(tmp_path / "item_embeddings.npy"))
    assert _is_file_mapped(ranking.item_features) and _is_file_mapped(ranking.item_categories)
    history = tower.tower.history_embedding  # type: ignore[attr-defined]
    assert _is_file_mapped(history) and history.shape == (N_ITEMS + 1, 6)
    # The FAISS index reads its vectors from a shared read-only map of index.faiss.
    maps = Path("/proc/self/maps").read_text().splitlines()
    index_maps = [line for line in maps if line.endswith(str(tmp_path / "index.faiss"))]
    assert index_maps and all(line.split()[1] == "r--s" for line in index_maps)
