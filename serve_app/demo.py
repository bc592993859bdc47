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
import pyarrow.parquet as pq
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from serve_app.config import ServeSettings
from serve_app.demo_catalog import MAX_MATCHES, CatalogIndex
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
    total_capped: bool = Field(
        False,
        description=f"a search stops counting at {MAX_MATCHES} matches: `total` is a lower bound "
        "and pages end there (refine the search)",
    )
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
    """The `max_users` most active users (one row each) with their main category; only their rows'
    seen items are read, so a million-user table costs two columns and a few rows."""
    names = pq.read_schema(users_file).names
    table = pq.read_table(users_file, columns=[c for c in ("user_id", "event_count") if c in names])
    ids = table.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    counts = (
        np.nan_to_num(table.column("event_count").to_numpy(zero_copy_only=False).astype(float))
        if "event_count" in names
        else np.zeros(len(ids))
    )
    # Most active first, ties by id; a user with several snapshots counts once (their largest).
    order = np.lexsort((ids, -counts))
    _, first = np.unique(ids[order], return_index=True)
    top = order[np.sort(first)][:max_users]
    seen_of: dict[str, list[str]] = {}
    if "seen_items" in names and len(top):
        column = pq.read_table(users_file, columns=["seen_items"]).column("seen_items")
        rows = column.take(pa.array(top.astype(np.int64)))
        seen_of = {ids[p]: list(r or ()) for p, r in zip(top, rows.to_pylist(), strict=True)}
    users = []
    for p in top:
        found, _ = catalog.lookup([str(i) for i in seen_of.get(ids[p], ())][:MAX_LOOKUP])
        seen = Counter(row.category for row in found)
        users.append(
            KnownUser(
                user_id=str(ids[p]),
                event_count=float(counts[p]),
                top_category=seen.most_common(1)[0][0] if seen else None,
            )
        )
    return users


def catalog_page(
    tables: DemoTables, q: str, category: str | None, offset: int, limit: int
) -> CatalogPage:
    """A page of items whose id, title or category contains `q` (case-insensitive), of `category` if
    given (`CatalogIndex.search`: bounded cost, at most `MAX_MATCHES` counted)."""
    code = None if category is None else tables.catalog.category_code(category)
    found = tables.catalog.search(q, code, offset, limit)
    return CatalogPage(
        total=found.total,
        total_capped=found.total_capped,
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


def mount_demo(
    app: FastAPI, backend: Any, settings: ServeSettings, metrics: RequestMetrics | None
) -> None:
    """Add the demo routes to the API (`backend`: the ingress's `Backend`)."""
    from serve_app.ingress import ERRORS, _backend_error

    demo = settings.demo
    if not demo.enabled:
        return
    data_dir = settings.feature_store.data_dir
    loaded: list[DemoTables] = []
    lock = asyncio.Lock()
    experiment = settings.experiment

    async def tables() -> DemoTables:
        async with lock:
            if not loaded:
                loaded.append(
                    await asyncio.to_thread(
                        DemoTables.load,
                        demo.catalog_file(data_dir),
                        demo.users_file(data_dir),
                        demo.max_users,
                    )
                )
        return loaded[0]

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
        q: Annotated[str, QueryParam(max_length=64, description="search text")] = "",
        category: Annotated[str | None, QueryParam(max_length=MAX_ID_LENGTH)] = None,
        offset: Annotated[int, QueryParam(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, QueryParam(ge=1, le=MAX_PAGE)] = 60,
    ) -> Any:
        """The demo catalog (title, category, price), searchable and filtered by category, paged
        (a search counts at most its first matches: see `total_capped`)."""
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
