"""Item id -> row lookup over the bundle's `item_ids.npy`, without a per-replica Python dict.

Built by `serve_app.bundle.load_item_ids` and read by the stages' catalog, the user tower (histories)
and the event writer. A dict of a million ids costs ~150 MiB of Python objects in every replica and
version; this is the id array itself (memory-mapped, shared through the page cache) and one int32
sort permutation (4 MB per million items), searched with `np.searchsorted`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np


class ItemIndex(Mapping[str, int]):
    """Rows of item ids: `rows(ids)` for a batch (-1 for unknown ids), `index[id]`/`get` for one.

    Holds the ids sorted as UTF-8 bytes (1 byte a character for ASCII ids, a quarter of the unicode
    array) and their rows: `np.searchsorted` without a `sorter` (which would check all n entries
    of the permutation on every call). Lookups compare whole ids, as a dict would: an id that is a
    prefix or an extension of a stored id, or that holds a NUL character (numpy strips trailing NULs), never
    matches.
    """

    __slots__ = ("_order", "_sorted")

    def __init__(self, sorted_ids: np.ndarray, order: np.ndarray) -> None:
        self._sorted = sorted_ids  # bytes [n], ascending
        self._order = order  # int32/int64 [n]: row of each sorted id

    @classmethod
    def from_ids(cls, item_ids: np.ndarray) -> ItemIndex:
        """Sort once; ValueError if an id repeats or the array is not unicode."""
        if item_ids.dtype.kind != "U":
            raise ValueError(f"item ids must be unicode, not {item_ids.dtype}")
        dtype = np.int32 if len(item_ids) < 2**31 else np.int64
        order = np.argsort(item_ids, kind="stable").astype(dtype)
        try:
            # UTF-8 bytes sort in code point order: the same order as the unicode ids.
            sorted_ids = item_ids[order].astype(np.bytes_)
        except UnicodeEncodeError:
            sorted_ids = np.char.encode(item_ids[order], "utf-8")
        repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(repeated):
            raise ValueError(f"duplicate item id {sorted_ids[repeated[0]].decode()!r}")
        order.flags.writeable = False
        sorted_ids.flags.writeable = False
        return cls(sorted_ids, order)

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        """int64 row of each id, in order; -1 where the catalog does not have it."""
        ids = list(item_ids)
        if not ids:
            return np.zeros(0, dtype=np.int64)
        n = len(self._sorted)
        if n == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        query = np.array([i.encode("utf-8") for i in ids], dtype=np.bytes_)
        at = np.minimum(np.searchsorted(self._sorted, query), n - 1)
        found = self._sorted[at] == query
        if any("\x00" in i for i in ids):
            found &= np.array(["\x00" not in i for i in ids])
        return np.where(found, self._order[at].astype(np.int64), -1)

    def known_rows(self, item_ids: Iterable[str]) -> np.ndarray:
        """Rows of the known ids among `item_ids`, in their order (unknown ones skipped)."""
        rows = self.rows(item_ids)
        return rows[rows >= 0]

    # Mapping[str, int]: one id at a time (the event writer, tests); batches should use `rows`.
    def __getitem__(self, item_id: str) -> int:
        if not isinstance(item_id, str):
            raise KeyError(item_id)
        row = int(self.rows([item_id])[0])
        if row < 0:
            raise KeyError(item_id)
        return row

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and int(self.rows([item_id])[0]) >= 0

    def __iter__(self) -> Iterator[str]:
        """Ids in row order."""
        rows = np.argsort(self._order)
        return (bytes(b).decode("utf-8") for b in self._sorted[rows])

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes + self._order.nbytes)
