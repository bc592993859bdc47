"""The HTTP API's contract without Ray: validation, error shapes and status codes, response shape.

`create_api` runs under FastAPI's TestClient over two small Backend implementations: one that must never
be reached (every bad input is refused before the graph) and one answering a fixed, hand-made result.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from serve_app.config import ApiConfig
from serve_app.errors import FeatureStoreUnavailable, ModelUnavailable, SpoolFull
from serve_app.event_writer import EventWriteSummary
from serve_app.ingress import ServeBackend, create_api
from serve_app.metrics import RequestMetrics
from serve_app.models import SwapOutcome
from serve_app.router import Readiness, ServedVersions
from serve_app.schemas import Event
from serve_app.stages.records import Query, Recommendations, RecommendedItem

RESULT = Recommendations(
    request_id="",
    user_id="u1",
    variant="champion",
    model_version="3",
    items=(
        RecommendedItem("i9", 2.5, 1, "retrieval"),
        RecommendedItem("i4", 1.0, 2, "popularity"),
    ),
    fallback=None,
    timings=(("user_tower", 1.5), ("graph", 4.0)),
)


class Unreachable:
    """A backend the API must not call: the request should have been refused before."""

    async def recommend(self, query: Query) -> Recommendations:
        raise AssertionError(f"invalid request reached the graph: {query}")

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        raise AssertionError(f"invalid events reached the writer: {events}")

    async def readiness(self) -> Readiness:
        return Readiness(False, None, "models:/recserve@champion", None, "no alias")

    async def reload(self) -> SwapOutcome:
        return SwapOutcome("3", "4", True)


class Fixed(Unreachable):
    """Answers RESULT (for the user asked) and records what reached it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.queries: list[Query] = []
        self.events: list[Event] = []
        self.error = error

    async def recommend(self, query: Query) -> Recommendations:
        if self.error is not None:
            raise self.error
        self.queries.append(query)
        return Recommendations(**{**RESULT.__dict__, "request_id": query.request_id})

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        if self.error is not None:
            raise self.error
        self.events.extend(events)
        return EventWriteSummary(written=len(events), duplicates=0)


def client(backend: Any, **config: Any) -> TestClient:
    # With the real metrics: recording a request must never be what fails it.
    api = create_api(backend, ApiConfig(**config), RequestMetrics())
    return TestClient(api, raise_server_exceptions=False)


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert "Traceback" not in response.text


BAD_RECOMMENDATION_BODIES = [
    ({"user_id": 5}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "has space"}, "user_id"),
    ({"user_id": "x" * 129}, "user_id"),
    ({"user_id": "été"}, "user_id"),
    ({}, "user_id"),
    ({"user_id": "u1", "k": 0}, "k"),
    ({"user_id": "u1", "k": 201}, "k"),
    ({"user_id": "u1", "k": -3}, "k"),
    ({"user_id": "u1", "k": "10"}, "k"),
    ({"user_id": "u1", "k": 2.5}, "k"),
    ({"user_id": "u1", "k": True}, "k"),
    ({"user_id": "u1", "colour": "red"}, "colour"),
    (
        {"user_id": "u1", "filters": {"exclude_item_ids": ["ok", "not ok"]}},
        "filters.exclude_item_ids.1",
    ),
    ({"user_id": "u1", "filters": {"brands": ["x"]}}, "filters.brands"),
    ({"user_id": "u1", "filters": "none"}, "filters"),
    ({"user_id": "u1", "options": {"mmr_lambda": 1.5}}, "options.mmr_lambda"),
    ({"user_id": "u1", "context": {"device": "d" * 33}}, "context.device"),
]


@pytest.mark.parametrize(("body", "field"), BAD_RECOMMENDATION_BODIES)
def test_invalid_recommendation_requests_get_422_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    response = client(Unreachable()).post("/v1/recommendations", json=body)
    assert_error(response, 422, "invalid_request", field)


def test_malformed_json_empty_body_and_wrong_media_type_are_refused() -> None:
    api = client(Unreachable())
    headers = {"Content-Type": "application/json"}
    assert_error(
        api.post("/v1/recommendations", content=b'{"user_id": "u1",', headers=headers),
        400,
        "malformed_json",
    )
    assert_error(api.post("/v1/recommendations", content=b"", headers=headers), 400, "missing_body")
    assert_error(
        api.post("/v1/recommendations", content=b"[1, 2]", headers=headers), 422, "invalid_request"
    )
    assert_error(
        api.post(
            "/v1/recommendations",
            content=b"user_id=u1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        415,
        "unsupported_media_type",
    )


def test_bodies_over_the_limit_get_413_with_or_without_a_declared_length() -> None:
    api = client(Unreachable(), max_body_bytes=2_048)
    big = json.dumps({"user_id": "u1", "filters": {"exclude_item_ids": ["i1"] * 600}}).encode()
    assert len(big) > 2_048
    declared = api.post(
        "/v1/recommendations", content=big, headers={"Content-Type": "application/json"}
    )
    assert_error(declared, 413, "body_too_large")

    def chunks() -> Any:  # streamed: no Content-Length, the limit applies to the bytes read
        for start in range(0, len(big), 512):
            yield big[start : start + 512]

    streamed = api.post(
        "/v1/recommendations", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in {k.lower() for k in streamed.request.headers}
    assert_error(streamed, 413, "body_too_large")
    default_limit = client(Unreachable()).post(
        "/v1/events",
        content=b'{"events": ["' + b"x" * (1 << 20) + b'"]}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(default_limit, 413, "body_too_large")


def test_unknown_routes_and_methods_get_json_errors() -> None:
    api = client(Unreachable())
    assert_error(api.get("/v1/nothing"), 404, "not_found")
    assert_error(api.get("/v1/recommendations"), 405, "method_not_allowed")


def test_a_valid_request_reaches_the_graph_and_gets_the_documented_shape() -> None:
    backend = Fixed()
    api = client(backend)
    response = api.post(
        "/v1/recommendations",
        json={
            "user_id": "u1",
            "k": 2,
            "context": {"segment": "books", "device": "ios"},
            "filters": {"exclude_categories": ["toys"], "exclude_item_ids": ["i7"]},
            "options": {"mmr_lambda": 1, "category_cap": False},
        },
        headers={"X-Request-ID": "req-42"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == "req-42"
    assert response.json() == {
        "request_id": "req-42",
        "user_id": "u1",
        "variant": "champion",
        "model_version": "3",
        "items": [
            {"item_id": "i9", "score": 2.5, "rank": 1, "source": "retrieval"},
            {"item_id": "i4", "score": 1.0, "rank": 2, "source": "popularity"},
        ],
        "fallback": None,
    }
    (query,) = backend.queries
    assert (query.user_id, query.k, query.segment, query.mmr_lambda, query.category_cap) == (
        "u1",
        2,
        "books",
        1.0,
        False,
    )
    assert query.filters.exclude_categories == frozenset({"toys"})
    assert query.filters.exclude_item_ids == frozenset({"i7"})
    debug = api.post("/v1/recommendations?debug=1", json={"user_id": "u1"}).json()
    assert debug["debug"]["timings_ms"] == {"user_tower": 1.5, "graph": 4.0}
    generated = api.post(
        "/v1/recommendations", json={"user_id": "u1"}, headers={"X-Request-ID": "bad id!"}
    )
    assert generated.json()["request_id"] != "bad id!" and len(generated.json()["request_id"]) == 32


def test_graph_failures_become_503_and_never_500_with_a_trace() -> None:
    assert_error(
        client(Fixed(ModelUnavailable("no version yet"))).post(
            "/v1/recommendations", json={"user_id": "u1"}
        ),
        503,
        "model_unavailable",
    )
    down = client(Fixed(FeatureStoreUnavailable("redis down"))).post(
        "/v1/events", json={"events": [{"user_id": "u1", "item_id": "i1", "event_type": "click"}]}
    )
    assert_error(down, 503, "feature_store_unavailable")
    assert down.headers["Retry-After"] == "1"
    crash = client(Fixed(ZeroDivisionError("boom"))).post(
        "/v1/recommendations", json={"user_id": "u1"}
    )
    assert_error(crash, 500, "internal_error")
    assert "boom" not in crash.text


def test_events_are_validated_one_by_one_and_valid_ones_written() -> None:
    backend = Fixed()
    response = client(backend).post(
        "/v1/events",
        json={
            "events": [
                {"user_id": "u1", "item_id": "i1", "event_type": "click"},
                {"user_id": "u1", "item_id": "i2", "event_type": "teleport"},
                {"user_id": "u 1", "item_id": "i3", "event_type": "view"},
                "not an object",
                {"user_id": "u2", "item_id": "i4", "event_type": "purchase", "position": 3},
            ]
        },
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 2
    assert [r["index"] for r in body["rejected"]] == [1, 2, 3]
    assert "event_type" in body["rejected"][0]["error"]
    assert "user_id" in body["rejected"][1]["error"]
    assert [(e.user_id, e.item_id) for e in backend.events] == [("u1", "i1"), ("u2", "i4")]


class Spooling(Fixed):
    """The event writer with Redis down: every event kept in its spool, one a retry it held."""

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        self.events.extend(events)
        return EventWriteSummary(written=0, duplicates=1, spooled=len(events) - 1)


def test_events_spooled_while_redis_is_down_are_accepted_with_the_count_spooled() -> None:
    event = {"user_id": "u1", "item_id": "i1", "event_type": "click"}
    response = client(Spooling()).post("/v1/events", json={"events": [event] * 3})
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3, "rejected": [], "spooled": 2}
    written = client(Fixed()).post("/v1/events", json={"events": [event]})
    assert written.json() == {"accepted": 1, "rejected": [], "spooled": 0}


def test_a_full_spool_is_a_503_with_the_configured_retry_after() -> None:
    full = SpoolFull("event spool full", retry_after_seconds=7)
    response = client(Fixed(full)).post(
        "/v1/events", json={"events": [{"user_id": "u1", "item_id": "i1", "event_type": "view"}]}
    )
    assert_error(response, 503, "event_spool_full")
    assert response.headers["Retry-After"] == "7"


def test_the_openapi_document_types_the_spooled_count() -> None:
    schemas = client(Unreachable()).get("/openapi.json").json()["components"]["schemas"]
    spooled = schemas["EventsResponse"]["properties"]["spooled"]
    assert spooled["type"] == "integer" and spooled["minimum"] == 0
    assert "spool" in spooled["description"]


def test_a_spool_full_error_keeps_its_retry_after_across_pickling() -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(SpoolFull("full", retry_after_seconds=9)))
    assert isinstance(copy, SpoolFull) and copy.retry_after_seconds == 9
    assert copy.message == "full"


def test_event_batches_over_the_limit_empty_or_misshapen_get_422() -> None:
    api = client(Unreachable(), max_events_per_batch=3)
    event = {"user_id": "u1", "item_id": "i1", "event_type": "click"}
    assert_error(
        api.post("/v1/events", json={"events": [event] * 4}), 422, "too_many_events", "events"
    )
    assert_error(api.post("/v1/events", json={"events": []}), 422, "invalid_request", "events")
    assert_error(api.post("/v1/events", json={"events": event}), 422, "invalid_request", "events")
    assert_error(
        api.post("/v1/events", json={"events": [event], "source": "x"}),
        422,
        "invalid_request",
        "source",
    )
    assert client(Fixed()).post("/v1/events", json={"events": [event] * 1_000}).status_code == 202
    assert_error(
        client(Unreachable()).post("/v1/events", json={"events": [event] * 1_001}),
        422,
        "too_many_events",
        "events",
    )


def test_admin_reload_needs_the_configured_key() -> None:
    assert_error(client(Unreachable()).post("/v1/admin/reload"), 403, "admin_disabled")
    api = client(Unreachable(), admin_api_key="s3cret")
    assert_error(api.post("/v1/admin/reload"), 401, "unauthorized", "X-API-Key")
    assert_error(
        api.post("/v1/admin/reload", headers={"X-API-Key": "guess"}),
        401,
        "unauthorized",
        "X-API-Key",
    )
    ok = api.post("/v1/admin/reload", headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200
    assert ok.json() == {"previous": "3", "current": "4", "changed": True, "error": None}


def test_health_readiness_and_docs() -> None:
    api = client(Unreachable())
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/recommendations", "/v1/events", "/healthz", "/readyz", "/v1/admin/reload"} <= set(
        paths
    )


# --- the hot route: the common request without FastAPI's routing ---------------------------------


class Inner:
    """The app behind HotRoute (the FastAPI route in the Ingress): records the bodies it gets."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})


def hot_route() -> tuple[TestClient, Inner, list[tuple[Any, str, bool]]]:
    from fastapi.responses import JSONResponse

    from serve_app.ingress import HotRoute

    answered: list[tuple[Any, str, bool]] = []

    async def answer(request: Any, request_id: str, debug: bool, key: Any) -> JSONResponse:
        assert key is None  # no Guard in front: no key checked
        answered.append((request, request_id, debug))
        return JSONResponse({"answered": request.user_id})

    inner = Inner()
    app = HotRoute(inner, "/v1/recommendations", answer)
    return TestClient(app), inner, answered


def test_a_valid_request_is_answered_by_the_hot_route_without_the_route_behind_it() -> None:
    http, inner, answered = hot_route()
    body = {"user_id": "u1", "k": 5, "filters": {"categories": ["c1"]}}
    response = http.post("/v1/recommendations", json=body, headers={"X-Request-ID": "req-7"})
    assert response.status_code == 200 and response.json() == {"answered": "u1"}
    assert inner.bodies == []
    ((request, request_id, debug),) = answered
    assert (request.user_id, request.k, request.filters.categories) == ("u1", 5, ["c1"])
    assert (request_id, debug) == ("req-7", False)
    # An unsafe request id is replaced by a fresh one, as the route does.
    http.post("/v1/recommendations", json=body, headers={"X-Request-ID": "bad id!"})
    assert answered[-1][1] != "bad id!" and len(answered[-1][1]) == 32


@pytest.mark.parametrize(
    ("path", "content", "content_type"),
    [
        ("/v1/recommendations", b'{"user_id": "u1", "k": 0}', "application/json"),  # invalid
        ("/v1/recommendations", b'{"user_id": "u1", "k": 10.0}', "application/json"),  # strict
        ("/v1/recommendations", b'{"user_id": ', "application/json"),  # malformed
        ("/v1/recommendations", b"", "application/json"),  # no body
        ("/v1/recommendations?debug=1", b'{"user_id": "u1"}', "application/json"),  # query
        ("/v1/recommendations", b'{"user_id": "u1"}', "text/plain"),  # not JSON
        ("/v1/events", b'{"user_id": "u1"}', "application/json"),  # another route
    ],
)
def test_anything_but_a_valid_plain_request_goes_to_the_route_with_its_body(
    path: str, content: bytes, content_type: str
) -> None:
    http, inner, answered = hot_route()
    response = http.post(path, content=content, headers={"content-type": content_type})
    assert response.status_code == 299 and response.content == b"inner"
    assert inner.bodies == [content] and answered == []


def test_the_hot_route_and_the_fastapi_route_give_the_same_answer() -> None:
    backend = Fixed()
    http = client(backend)
    body = {"user_id": "u1", "k": 2, "options": {"mmr_lambda": 1, "category_cap": False}}
    headers = {"X-Request-ID": "same-id"}
    hot = http.post("/v1/recommendations", json=body, headers=headers)
    # A query string takes the FastAPI route (debug=false: the same answer, no timings).
    routed = http.post("/v1/recommendations?debug=false", json=body, headers=headers)
    assert hot.status_code == routed.status_code == 200
    assert hot.json() == routed.json()
    assert hot.headers["x-request-id"] == routed.headers["x-request-id"] == "same-id"
    assert hot.headers["content-type"] == routed.headers["content-type"]
    assert backend.queries[0] == backend.queries[1]
    # k above api.max_k: the same 422 naming the field on both paths.
    too_many = {"user_id": "u1", "k": 150}
    hot_error = client(Unreachable(), max_k=100).post("/v1/recommendations", json=too_many)
    routed_error = client(Unreachable(), max_k=100).post(
        "/v1/recommendations?debug=0", json=too_many
    )
    assert hot_error.status_code == routed_error.status_code == 422
    assert hot_error.json() == routed_error.json()
    assert hot_error.json()["error"]["field"] == "k"


# --- events that cannot hurt (issue 29.3) ----------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CLICK = {"user_id": "u1", "item_id": "i1", "event_type": "click"}


def clocked(backend: Any, **config: Any) -> TestClient:
    """The API with its clock fixed at NOW: the event window is worked out from it by hand."""
    api = create_api(backend, ApiConfig(**config), RequestMetrics(), clock=lambda: NOW)
    return TestClient(api, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": "0001-01-01T00:00:00Z"}, "timestamp"),
        ({"timestamp": "9999-12-31T23:59:59Z"}, "timestamp"),
        ({"timestamp": "2026-05-25T11:59:59Z"}, "timestamp"),  # NOW - 7 days - 1 s
        ({"timestamp": "2026-06-01T12:05:01Z"}, "timestamp"),  # NOW + 5 min + 1 s
        ({"user_id": "u1\n"}, "user_id"),
        ({"item_id": "i1\n"}, "item_id"),
        ({"event_id": "e1\n"}, "event_id"),
        ({"request_id": "r\x00"}, "request_id"),
        ({"session_id": "s\x1b"}, "session_id"),
    ],
)
def test_a_bad_timestamp_or_id_gets_422_naming_the_field(
    change: dict[str, str], field: str
) -> None:
    response = clocked(Unreachable()).post("/v1/events", json={"events": [{**CLICK, **change}]})
    assert_error(response, 422, "invalid_events", f"events.0.{field}")


def test_in_a_mixed_batch_the_bad_events_are_rejected_by_field_and_the_rest_written() -> None:
    backend = Fixed()
    inside = {**CLICK, "timestamp": "2026-05-25T12:00:00Z"}  # NOW - 7 days exactly: accepted
    response = clocked(backend).post(
        "/v1/events",
        json={"events": [inside, {**CLICK, "timestamp": "9999-01-01T00:00:00Z"}, CLICK]},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == 2
    assert [r["index"] for r in body["rejected"]] == [1]
    assert body["rejected"][0]["error"].startswith("field 'timestamp'")
    assert len(backend.events) == 2


def test_the_window_follows_the_configured_ages() -> None:
    day_old = {**CLICK, "timestamp": "2026-05-31T12:00:00Z"}
    assert clocked(Fixed()).post("/v1/events", json={"events": [day_old]}).status_code == 202
    short = clocked(Unreachable(), event_max_age_seconds=3_600)
    assert_error(
        short.post("/v1/events", json={"events": [day_old]}),
        422,
        "invalid_events",
        "events.0.timestamp",
    )


def test_a_recommendation_user_id_with_a_trailing_newline_is_refused() -> None:
    for user in ("u1\n", "u1\r", "u\x00"):
        response = client(Unreachable()).post("/v1/recommendations", json={"user_id": user})
        assert_error(response, 422, "invalid_request", "user_id")


@pytest.mark.parametrize(
    "error",
    [
        ActorDiedError(),
        ActorUnavailableError("restarting", None),
        RayActorError(),
        DeploymentUnavailableError(DeploymentID(name="EventWriter", app_name="recserve")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_dead_event_writer_is_a_503_with_retry_after_never_a_500(error: Exception) -> None:
    backend = ServeBackend(Versions(), RaisingHandle(error), timeout=5.0)  # type: ignore[arg-type]
    response = client(backend).post("/v1/events", json={"events": [CLICK]})
    assert_error(response, 503, "events_unavailable")
    assert response.headers["Retry-After"] == "1"


def test_an_event_writer_that_does_not_answer_in_time_is_a_503_with_retry_after() -> None:
    backend = ServeBackend(Versions(), HangingHandle(), timeout=0.05)  # type: ignore[arg-type]
    response = client(backend).post("/v1/events", json={"events": [CLICK]})
    assert_error(response, 503, "events_unavailable")
    assert response.headers["Retry-After"] == "1"


def test_a_bug_in_the_event_writer_stays_a_500_without_its_text() -> None:
    backend = ServeBackend(Versions(), RaisingHandle(KeyError("x")), timeout=5.0)  # type: ignore[arg-type]
    response = client(backend).post("/v1/events", json={"events": [CLICK]})
    assert_error(response, 500, "internal_error")


class Versions:
    """The Router's part ServeBackend.write_events reads."""

    def served_versions(self) -> ServedVersions:
        return ServedVersions({}, "1")


class RaisingHandle:
    """An EventWriter handle whose call fails as Ray reports a dead or restarting replica."""

    def __init__(self, error: Exception) -> None:
        self.write = self
        self.error = error

    async def remote(self, events: list[Event], served: ServedVersions) -> EventWriteSummary:
        raise self.error


class HangingHandle(RaisingHandle):
    """A call queued for a replica that never comes back."""

    def __init__(self) -> None:
        super().__init__(AssertionError("unused"))

    async def remote(self, events: list[Event], served: ServedVersions) -> EventWriteSummary:
        await asyncio.Event().wait()
        raise AssertionError("never answered")
