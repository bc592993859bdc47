"""The demo page's server side, mounted on the Ingress's API: `/demo` and `/demo/ops` (static files in
`serve_app/web/`, vanilla JS), and the small JSON endpoints they read under `/v1/demo/`.

The page itself talks to the real API (`POST /v1/events`, `POST /v1/recommendations` with
`"explain": true`, `GET /v1/experiments`); what is here only lists the catalog and the known users
(local Parquet files, `DemoConfig`), reads one user's vectors through the graph, and reports this
replica's last minute (`serve_app.live`) with the shadow log's overlap. Not mounted with
`demo.enabled` false; with auth on every route here needs scope `debug` (`serve_app.access`). The catalog's search, paging
and id lookup (`serve_app.demo_catalog`, sized for a million items) run in a worker thread, never on
the event loop that answers recommendations.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from serve_app.config import ServeSettings
from serve_app.demo_catalog import CatalogIndex
from serve_app.experiments import ExperimentLog, ShadowSummary
from serve_app.http_errors import error_response
from serve_app.metrics import RequestMetrics
from serve_app.schemas import ID_PATTERN, MAX_ID_LENGTH
from serve_app.stages.explain import UserVectors
from serve_app.stages.records import Query

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("web")
MAX_PAGE = 200  # catalog items per response
MAX_LOOKUP = 100  # ids per /v1/demo/items request
MAX_OFFSET = 10_000_000
SHADOW_SAMPLE = 500  # latest shadow comparisons the ops view summarises
NO_CACHE = {"Cache-Control": "no-cache"}


# --- records -------------------------------------------------------------------------------------


class CatalogItemOut(BaseModel):
    item_id: str
    title: str
    category: str
    price: float


class CatalogPage(BaseModel):
    total: int = Field(description="items matching the search and category")
    offset: int
    limit: int
    categories: list[str] = Field(description="every category of the catalog, sorted")
    items: list[CatalogItemOut] = Field(max_length=MAX_PAGE)


class CatalogItems(BaseModel):
    items: list[CatalogItemOut] = Field(
        max_length=MAX_LOOKUP, description="the catalog rows of the ids asked, in their order"
    )
    missing: list[str] = Field(description="ids the catalog does not hold")


class KnownUser(BaseModel):
    user_id: str
    event_count: float = Field(description="positive interactions in the feature snapshot")
    top_category: str | None = Field(description="the category most of their seen items are in")


class KnownUsers(BaseModel):
    users: list[KnownUser] = Field(max_length=1_000, description="most active first")


class UserVectorsResponse(BaseModel):
    user_id: str
    variant: str
    model_version: str
    fallback: str | None
    vectors: UserVectors


class ShadowStats(BaseModel):
    mirrored: int = Field(0, description=f"comparisons among the latest {SHADOW_SAMPLE}")
    mean_jaccard: float | None = None
    mean_rbo: float | None = None
    errors: dict[str, int] = Field(default_factory=dict)
    error: str | None = Field(None, description="why the shadow log could not be read")


class LiveStats(BaseModel):
    """This Ingress replica's POST /v1/recommendations over the last window."""

    window_seconds: float
    requests: int
    requests_per_second: float
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    served: int
    fallbacks: dict[str, int]
    fallback_share: float | None
    shadow: ShadowStats


# --- the tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTables:
    """The catalog (indexed for search and lookup) and the known users, as the page lists them."""

    catalog: CatalogIndex
    users: list[KnownUser]

    @property
    def categories(self) -> list[str]:
        return self.catalog.categories

    @classmethod
    def load(cls, catalog_file: Path, users_file: Path, max_users: int) -> DemoTables:
        catalog = CatalogIndex.load(catalog_file)
        return cls(catalog, known_users(users_file, catalog, max_users))


def known_users(users_file: Path, catalog: CatalogIndex, max_users: int) -> list[KnownUser]:
    """The `max_users` most active users (one row each; ties by id) with their main category.

    A million-user table (several snapshot rows per user) costs its two small columns, one numeric
    sort, and the `seen_items` of the row groups holding the chosen rows: ids are made Python
    strings only for the rows that can make the cut."""
    file = pq.ParquetFile(users_file)
    names = file.schema_arrow.names
    table = file.read(columns=[c for c in ("user_id", "event_count") if c in names])
    user_ids = pc.cast(table.column("user_id"), pa.string()).combine_chunks()
    counts = (
        np.nan_to_num(table.column("event_count").to_numpy(zero_copy_only=False).astype(float))
        if "event_count" in names
        else np.zeros(len(user_ids))
    )
    rows = _contenders(user_ids, counts, max_users)
    ids = np.asarray(user_ids.take(pa.array(rows)).to_pylist(), dtype=str)
    # Most active first, ties by id; a user with several snapshots counts once (their largest).
    order = np.lexsort((ids, -counts[rows]))
    _, first = np.unique(ids[order], return_index=True)
    top = order[np.sort(first)][:max_users]
    seen_of: list[list[str]] = [[] for _ in top]
    if "seen_items" in names and len(top):
        seen_of = [list(r or ()) for r in _take_rows(file, "seen_items", rows[top]).to_pylist()]
    users = []
    for p, seen_items in zip(top, seen_of, strict=True):
        found, _ = catalog.lookup([str(i) for i in seen_items][:MAX_LOOKUP])
        seen = Counter(row.category for row in found)
        users.append(
            KnownUser(
                user_id=str(ids[p]),
                event_count=float(counts[rows[p]]),
                top_category=seen.most_common(1)[0][0] if seen else None,
            )
        )
    return users


def _contenders(user_ids: pa.StringArray, counts: np.ndarray, max_users: int) -> np.ndarray:
    """Rows that can be among the `max_users` most active users: every row counting at least as
    much as the row where, most active first, the `max_users`-th distinct user appears."""
    by_count = np.argsort(-counts, kind="stable")
    seen: set[str] = set()
    step = max(4 * max_users, 1_024)
    for start in range(0, len(by_count), step):
        block = by_count[start : start + step]
        for offset, user in enumerate(user_ids.take(pa.array(block)).to_pylist()):
            seen.add(user)
            if len(seen) >= max_users:
                floor = counts[block[offset]]
                return np.flatnonzero(counts >= floor).astype(np.int64)
    return np.arange(len(counts), dtype=np.int64)


def _take_rows(file: pq.ParquetFile, column: str, rows: np.ndarray) -> pa.Array:
    """`column` at `rows` (in their order), reading only the row groups that hold them."""
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    table = file.read_row_groups([int(g) for g in groups], columns=[column])
    # Row r of the file is row r - starts[g] + (rows of the groups read before g) of `table`.
    before = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
    local = rows - starts[group_of] + before[np.searchsorted(groups, group_of)]
    return table.column(column).take(pa.array(local.astype(np.int64))).combine_chunks()


def catalog_page(
    tables: DemoTables, q: str, category: str | None, offset: int, limit: int
) -> CatalogPage:
    """A page of items each word of `q` begins a word of (title, id or category; case-insensitive),
    of `category` if given (`CatalogIndex.search`: an inverted index, an exact count)."""
    code = None if category is None else tables.catalog.category_code(category)
    found = tables.catalog.search(q, code, offset, limit)
    return CatalogPage(
        total=found.total,
        offset=offset,
        limit=limit,
        categories=tables.categories,
        items=[CatalogItemOut(**asdict(row)) for row in found.rows],
    )


def catalog_items(tables: DemoTables, ids: list[str]) -> CatalogItems:
    rows, missing = tables.catalog.lookup(ids)
    return CatalogItems(items=[CatalogItemOut(**asdict(r)) for r in rows], missing=missing)


def parse_ids(raw: str) -> list[str] | str:
    """The ids of a comma-separated `ids` parameter, or why they are refused."""
    ids = [i.strip() for i in raw.split(",") if i.strip()]
    if not ids:
        return "give at least one item id"
    if len(ids) > MAX_LOOKUP:
        return f"at most {MAX_LOOKUP} ids per request, got {len(ids)}"
    for item_id in ids:
        if len(item_id) > MAX_ID_LENGTH or not ID_PATTERN.fullmatch(item_id):
            return f"not an item id: {item_id[:MAX_ID_LENGTH]!r}"
    return ids


# --- routes --------------------------------------------------------------------------------------


UserId = Annotated[
    str,
    PathParam(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN.pattern),
]


class DemoSource:
    """One replica's demo tables, loaded once in a worker thread. The Ingress awaits `preload` in
    its constructor, so a replica takes traffic with its tables in memory: at a million items the
    load takes seconds of GIL-bound work that would otherwise land on the first searches and on
    the recommendations beside them. A failed load is retried by the next request that needs it."""

    def __init__(self, settings: ServeSettings) -> None:
        self._demo = settings.demo
        self._data_dir = settings.feature_store.data_dir
        self._loaded: DemoTables | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> DemoTables:
        async with self._lock:
            if self._loaded is None:
                self._loaded = await asyncio.to_thread(
                    DemoTables.load,
                    self._demo.catalog_file(self._data_dir),
                    self._demo.users_file(self._data_dir),
                    self._demo.max_users,
                )
        return self._loaded

    async def preload(self) -> None:
        """Load now; a failure is logged (the demo routes answer 503 until a load succeeds)."""
        if not self._demo.enabled:
            return
        try:
            await self.get()
        except Exception as exc:
            logger.warning("demo tables not loaded at start: %s", exc)


def mount_demo(
    app: FastAPI,
    backend: Any,
    settings: ServeSettings,
    metrics: RequestMetrics | None,
    source: DemoSource | None = None,
) -> None:
    """Add the demo routes to the API (`backend`: the ingress's `Backend`; `source`: the replica's
    tables, preloaded by the Ingress; None: loaded by the first request that needs them)."""
    from serve_app.ingress import ERRORS, _backend_error

    demo = settings.demo
    if not demo.enabled:
        return
    source = source or DemoSource(settings)
    tables = source.get
    experiment = settings.experiment

    def unavailable(exc: Exception) -> JSONResponse:
        # Which file and why go to the log; the answer carries no exception text.
        logger.warning("demo tables unavailable: %s", exc)
        return error_response(503, "demo_unavailable", "the demo's catalog or users cannot be read")

    shadow_log: list[ExperimentLog] = []

    def read_shadow() -> ShadowSummary:
        if not shadow_log:
            from serve_app.redis_client import connect_redis

            shadow_log.append(
                ExperimentLog(
                    connect_redis(settings.event_redis_url, settings.redis_timeout_seconds),
                    experiment.key_prefix,
                    experiment.name,
                    experiment.attribution_window_seconds,
                )
            )
        return ShadowSummary.of(shadow_log[0].shadow_log(SHADOW_SAMPLE))

    app.mount("/demo/static", StaticFiles(directory=STATIC), name="demo-static")

    @app.get("/demo", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=NO_CACHE)

    @app.get("/demo/ops", include_in_schema=False)
    async def ops_page() -> FileResponse:
        return FileResponse(STATIC / "ops.html", headers=NO_CACHE)

    @app.get("/v1/demo/catalog", response_model=CatalogPage, responses=ERRORS)
    async def catalog(
        q: Annotated[
            str,
            QueryParam(
                max_length=64, description="words, each the beginning of a word of the item"
            ),
        ] = "",
        category: Annotated[str | None, QueryParam(max_length=MAX_ID_LENGTH)] = None,
        offset: Annotated[int, QueryParam(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, QueryParam(ge=1, le=MAX_PAGE)] = 60,
    ) -> Any:
        """The demo catalog (title, category, price), searchable and filtered by category, paged
        (every word of `q` must begin a word of the item's title, id or category)."""
        try:
            found = await tables()
        except Exception as exc:
            return unavailable(exc)
        if category is not None and found.catalog.category_code(category) is None:
            return error_response(
                422, "invalid_request", f"unknown category {category!r}", "category"
            )
        # Off the event loop: a search over a million titles must not hold up recommendations.
        return await asyncio.to_thread(catalog_page, found, q, category, offset, limit)

    @app.get("/v1/demo/items", response_model=CatalogItems, responses=ERRORS)
    async def items(
        ids: Annotated[
            str,
            QueryParam(
                max_length=MAX_LOOKUP * (MAX_ID_LENGTH + 1),
                description=f"comma-separated item ids (at most {MAX_LOOKUP})",
            ),
        ],
    ) -> Any:
        """Title, category and price of the given items (the page names its recommendations
        with these, without holding the catalog)."""
        wanted = parse_ids(ids)
        if isinstance(wanted, str):
            return error_response(422, "invalid_request", wanted, "ids")
        try:
            found = await tables()
        except Exception as exc:
            return unavailable(exc)
        return await asyncio.to_thread(catalog_items, found, wanted)

    @app.get("/v1/demo/users", response_model=KnownUsers, responses=ERRORS)
    async def users() -> Any:
        """Known users of the feature snapshot, most active first (at most demo.max_users)."""
        try:
            return KnownUsers(users=(await tables()).users)
        except Exception as exc:
            return unavailable(exc)

    @app.get(
        "/v1/demo/users/{user_id}/vectors", response_model=UserVectorsResponse, responses=ERRORS
    )
    async def vectors(user_id: UserId) -> Any:
        """The user's base, real-time delta and combined vectors, read through the graph (one
        explained request for one item: it counts as a served request). 403 explain_disabled
        when explain traces are off (api.explain_enabled): the same data."""
        if not settings.api.explain_enabled:
            return error_response(
                403,
                "explain_disabled",
                "explain traces are turned off (api.explain_enabled)",
                "user_id",
            )
        query = Query(request_id=uuid.uuid4().hex, user_id=user_id, k=1, explain=True)
        try:
            result = await asyncio.wait_for(
                backend.recommend(query), timeout=settings.api.request_timeout_seconds
            )
        except Exception as exc:
            return _backend_error(exc)
        assert result.trace is not None, "an explained request carries its trace"
        return UserVectorsResponse(
            user_id=user_id,
            variant=result.variant,
            model_version=result.model_version,
            fallback=result.fallback,
            vectors=result.trace.user,
        )

    @app.get("/v1/demo/stats", response_model=LiveStats, responses=ERRORS)
    async def stats() -> Any:
        """This replica's last minute of recommendations (rate, latency, fallbacks) and the shadow
        log's overlap (every replica's)."""
        snapshot = metrics.live.snapshot() if metrics is not None else None
        shadow = ShadowStats()
        if experiment.shadow_ref is not None:
            try:
                summary = await asyncio.wait_for(asyncio.to_thread(read_shadow), timeout=2.0)
                shadow = ShadowStats(
                    mirrored=summary.mirrored,
                    mean_jaccard=summary.mean_jaccard,
                    mean_rbo=summary.mean_rbo,
                    errors=dict(summary.errors),
                )
            except Exception as exc:  # Redis down: the rest of the view still answers
                logger.warning("shadow log unavailable: %r", exc)
                shadow = ShadowStats(error="shadow log unavailable")
        if snapshot is None:
            return error_response(503, "no_metrics", "this API runs without request metrics")
        return LiveStats(**asdict(snapshot), shadow=shadow)
