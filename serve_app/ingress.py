"""Ingress deployment (FastAPI): validation, request ids, auth, error shapes, OpenAPI. Thin.

`create_api(backend, config)` builds the HTTP API over a `Backend` (in the graph: the replica's Router,
which calls the stage deployments, and the EventWriter handle); every error is
`{"error": {"code", "message", "field"}}` with a 4xx, or a 503 when a dependency is down or
overloaded, never a stack trace nor an exception's text. Routes: POST /v1/recommendations,
POST /v1/events, GET /v1/experiments, GET /healthz, GET /readyz, GET /docs, POST /v1/admin/reload.
With `api.auth.enabled`, `serve_app.access.Guard` checks every request's API key and scope first
(docs/security.md: the scope of each route).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Header, Request
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve_app.access import Access, Guard, caller_key, document_keys, route_path
from serve_app.auth import ApiKey
from serve_app.config import ApiConfig, ExperimentConfig, ServeSettings, StageConfig
from serve_app.demo import DemoSource, mount_demo
from serve_app.deployments.group import GroupClient, GroupHost, LocalGroup, RemoteGroup
from serve_app.errors import (
    BadRequest,
    EventsUnavailable,
    FeatureStoreUnavailable,
    ModelUnavailable,
    Overloaded,
    RecserveError,
    SpoolFull,
    StageUnavailable,
)
from serve_app.event_writer import EventWriteSummary
from serve_app.experiments import assign_variant
from serve_app.http_errors import ErrorResponse, error_response
from serve_app.metrics import RequestMetrics
from serve_app.models import SwapOutcome
from serve_app.placement import resolve_placement
from serve_app.router import Readiness, Router, is_unavailable, root_cause
from serve_app.schemas import ID_PATTERN, MAX_ID_LENGTH, Event, is_safe_id
from serve_app.stages.explain import ExplainTrace
from serve_app.stages.records import Filters, Query, Recommendations

logger = logging.getLogger(__name__)

SafeId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN.pattern),
]
Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
_JSON = re.compile(r"^application/([a-z0-9.+-]*\+)?json\b", re.IGNORECASE)


# --- the API's records ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecommendationContext(_Strict):
    """Where the request comes from; `segment` (a catalog category) steers cold-start popularity."""

    device: str | None = Field(None, max_length=32)
    page: str | None = Field(None, max_length=MAX_ID_LENGTH)
    segment: Label | None = None


class RecommendationFilters(_Strict):
    exclude_item_ids: list[SafeId] = Field(default_factory=list, max_length=1_000)
    exclude_categories: list[Label] = Field(default_factory=list, max_length=200)
    categories: list[Label] = Field(
        default_factory=list, max_length=200, description="non-empty: only these categories"
    )


class RecommendationOptions(_Strict):
    """Ranking knobs of one request; `{"mmr_lambda": 1, "category_cap": false}` gives the ranker's
    own order (what the offline evaluation measured)."""

    mmr_lambda: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    category_cap: bool = Field(True, strict=True)


class RecommendationRequest(_Strict):
    user_id: SafeId
    k: int = Field(10, ge=1, le=200, strict=True)
    context: RecommendationContext | None = None
    filters: RecommendationFilters | None = None
    options: RecommendationOptions | None = None
    explain: bool = Field(
        False, strict=True, description="add a trace of how the list was made (bounded in size)"
    )


class RecommendedItemOut(BaseModel):
    item_id: str
    score: float
    rank: int
    source: Literal["retrieval", "collaborative", "popularity"]


class RecommendationResponse(BaseModel):
    request_id: str
    user_id: str
    variant: str
    model_version: str
    items: list[RecommendedItemOut]
    fallback: Literal["cold_start", "degraded", "model_missing"] | None
    debug: dict[str, Any] | None = Field(None, description="only with ?debug=1: stage timings")
    explain: ExplainTrace | None = Field(None, description="only with explain: true")


class EventsRequest(_Strict):
    events: list[Any] = Field(min_length=1, description="at most api.max_events_per_batch events")


class EventRejection(BaseModel):
    index: int
    error: str


class EventsResponse(BaseModel):
    accepted: int = Field(description="valid events taken: logged, retries, or spooled")
    rejected: list[EventRejection]
    spooled: int = Field(
        0,
        ge=0,
        description="of the accepted, events kept in the event writer's local spool because the "
        "event log was unavailable; replayed in order, deduplicated by event id, when it returns",
    )


# --- backend -------------------------------------------------------------------------------------


class Backend(Protocol):
    """What the API calls; in the graph the replica's Router and the EventWriter deployment."""

    async def recommend(self, query: Query) -> Recommendations: ...

    async def write_events(self, events: list[Event]) -> EventWriteSummary: ...

    async def readiness(self) -> Readiness: ...

    async def reload(self) -> SwapOutcome: ...

    async def experiments(self) -> dict[str, Any]: ...


class ServeBackend:
    """The Backend in the graph: the replica's own Router and the EventWriter deployment."""

    def __init__(self, router: Router, events: DeploymentHandle, timeout: float = 5.0) -> None:
        self._router = router
        self._events = events
        self._timeout = timeout

    async def recommend(self, query: Query) -> Recommendations:
        return await self._router.recommend(query)

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        """The EventWriter's summary; EventsUnavailable when its replica is dead, restarting (the
        handle would queue the batch until one is back) or takes longer than `timeout`."""
        # The served versions ride along: each user's delta is built in their variant's space.
        served = self._router.served_versions()
        try:
            result: EventWriteSummary = await asyncio.wait_for(
                self._events.write.remote(events, served), self._timeout
            )
        except TimeoutError as exc:
            raise EventsUnavailable("the event writer did not answer in time, retry") from exc
        except Exception as exc:
            if is_unavailable(exc):
                raise EventsUnavailable("the event writer is restarting, retry") from exc
            raise
        return result

    async def readiness(self) -> Readiness:
        return await self._router.readiness()

    async def reload(self) -> SwapOutcome:
        return await self._router.reload()

    async def experiments(self) -> dict[str, Any]:
        return await self._router.experiments()


# --- errors --------------------------------------------------------------------------------------


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str | None:
    """Dotted path of a validation error inside the body or query ("filters.categories.2")."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "header", "path"):
        parts = parts[1:]
    return ".".join(parts) or None


def validation_error(request: Request, errors: list[Any]) -> JSONResponse:
    """One JSON error for a RequestValidationError (its first error names the field)."""
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and content_type and not _JSON.match(content_type):
        return error_response(415, "unsupported_media_type", "send the body as application/json")
    first = errors[0] if errors else {}
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return error_response(400, "malformed_json", "the body is not valid JSON")
    loc = first.get("loc", ())
    field = field_path(loc)
    if kind == "missing" and field is None:
        return error_response(400, "missing_body", "a JSON body is required")
    return error_response(422, "invalid_request", str(first.get("msg", "invalid")), field)


# Routes the request metrics name (the others are health checks, docs and admin).
METERED_ROUTES = {"/v1/recommendations": "recommendations", "/v1/events": "events"}

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    400: "bad_request",
}


def http_error(exc: HTTPException) -> JSONResponse:
    """An HTTPException (Starlette's, or BodyLimit's while a body streams) in our error shape."""
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}) or None)


# What a client reads for an unavailable dependency: the error's own message may carry the text of
# an exception (a registry URI, a Redis address, a file path), so it goes to the log instead.
PUBLIC_MESSAGES = {
    ModelUnavailable.code: "no model version is loaded to answer this request, retry",
    FeatureStoreUnavailable.code: "a data store this request needs is unavailable, retry",
    SpoolFull.code: "the event log is unavailable and the local spool cannot take this batch: "
    "nothing was accepted, retry it after Retry-After seconds",
    EventsUnavailable.code: "the event writer is restarting: retry the batch after Retry-After "
    "seconds (events carrying an event_id are counted once)",
}


def _public_message(cause: RecserveError) -> str:
    if isinstance(cause, StageUnavailable):
        return cause.message  # names the stage only
    logger.info("%s: %s", cause.code, cause.message)  # per request: not a warning
    return PUBLIC_MESSAGES.get(cause.code, "the service cannot answer this request now, retry")


def _backend_error(exc: BaseException) -> JSONResponse:
    """Errors of the graph as responses; anything unexpected is logged and answered without trace."""
    cause = root_cause(exc)
    if isinstance(cause, BackPressureError | Overloaded):
        return error_response(
            503, "overloaded", "too many requests in flight, retry", headers={"Retry-After": "1"}
        )
    if isinstance(cause, BadRequest):
        return error_response(400, cause.code, cause.message, cause.field)
    if isinstance(cause, SpoolFull):
        retry = str(cause.retry_after_seconds)
        message = _public_message(cause)
        return error_response(503, cause.code, message, headers={"Retry-After": retry})
    if isinstance(
        cause, FeatureStoreUnavailable | ModelUnavailable | StageUnavailable | EventsUnavailable
    ):
        message = _public_message(cause)
        return error_response(503, cause.code, message, headers={"Retry-After": "1"})
    if isinstance(cause, RecserveError):
        return error_response(503, cause.code, _public_message(cause))
    if isinstance(cause, asyncio.TimeoutError | TimeoutError):
        return error_response(
            503, "timeout", "the request took too long, retry", headers={"Retry-After": "1"}
        )
    if is_unavailable(exc):  # a dead replica no caller turned into one of ours
        return error_response(
            503,
            "unavailable",
            "a part of the graph is restarting, retry",
            headers={"Retry-After": "1"},
        )
    logger.error("unexpected error", exc_info=cause)
    return error_response(500, "internal_error", "internal error")


# --- body size -----------------------------------------------------------------------------------


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before it is parsed (declared length) or
    as soon as the streamed bytes exceed it (no or lying Content-Length)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions met while reading the body: answered 413.
                    raise HTTPException(413, f"body larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "body_too_large", f"body larger than {self.max_bytes} bytes")
        await response(scope, receive, send)


# --- the hot route ------------------------------------------------------------------------------

Answer = Callable[["RecommendationRequest", str, bool, ApiKey | None], Awaitable[JSONResponse]]


class HotRoute:
    """ASGI middleware: `POST /v1/recommendations` answered without FastAPI's routing, dependency
    solving and exception middlewares, which cost the Ingress more CPU per request than its own
    work (issue 14). The answer is the route's own (`answer`, shared with the FastAPI route), so
    only how the body is read differs.

    It takes only what the route would accept as is: a JSON body with a Content-Length, no query
    string, that validates as a `RecommendationRequest`. Anything else (?debug=1, a chunked or
    non-JSON body, an invalid field) goes to the FastAPI route with the body replayed, so every
    error shape, status and the OpenAPI docs stay the route's. It sits behind the `Guard`: the
    caller's key (scope `recommend` checked) reaches `answer`, which checks `explain`'s.
    """

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], path: str, answer: Answer
    ) -> None:
        self.app = app
        self.path = path
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or route_path(scope) != self.path
            or scope.get("query_string")
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if b"content-length" not in headers or not _JSON.match(content_type):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before its body arrived: nobody to answer
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except HTTPException as exc:  # BodyLimit: more bytes than the limit
            await http_error(exc)(scope, receive, send)
            return
        body = b"".join(chunks)
        try:
            request = RecommendationRequest.model_validate_json(body)
        except ValidationError:
            await self.app(scope, _replay(body, receive), send)
            return
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        response = await self.answer(request, safe_request_id(given), False, caller_key(scope))
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once (already read), then whatever comes next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --- the API -------------------------------------------------------------------------------------


def to_query(body: RecommendationRequest, request_id: str) -> Query:
    filters = body.filters or RecommendationFilters()
    options = body.options or RecommendationOptions()
    return Query(
        request_id=request_id,
        user_id=body.user_id,
        k=body.k,
        filters=Filters(
            exclude_item_ids=frozenset(filters.exclude_item_ids),
            exclude_categories=frozenset(filters.exclude_categories),
            categories=frozenset(filters.categories),
        ),
        segment=body.context.segment if body.context else None,
        mmr_lambda=options.mmr_lambda,
        category_cap=options.category_cap,
        explain=body.explain,
    )


def to_response(result: Recommendations, debug: bool, total_ms: float) -> RecommendationResponse:
    return RecommendationResponse(
        request_id=result.request_id,
        user_id=result.user_id,
        variant=result.variant,
        model_version=result.model_version,
        items=[RecommendedItemOut(**asdict(item)) for item in result.items],
        fallback=result.fallback,
        debug=(
            {"timings_ms": dict(result.timings), "ingress_total_ms": round(total_ms, 3)}
            if debug
            else None
        ),
        explain=result.trace,
    )


def request_id_of(request: Request) -> str:
    """The caller's X-Request-ID when it is a safe id, else a fresh one."""
    return safe_request_id(request.headers.get("x-request-id", ""))


def safe_request_id(given: str) -> str:
    if is_safe_id(given):
        return given
    return uuid.uuid4().hex


def event_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"field '{event_field(exc) or '<event>'}': {first['msg']}"


def event_field(exc: ValidationError) -> str:
    """The dotted field of an event's first validation error ("" for the event itself)."""
    return ".".join(str(p) for p in exc.errors()[0]["loc"])


def _documented(texts: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: each status with our error body and its description."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in texts.items()}


ERRORS = _documented(
    {
        400: "malformed JSON or missing body",
        413: "body larger than api.max_body_bytes",
        415: "body is not application/json",
        422: "invalid field (named in error.field)",
        503: "a dependency is down or overloaded, or (events) the event writer is restarting "
        "(events_unavailable) or Redis is down and the event spool is full: retry after the "
        "Retry-After header's seconds",
    }
)
# With api.auth.enabled (docs/security.md), on every route but /healthz and /readyz.
AUTH_ERRORS = _documented(
    {
        401: "no API key, or an unknown one (api.auth.enabled): WWW-Authenticate: Bearer",
        403: "the API key lacks the route's scope (named in the message), or explain is off",
        429: "the API key's rate limit (api.rate_limit): retry after Retry-After seconds",
    }
)


def create_api(
    backend: Backend,
    config: ApiConfig,
    metrics: RequestMetrics | None = None,
    experiment: ExperimentConfig | None = None,
    access: Access | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    """The HTTP API over `backend` (FastAPI app with /docs); `access`: its access control (default:
    from `config`, with the real clock); `clock`: the time event timestamps are checked against
    (`config.event_window`)."""
    experiment = experiment or ExperimentConfig()
    access = access or Access(config, metrics)
    errors = {**ERRORS, **AUTH_ERRORS} if access.enabled else ERRORS
    app = FastAPI(
        title="recserve",
        version="1",
        description="Real-time recommendations: two-tower retrieval, XGBoost ranking, re-ranking.",
    )
    if metrics is not None:
        metrics.start(name for name, _ in experiment.weights)

    def observe(route: str, status: int, start: float) -> None:
        if metrics is not None:
            metrics.observe(route, status, (time.perf_counter() - start) * 1000.0)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        response = validation_error(request, list(exc.errors()))
        route = METERED_ROUTES.get(request.url.path)
        if metrics is not None and route is not None:
            metrics.counted(route, response.status_code)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return http_error(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _backend_error(exc)

    @app.post(
        "/v1/recommendations",
        response_model=RecommendationResponse,
        response_model_exclude_none=True,
        responses=errors,
    )
    async def recommend(
        body: RecommendationRequest,
        request: Request,
        debug: Annotated[
            bool, QueryParam(description="add stage timings (scope debug with auth on)")
        ] = False,
    ) -> Any:
        return await answer(body, request_id_of(request), debug, caller_key(request.scope))

    async def answer(
        body: RecommendationRequest, request_id: str, debug: bool, key: ApiKey | None
    ) -> JSONResponse:
        """The recommendation route's answer (HotRoute calls it too, for the common request);
        `key`: the caller's, checked by the Guard for the route (None with auth off)."""
        start = time.perf_counter()
        if body.explain:
            refusal = access.explain_refusal(key)
            if refusal is not None:
                observe("recommendations", refusal.status_code, start)
                return refusal
        if body.k > config.max_k:
            observe("recommendations", 422, start)
            return error_response(422, "invalid_request", f"k must be <= {config.max_k}", "k")
        query = to_query(body, request_id)
        try:
            result = await asyncio.wait_for(
                backend.recommend(query), timeout=config.request_timeout_seconds
            )
        except Exception as exc:
            response = _backend_error(exc)
            if metrics is not None and isinstance(root_cause(exc), ModelUnavailable):
                variant = assign_variant(experiment.salt, query.user_id, experiment.weights)
                metrics.fallback("model_missing", variant)
            observe("recommendations", response.status_code, start)
            return response
        if metrics is not None:
            metrics.served(result.variant, len(result.items), result.fallback)
        observe("recommendations", 200, start)
        out = to_response(result, debug, (time.perf_counter() - start) * 1000.0)
        return JSONResponse(
            out.model_dump(exclude_none=True, mode="json") | {"fallback": out.fallback},
            headers={"X-Request-ID": query.request_id},
        )

    @app.post("/v1/events", status_code=202, response_model=EventsResponse, responses=errors)
    async def events(body: EventsRequest) -> Any:
        start = time.perf_counter()
        if len(body.events) > config.max_events_per_batch:
            if metrics is not None:
                metrics.events({}, {"too_many_events": len(body.events)})
            observe("events", 422, start)
            return error_response(
                422,
                "too_many_events",
                f"at most {config.max_events_per_batch} events per request",
                "events",
            )
        valid: list[Event] = []
        rejected: list[EventRejection] = []
        reasons: Counter[str] = Counter()
        first_field: str | None = None
        window = config.event_window.context(clock())
        for index, raw in enumerate(body.events):
            try:
                valid.append(Event.model_validate(raw, context=window))
            except ValidationError as exc:
                rejected.append(EventRejection(index=index, error=event_error(exc)))
                reasons[str(exc.errors()[0]["type"])] += 1  # pydantic's error types: a closed set
                if first_field is None:
                    first_field = ".".join(("events", str(index), event_field(exc))).rstrip(".")
        if not valid:  # nothing to take: the first bad field, as any other invalid body
            if metrics is not None:
                metrics.events({}, reasons)
            observe("events", 422, start)
            message = f"no valid event; events[{rejected[0].index}]: {rejected[0].error}"
            return error_response(422, "invalid_events", message, first_field)
        duplicates, clicks, attributed, spooled = 0, {}, {}, 0
        if valid:
            try:
                summary = await backend.write_events(valid)
            except Exception as exc:
                response = _backend_error(exc)
                if metrics is not None:
                    full = isinstance(root_cause(exc), SpoolFull)
                    reason = "spool_full" if full else "unavailable"
                    metrics.events({}, reasons + Counter({reason: len(valid)}))
                observe("events", response.status_code, start)
                return response
            duplicates, clicks, attributed = summary.duplicates, summary.clicks, summary.attributed
            spooled = summary.spooled
        if metrics is not None:
            accepted = Counter(e.event_type.value for e in valid)
            metrics.events(accepted, reasons, duplicates, clicks, attributed)
        observe("events", 202, start)
        return EventsResponse(accepted=len(valid), rejected=rejected, spooled=spooled)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            state = await asyncio.wait_for(backend.readiness(), timeout=2.0)
        except Exception as exc:
            # Open to anyone: what failed goes to the log, not into the answer.
            logger.warning("readiness unavailable: %r", root_cause(exc))
            return JSONResponse({"ready": False, "error": "router unavailable"}, status_code=503)
        return JSONResponse(asdict(state), status_code=200 if state.ready else 503)

    @app.get("/v1/experiments", responses=errors if access.enabled else None)
    async def experiments() -> Any:
        """The A/B split (variants, weights, served versions), live per-variant counts with CTR and
        its 95% Wilson interval (CTR = served lists with a click / served lists), and the shadow."""
        try:
            report = await asyncio.wait_for(
                backend.experiments(), timeout=config.request_timeout_seconds
            )
        except Exception as exc:
            return _backend_error(exc)
        return report

    @app.post(
        "/v1/admin/reload",
        responses=AUTH_ERRORS
        if access.enabled
        else {
            401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key"},
            403: {"model": ErrorResponse, "description": "no admin key configured"},
        },
    )
    async def reload(x_api_key: Annotated[str | None, Header()] = None) -> Any:
        """Re-resolve the served alias now. Auth on: a key with scope admin (api.admin_api_key
        is one); auth off: api.admin_api_key in X-API-Key."""
        if not access.enabled:  # on, the Guard has checked the admin scope
            expected = config.admin_api_key
            if expected is None:
                return error_response(403, "admin_disabled", "no admin API key is configured")
            if x_api_key is None or not hmac.compare_digest(
                x_api_key.encode(), expected.get_secret_value().encode()
            ):
                return error_response(
                    401, "unauthorized", "missing or wrong X-API-Key", "X-API-Key"
                )
        try:
            outcome = await backend.reload()
        except Exception as exc:
            return _backend_error(exc)
        return asdict(outcome)

    # The last added is the outermost: the Guard sees every request first (a refused one is not
    # read), then BodyLimit, then HotRoute.
    app.add_middleware(HotRoute, path="/v1/recommendations", answer=answer)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(Guard, access=access)
    if access.enabled:
        document_keys(app)
    return app


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP edge. `groups`: the handles of the placement's stage deployments, in chain order;
    a group placed in the Ingress itself (`fused`) is built here, its stages function calls.

    The constructor is async: it returns once the Router's first alias checks have finished
    (`Router.first_checks`, at most `models.warm_timeout_seconds`), so Serve routes no request to
    a replica that would answer 503 while its first version loads (at start, scale-up, restart),
    and once the demo's tables are loaded (`DemoSource.preload`: seconds at a million items)."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self, settings: ServeSettings, events: DeploymentHandle, *groups: DeploymentHandle
    ) -> None:
        handles = iter(groups)
        clients: list[GroupClient] = []
        for group in resolve_placement(settings.placement):
            if group.in_ingress:
                clients.append(LocalGroup(group, GroupHost(settings, group.stages)))
            else:
                clients.append(RemoteGroup(group, next(handles)))
        self._router = router = Router(settings, clients)
        self._backend = ServeBackend(router, events, settings.api.events_timeout_seconds)
        self._config = settings.api
        self._experiment = settings.experiment
        self._settings = settings
        self._demo = DemoSource(settings)
        await asyncio.gather(
            router.first_checks(settings.models.warm_timeout_seconds), self._demo.preload()
        )

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Ray Serve `user_config` (a `StageConfig`): how requests are grouped before the first hop
        and how many may wait (beyond: 503 overloaded at once); its ranking overrides reach the
        stages the Ingress hosts (`fused`)."""
        config = StageConfig.model_validate(user_config or {})
        self._router.configure(config.batching, user_config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        metrics = RequestMetrics()
        app = create_api(self._backend, self._config, metrics, self._experiment)
        mount_demo(app, self._backend, self._settings, metrics, self._demo)
        return app
