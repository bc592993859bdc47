"""The demo page's catalog, built once per Ingress replica: paged listing, word search, id lookup.

Used by `serve_app.demo` (the `/v1/demo/catalog` and `/v1/demo/items` routes run these off the event
loop; the Ingress builds it before it takes traffic). Built for a million items: columns stay in Arrow
arrays (no Python object per item); items are ordered by (category, catalog position) so a category
is one contiguous range; ids are a sorted fixed-width byte array for `searchsorted`.

Search is by words, as a shop's search box: an item matches when every word of the query begins a
word of its title, id or category (case-insensitive; words are runs of letters and digits, split
by Arrow's own kernel for the catalog and the query alike). An inverted index holds, for each
distinct word in sorted order, the items containing it, all in one array: the items of every word
beginning with a prefix are one contiguous slice of it. A search marks the slice of its most
selective word in a bitmap and keeps the items every other word's slice marks too, so its cost is
bounded by the postings it reads (at most the catalog's words: ~6M at a million items, ~20 ms) and
never scans titles; the count is exact.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WORD_SPLIT = r"[^\p{L}\p{N}]+"  # RE2 (Arrow): what separates words
# A word's items are marked in a bitmap beyond this share of the catalog (one pass over n bytes
# instead of sorting them).
BITMAP_SHARE = 1 / 32


@dataclass(frozen=True)
class CatalogRow:
    item_id: str
    title: str
    category: str
    price: float


@dataclass(frozen=True)
class SearchResult:
    total: int
    rows: list[CatalogRow]


@dataclass(frozen=True)
class CatalogIndex:
    """The catalog's columns and the structures that make search and lookup cheap."""

    item_ids: pa.StringArray  # catalog order
    titles: pa.StringArray
    prices: np.ndarray  # float64, catalog order
    codes: np.ndarray  # int32 category code per item, catalog order
    categories: list[str]  # sorted; a code indexes it
    order: np.ndarray  # catalog positions sorted by (category code, position)
    category_bounds: np.ndarray  # order[bounds[c]:bounds[c + 1]] are category c's items
    words: pa.StringArray  # distinct lower-cased words of titles, ids and categories, sorted
    word_starts: (
        np.ndarray
    )  # int64 [len(words) + 1]: word w's items are postings[starts[w]:starts[w+1]]
    postings: np.ndarray  # int32: positions in `order` (ascending within a word)
    sorted_ids: np.ndarray  # fixed-width bytes, sorted
    sorted_positions: np.ndarray  # catalog position of each sorted id

    @classmethod
    def from_table(cls, table: pa.Table) -> CatalogIndex:
        ids = pc.cast(table.column("item_id"), pa.string()).combine_chunks()
        if "title" in table.column_names:
            raw = pc.cast(table.column("title"), pa.string()).combine_chunks()
            # An empty or missing title shows the id, as before.
            titles = pc.if_else(pc.fill_null(pc.equal(raw, ""), True), ids, raw)
        else:
            titles = ids
        titles = pc.cast(titles, pa.string())
        category = pc.cast(table.column("category"), pa.string()).combine_chunks()
        encoded = pc.dictionary_encode(category)
        names = encoded.dictionary.to_pylist()
        # Codes follow the sorted category names, so the page's category list is sorted too.
        rank = np.empty(len(names), np.int32)
        rank[np.argsort(np.array(names, dtype=object))] = np.arange(len(names), dtype=np.int32)
        codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
        categories = sorted(names)
        order = np.argsort(codes, kind="stable").astype(np.int64)
        bounds = np.searchsorted(codes[order], np.arange(len(categories) + 1)).astype(np.int64)
        words, word_starts, postings = _inverted_index(
            [
                titles.take(pa.array(order)),
                ids.take(pa.array(order)),
                category.take(pa.array(order)),
            ]
        )
        id_bytes = np.array([i.encode() for i in ids.to_pylist()] or [b""])[: len(ids)]
        sorted_positions = np.argsort(id_bytes, kind="stable").astype(np.int64)
        sorted_ids = id_bytes[sorted_positions]
        return cls(
            item_ids=ids,
            titles=titles,
            prices=pc.cast(table.column("price"), pa.float64()).to_numpy(),
            codes=codes,
            categories=categories,
            order=order,
            category_bounds=bounds,
            words=words,
            word_starts=word_starts,
            postings=postings,
            sorted_ids=sorted_ids,
            sorted_positions=sorted_positions,
        )

    @classmethod
    def load(cls, catalog_file: Path) -> CatalogIndex:
        names = pq.read_schema(catalog_file).names
        missing = {"item_id", "category", "price"} - set(names)
        if missing:
            raise ValueError(f"{catalog_file} lacks columns {sorted(missing)}")
        columns = [c for c in ("item_id", "category", "price", "title") if c in names]
        return cls.from_table(pq.read_table(catalog_file, columns=columns))

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, positions: Sequence[int] | np.ndarray) -> list[CatalogRow]:
        """Catalog rows at `positions` (catalog order), as the page shows them."""
        at = pa.array(np.asarray(positions, dtype=np.int64))
        ids = self.item_ids.take(at).to_pylist()
        titles = self.titles.take(at).to_pylist()
        return [
            CatalogRow(
                item_id=i,
                title=t,
                category=self.categories[int(self.codes[p])],
                price=round(float(self.prices[p]), 2),
            )
            for i, t, p in zip(ids, titles, np.asarray(positions), strict=True)
        ]

    def category_code(self, name: str) -> int | None:
        k = int(np.searchsorted(np.array(self.categories, dtype=object), name))
        return k if k < len(self.categories) and self.categories[k] == name else None

    def search(self, q: str, category: int | None, offset: int, limit: int) -> SearchResult:
        """Items every word of `q` begins a word of (title, id or category), of category code
        `category` if given, in (category, catalog position) order; without words in `q`, the
        catalog (or the category) in catalog order."""
        lo, hi = (
            (0, len(self))
            if category is None
            else (int(self.category_bounds[category]), int(self.category_bounds[category + 1]))
        )
        query = split_words(q)
        if not query:
            page = np.arange(lo + offset, min(hi, lo + offset + limit), dtype=np.int64)
            positions = page if category is None else self.order[page]
            return SearchResult(total=hi - lo, rows=self.rows(positions))
        matches = self._matches(query, lo, hi)
        chosen = self.order[matches[offset : offset + limit].astype(np.int64)]
        return SearchResult(total=len(matches), rows=self.rows(chosen))

    def _postings(self, prefix: str) -> np.ndarray:
        """Items (`order` positions) with a word beginning with `prefix`: one slice, unsorted
        across words, sorted within each."""
        sorted_words = _ArrowSequence(self.words)
        first = bisect.bisect_left(sorted_words, prefix)
        last = bisect.bisect_left(sorted_words, prefix + _AFTER_EVERY_CHARACTER, lo=first)
        return self.postings[int(self.word_starts[first]) : int(self.word_starts[last])]

    def _matches(self, query: list[str], lo: int, hi: int) -> np.ndarray:
        """Sorted `order` positions in [lo, hi) matching every word of `query`."""
        slices = sorted((self._postings(w) for w in set(query)), key=len)
        if not len(slices[0]):
            return np.zeros(0, dtype=np.int32)
        found = _distinct(slices[0], len(self))
        found = found[np.searchsorted(found, lo) : np.searchsorted(found, hi)]
        for other in slices[1:]:
            if not len(found):
                break
            marked = np.zeros(len(self), dtype=bool)
            marked[other] = True
            found = found[marked[found]]
        return found

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[CatalogRow], list[str]]:
        """The catalog rows of `item_ids` (in the order asked, duplicates once) and the ids the
        catalog does not hold."""
        wanted = list(dict.fromkeys(item_ids))
        if not len(self.sorted_ids):
            return [], wanted
        keys = np.array([i.encode() for i in wanted], dtype=self.sorted_ids.dtype)
        at = np.minimum(np.searchsorted(self.sorted_ids, keys), len(self.sorted_ids) - 1)
        # Fixed-width bytes drop trailing NULs and truncate: compare the full id.
        hit = (self.sorted_ids[at] == keys) & np.array(
            [len(i.encode()) <= self.sorted_ids.itemsize for i in wanted], dtype=bool
        )
        rows = self.rows(self.sorted_positions[at[hit]]) if hit.any() else []
        missing = [i for i, h in zip(wanted, hit, strict=True) if not h]
        return rows, missing


_AFTER_EVERY_CHARACTER = "\U0010ffff"  # sorts after any word with the same beginning


class _ArrowSequence:
    """A sorted Arrow string array as a sequence `bisect` can search (log n `as_py` calls)."""

    def __init__(self, array: pa.StringArray) -> None:
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i: int) -> str:
        return str(self._array[i].as_py())


def split_words(text: str) -> list[str]:
    """The lower-cased words of `text`, split exactly as the catalog's are."""
    return [w for w in _word_lists(pa.array([text])).to_pylist()[0] if w]


def _word_lists(column: pa.Array) -> pa.ListArray:
    return pc.split_pattern_regex(pc.utf8_lower(column), pattern=WORD_SPLIT)


def _inverted_index(columns: list[pa.Array]) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """Sorted distinct words of `columns` (one or more, rows aligned) and, per word, the rows holding it:
    (words, starts [len(words) + 1], postings int32)."""
    words_of: list[pa.Array] = []
    rows_of: list[np.ndarray] = []
    for column in columns:
        lists = _word_lists(column)
        flat = pc.list_flatten(lists)
        parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        keep = pc.not_equal(flat, "")
        words_of.append(flat.filter(keep))
        rows_of.append(parents[keep.to_numpy(zero_copy_only=False)])
    flat_words = pa.concat_arrays(words_of)
    rows = np.concatenate(rows_of).astype(np.int64)
    encoded = pc.dictionary_encode(flat_words)
    dictionary = encoded.dictionary
    by_word = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(dictionary), dtype=np.int64)
    rank[by_word] = np.arange(len(dictionary), dtype=np.int64)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    n_rows = max(len(columns[0]), 1)
    pairs = _sorted_distinct(codes * n_rows + rows)  # a word twice in one item: once
    word_starts = np.searchsorted(pairs // n_rows, np.arange(len(dictionary) + 1)).astype(np.int64)
    return (
        dictionary.take(pa.array(by_word)),
        word_starts,
        (pairs % n_rows).astype(np.int32),
    )


def _distinct(positions: np.ndarray, n: int) -> np.ndarray:
    """Sorted distinct `positions` (< n): a sort when few, a bitmap pass when many."""
    if len(positions) < n * BITMAP_SHARE:
        return _sorted_distinct(positions)
    marked = np.zeros(n, dtype=bool)
    marked[positions] = True
    return np.flatnonzero(marked).astype(np.int32)


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """`np.unique` by a sort: numpy's hash-based unique is ~4x slower on millions of integers."""
    values = np.sort(values)
    if len(values) < 2:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]
