"""The demo page's catalog, built once per Ingress replica: paged listing, bounded search, id lookup.

Used by `serve_app.demo` (the `/v1/demo/catalog` and `/v1/demo/items` routes run these off the event
loop). Built for a million items: columns stay in Arrow arrays (no Python object per item), the search
text is one lower-cased UTF-8 buffer ordered by (category, catalog position) so a category is one
contiguous byte range, and ids are a sorted fixed-width byte array for `searchsorted`. A search scans
that buffer with `bytes.find` in slices (so another thread gets the GIL between them) and stops
after `MAX_MATCHES` matching items: its cost is bounded by one pass over the buffer or that many
matches, whichever comes first; `total` is then a lower bound (`total_capped`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_MATCHES = 5_000  # matching items a search counts before it stops
SCAN_SLICE = 1 << 20  # bytes per bytes.find call: the GIL can change hands between calls
FIELD, ROW = b"\x1f", b"\n"  # separators of the search buffer; never in a needle


@dataclass(frozen=True)
class CatalogRow:
    item_id: str
    title: str
    category: str
    price: float


@dataclass(frozen=True)
class SearchResult:
    total: int
    total_capped: bool
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
    text: bytes  # "title\x1fid\x1fcategory\n" lower-cased, rows in `order`
    starts: np.ndarray  # byte offset of each row of `text`, plus its length
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
        clean = [_searchable(a) for a in (titles, ids, category)]
        lines = pc.binary_join_element_wise(*clean, FIELD.decode()).take(pa.array(order))
        text = (ROW.decode().join(lines.to_pylist()) + ROW.decode()).lower().encode()
        # Row starts from the byte lengths of the lower-cased UTF-8 rows (lower() may change a
        # character's width), recomputed on the buffer itself.
        ends = np.flatnonzero(np.frombuffer(text, np.uint8) == ROW[0]) + 1
        starts = np.concatenate([[0], ends]).astype(np.int64)
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
            text=text,
            starts=starts,
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
        """Items whose title, id or category contains `q` (case-insensitive), of category code
        `category` if given; without `q`, the catalog (or the category) in catalog order. With `q`,
        matches come in (category, catalog position) order and at most `MAX_MATCHES` are counted."""
        lo, hi = (
            (0, len(self))
            if category is None
            else (int(self.category_bounds[category]), int(self.category_bounds[category + 1]))
        )
        needle = q.strip().lower().encode()
        if not needle:
            page = np.arange(lo + offset, min(hi, lo + offset + limit), dtype=np.int64)
            positions = page if category is None else self.order[page]
            return SearchResult(total=hi - lo, total_capped=False, rows=self.rows(positions))
        matches = self._scan(needle, lo, hi)
        chosen = self.order[np.asarray(matches[offset : offset + limit], dtype=np.int64)]
        return SearchResult(
            total=len(matches), total_capped=len(matches) >= MAX_MATCHES, rows=self.rows(chosen)
        )

    def _scan(self, needle: bytes, lo: int, hi: int) -> list[int]:
        """Rows (in `order` space) of [lo, hi) whose search text contains `needle`."""
        if FIELD in needle or ROW in needle:
            return []
        found: list[int] = []
        pos, end = int(self.starts[lo]), int(self.starts[hi])
        overlap = len(needle) - 1
        while pos < end and len(found) < MAX_MATCHES:
            window = min(end, pos + SCAN_SLICE + overlap)
            at = self.text.find(needle, pos, window)
            if at < 0:
                pos = window - overlap if window < end else end
                continue
            row = int(np.searchsorted(self.starts, at, side="right")) - 1
            found.append(row)
            pos = int(self.starts[row + 1])  # one match per item
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


def _searchable(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A string column with the search buffer's separators replaced (a title cannot forge a row)."""
    return pc.replace_substring_regex(column, pattern="[\\x1f\\n]", replacement=" ")
