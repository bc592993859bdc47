"""Access control of the HTTP API without Ray: `create_api` + `mount_demo` with auth on, over FastAPI's
TestClient, the pure stages answering in process (test_demo_api's backend).

Every route the app has is enumerated from the app itself and checked against the scope table below
(written from docs/security.md, not from `serve_app.auth`): 401 without a key or with an unknown one,
403 with a key lacking the scope, through with the right one. Then explain and ?debug=1 (scope debug),
explain turned off, the rate limit under a hand-driven clock, rotation, the admin key of the settings,
the refusal counters, and no exception text in any answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from serve_app.access import Access
from serve_app.auth import key_entry
from serve_app.config import ServeSettings
from serve_app.demo import mount_demo
from serve_app.errors import FeatureStoreUnavailable, ModelUnavailable
from serve_app.event_writer import EventWriteSummary
from serve_app.ingress import create_api
from serve_app.metrics import RequestMetrics
from serve_app.recommend import ServingModel
from serve_app.schemas import Event
from tests.unit.test_demo_api import InProcess, tables  # noqa: F401 (tables: a fixture)
from tests.unit.test_ingress import Fixed, assert_error
from tests.unit.test_recommend import make_model

KEYS = {
    "recommend": "k-recommend-000000001",
    "events": "k-events-0000000000002",
    "admin": "k-admin-00000000000003",
    "debug": "k-debug-00000000000004",
    "client": "k-client-0000000000005",  # recommend + events: what an application gets
    "analyst": "k-analyst-000000000006",  # recommend + debug
    "nothing": "k-nothing-000000000007",  # a valid key without scopes
}
SCOPES = {
    "recommend": ["recommend"],
    "events": ["events"],
    "admin": ["admin"],
    "debug": ["debug"],
    "client": ["recommend", "events"],
    "analyst": ["recommend", "debug"],
    "nothing": [],
}
ADMIN_SETTING = "admin-from-the-settings-8"

# docs/security.md's table: the scope each route needs (None: any valid key; "open": no key).
ROUTE_SCOPES: dict[tuple[str, str], str | None] = {
    ("POST", "/v1/recommendations"): "recommend",
    ("POST", "/v1/events"): "events",
    ("GET", "/v1/experiments"): "admin",
    ("POST", "/v1/admin/reload"): "admin",
    ("GET", "/demo"): "debug",
    ("GET", "/demo/ops"): "debug",
    ("GET", "/demo/static"): "debug",
    ("GET", "/v1/demo/catalog"): "debug",
    ("GET", "/v1/demo/items"): "debug",
    ("GET", "/v1/demo/users"): "debug",
    ("GET", "/v1/demo/users/{user_id}/vectors"): "debug",
    ("GET", "/v1/demo/stats"): "debug",
    ("GET", "/docs"): None,
    ("GET", "/docs/oauth2-redirect"): None,
    ("GET", "/redoc"): None,
    ("GET", "/openapi.json"): None,
    ("GET", "/healthz"): "open",
    ("GET", "/readyz"): "open",
}
CLICK = {"user_id": "u1", "item_id": "i03", "event_type": "click"}
BODIES = {
    "/v1/recommendations": {"user_id": "u1", "k": 3},
    "/v1/events": {"events": [CLICK]},
}
CONCRETE = {
    "/demo/static": "/demo/static/demo.js",
    "/v1/demo/items": "/v1/demo/items?ids=i01",
    "/v1/demo/users/{user_id}/vectors": "/v1/demo/users/u1/vectors",
}


class Backend(InProcess):
    """test_demo_api's in-process stages, an event writer that takes everything, experiments."""

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        return EventWriteSummary(written=len(events), duplicates=0)

    async def experiments(self) -> dict[str, Any]:
        return {"experiment": "default", "variants": []}


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Recording(RequestMetrics):
    """The real metrics, and a list of the refusals they counted."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[tuple[str, int, str]] = []
        self.file_errors = 0

    def refused(self, route: str, status: int, key: str) -> None:
        self.refusals.append((route, status, key))
        super().refused(route, status, key)

    def key_file_error(self, reason: str) -> None:
        self.file_errors += 1
        super().key_file_error(reason)


def write_keys(path: Path, names: list[str] | None = None) -> Path:
    entries = [key_entry(KEYS[n], n, SCOPES[n]) for n in (names or list(KEYS))]
    path.write_text(json.dumps({"keys": entries}))
    return path


class Api:
    """An app with auth on (keys file + an admin key in the settings) and its parts."""

    def __init__(self, backend: Any, data: Path, keys_file: Path, **api: Any) -> None:
        self.clock = Clock()
        self.metrics = Recording()
        self.settings = ServeSettings(
            feature_store={"data_dir": data},
            demo={"catalog_path": data / "catalog.parquet", "users_path": data / "users.parquet"},
            api={
                "auth": {"enabled": True, "keys_file": str(keys_file)},
                "admin_api_key": ADMIN_SETTING,
                **api,
            },
        )
        self.access = Access(self.settings.api, self.metrics, clock=self.clock)
        app = create_api(backend, self.settings.api, self.metrics, access=self.access)
        mount_demo(app, backend, self.settings, self.metrics)
        self.app = app
        self.http = TestClient(app, raise_server_exceptions=False)

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        body = BODIES.get(path.split("?")[0])
        if method == "POST" and body is not None and "json" not in kwargs:
            kwargs["json"] = body
        return self.http.request(method, path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return make_model()


@pytest.fixture
def api(model: ServingModel, tables: Path, tmp_path: Path) -> Api:  # noqa: F811
    return Api(Backend(model), tables, write_keys(tmp_path / "keys.json"))


def app_routes(api: Api) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in api.app.routes:
        if isinstance(route, Mount):
            found.add(("GET", route.path))
        elif isinstance(route, APIRoute | Route):  # Route: the docs pages FastAPI adds
            found.update((m, route.path) for m in route.methods or () if m != "HEAD")
    return found


def assert_refused(response: Any, status: int, code: str, field: str | None = None) -> None:
    assert_error(response, status, code, field)
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_every_route_is_in_the_scope_table(api: Api) -> None:
    assert app_routes(api) == set(ROUTE_SCOPES)


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_SCOPES))
def test_each_route_needs_a_key_with_its_scope(api: Api, method: str, path: str) -> None:
    needed = ROUTE_SCOPES[(method, path)]
    url = CONCRETE.get(path, path)
    if needed == "open":
        assert api.call(method, url).status_code in (200, 503)  # readyz: not ready, no key needed
        return
    assert_refused(api.call(method, url), 401, "unauthorized")
    assert_refused(api.call(method, url, "not-a-key-at-all-000"), 401, "unauthorized")
    if needed is None:  # any valid key, even one without scopes
        assert api.call(method, url, KEYS["nothing"]).status_code == 200
        return
    for name, scopes in SCOPES.items():
        response = api.call(method, url, KEYS[name])
        if needed in scopes:
            assert response.status_code not in (401, 403, 429), (name, response.text)
            assert response.status_code < 500, response.text
        else:
            assert_refused(response, 403, "forbidden")
            assert f"'{needed}'" in response.json()["error"]["message"]
            assert f'scope="{needed}"' in response.headers["WWW-Authenticate"]


def test_the_right_scope_gets_the_answer(api: Api) -> None:
    rec = api.call("POST", "/v1/recommendations", KEYS["client"])
    assert rec.status_code == 200 and len(rec.json()["items"]) == 3
    assert api.call("POST", "/v1/events", KEYS["client"]).status_code == 202
    reload = api.call("POST", "/v1/admin/reload", KEYS["admin"])
    assert reload.json() == {"previous": "3", "current": "4", "changed": True, "error": None}
    assert api.call("GET", "/v1/demo/users", KEYS["debug"]).json()["users"][0]["user_id"] == "heavy"
    # Both headers carry a key; X-API-Key as the admin route always took it.
    by_header = api.call("POST", "/v1/admin/reload", headers={"X-API-Key": KEYS["admin"]})
    assert by_header.status_code == 200


def test_an_unknown_path_needs_a_key_before_it_is_a_404(api: Api) -> None:
    assert_refused(api.call("GET", "/v2/nothing"), 401, "unauthorized")
    assert_refused(api.call("GET", "/v2/nothing", KEYS["nothing"]), 404, "not_found")


def test_explain_and_debug_timings_need_the_debug_scope_on_both_paths(api: Api) -> None:
    explain = {"user_id": "u1", "k": 3, "explain": True}
    # The hot route (plain JSON) and the FastAPI route (any query string) refuse alike.
    for path in ("/v1/recommendations", "/v1/recommendations?debug=0"):
        refused = api.call("POST", path, KEYS["client"], json=explain)
        assert_refused(refused, 403, "forbidden", "explain")
        assert "'debug'" in refused.json()["error"]["message"]
        allowed = api.call("POST", path, KEYS["analyst"], json=explain)
        assert (
            allowed.status_code == 200 and allowed.json()["explain"]["user"]["event_count"] == 6.0
        )
    assert_refused(
        api.call("POST", "/v1/recommendations?debug=1", KEYS["client"]), 403, "forbidden", "debug"
    )
    timed = api.call("POST", "/v1/recommendations?debug=1", KEYS["analyst"])
    assert timed.status_code == 200 and "timings_ms" in timed.json()["debug"]
    # debug alone is not recommend.
    assert_refused(
        api.call("POST", "/v1/recommendations", KEYS["debug"], json=explain), 403, "forbidden"
    )


def test_explain_turned_off_is_refused_to_every_key(
    model: ServingModel,
    tables: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    api = Api(Backend(model), tables, write_keys(tmp_path / "keys.json"), explain_enabled=False)
    explain = {"user_id": "u1", "k": 3, "explain": True}
    for path in ("/v1/recommendations", "/v1/recommendations?debug=0"):
        refused = api.call("POST", path, KEYS["analyst"], json=explain)
        assert_refused(refused, 403, "explain_disabled", "explain")
    assert_refused(
        api.call("GET", "/v1/demo/users/u1/vectors", KEYS["debug"]),
        403,
        "explain_disabled",
        "user_id",
    )
    assert api.call("POST", "/v1/recommendations", KEYS["client"]).status_code == 200
    # Off without auth too.
    settings = ServeSettings(api={"explain_enabled": False})
    http = TestClient(create_api(Backend(model), settings.api), raise_server_exceptions=False)
    assert_error(http.post("/v1/recommendations", json=explain), 403, "explain_disabled", "explain")


def test_a_key_over_its_rate_gets_429_with_retry_after(
    model: ServingModel,
    tables: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    api = Api(
        Backend(model),
        tables,
        write_keys(tmp_path / "keys.json"),
        rate_limit={"requests_per_second": 0.5, "burst": 2},
    )
    statuses = [
        api.call("POST", "/v1/recommendations", KEYS["client"]).status_code for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    limited = api.call("POST", "/v1/events", KEYS["client"])  # one bucket per key, every route
    assert_refused(limited, 429, "rate_limited")
    assert limited.headers["Retry-After"] == "2"  # a token every 2 s, the bucket empty
    # Another key has its own bucket; health checks take no token.
    assert api.call("POST", "/v1/recommendations", KEYS["analyst"]).status_code == 200
    assert all(api.call("GET", "/healthz").status_code == 200 for _ in range(5))
    api.clock.now += 1.5  # 0.75 of a token
    assert api.call("POST", "/v1/recommendations", KEYS["client"]).headers["Retry-After"] == "1"
    api.clock.now += 0.5
    assert api.call("POST", "/v1/recommendations", KEYS["client"]).status_code == 200
    # Refused requests (wrong scope) take no token: refused before the bucket.
    api.clock.now += 4.0  # full again: 2 tokens
    for _ in range(5):
        assert api.call("GET", "/v1/experiments", KEYS["client"]).status_code == 403
    assert [api.call("POST", "/v1/events", KEYS["client"]).status_code for _ in range(3)] == [
        202,
        202,
        429,
    ]


def test_no_limit_and_no_key_with_auth_off(model: ServingModel) -> None:
    settings = ServeSettings(api={"rate_limit": {"requests_per_second": 0.1, "burst": 1}})
    http = TestClient(create_api(Backend(model), settings.api), raise_server_exceptions=False)
    body = {"user_id": "u1", "k": 2, "explain": True}
    assert [http.post("/v1/recommendations", json=body).status_code for _ in range(4)] == [200] * 4
    assert http.get("/openapi.json").status_code == 200


def test_a_rotated_keys_file_is_used_without_a_restart(
    model: ServingModel,
    tables: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = write_keys(tmp_path / "keys.json", ["client"])
    api = Api(Backend(model), tables, path)
    assert api.call("POST", "/v1/recommendations", KEYS["client"]).status_code == 200
    assert api.call("POST", "/v1/recommendations", KEYS["analyst"]).status_code == 401
    write_keys(path, ["analyst"])
    api.clock.now += 1.0
    assert api.call("POST", "/v1/recommendations", KEYS["analyst"]).status_code == 200
    assert api.call("POST", "/v1/recommendations", KEYS["client"]).status_code == 401
    path.write_text("{not json")
    api.clock.now += 1.0
    assert api.call("POST", "/v1/recommendations", KEYS["analyst"]).status_code == 200
    assert api.metrics.file_errors == 1


def test_the_settings_admin_key_is_one_more_key_with_scope_admin(api: Api) -> None:
    assert api.call("POST", "/v1/admin/reload", ADMIN_SETTING).status_code == 200
    assert api.call("GET", "/v1/experiments", ADMIN_SETTING).status_code != 403
    assert_refused(api.call("POST", "/v1/recommendations", ADMIN_SETTING), 403, "forbidden")


def test_refusals_are_counted_by_route_status_and_key_name(api: Api) -> None:
    api.call("POST", "/v1/recommendations")
    api.call("POST", "/v1/recommendations", "unknown-key-000000000")
    api.call("POST", "/v1/events", KEYS["recommend"])
    api.call("GET", "/v1/demo/stats", KEYS["client"])
    api.call("POST", "/v1/recommendations", KEYS["client"], json={"user_id": "u", "explain": True})
    api.call("GET", "/healthz")
    assert api.metrics.refusals == [
        ("recommendations", 401, ""),
        ("recommendations", 401, ""),
        ("events", 403, "recommend"),
        ("demo", 403, "client"),
        ("recommendations", 403, "client"),
    ]


def test_no_exception_text_reaches_an_answer(
    model: ServingModel,
    tables: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    secret = "redis://:hunter2@10.0.0.7:6379 ConnectionError"

    class Broken(Fixed):
        async def readiness(self) -> Any:
            raise RuntimeError(secret)

        async def experiments(self) -> dict[str, Any]:
            raise RuntimeError(secret)

    for error in (ModelUnavailable(secret), FeatureStoreUnavailable(secret)):
        http = TestClient(create_api(Broken(error), ServeSettings().api))
        rec = http.post("/v1/recommendations", json={"user_id": "u1"})
        events = http.post("/v1/events", json={"events": [CLICK]})
        ready = http.get("/readyz")
        for response in (rec, events, ready):
            assert response.status_code == 503
            assert "hunter2" not in response.text and "ConnectionError" not in response.text
        assert ready.json() == {"ready": False, "error": "router unavailable"}
        assert "hunter2" not in http.get("/v1/experiments").text
    # The demo's tables missing: the file's path stays in the log.
    settings = ServeSettings(
        feature_store={"data_dir": tmp_path},
        demo={"catalog_path": tmp_path / "hunter2.parquet", "users_path": tmp_path / "u.parquet"},
    )
    app = create_api(Backend(model), settings.api)
    mount_demo(app, Backend(model), settings, None)
    missing = TestClient(app).get("/v1/demo/users")
    assert_error(missing, 503, "demo_unavailable")
    assert "hunter2" not in missing.text and str(tmp_path) not in missing.text


def test_the_openapi_document_states_the_auth_errors(api: Api) -> None:
    paths = api.call("GET", "/openapi.json", KEYS["nothing"]).json()["paths"]
    for path, method in (("/v1/recommendations", "post"), ("/v1/events", "post")):
        assert {"401", "403", "429"} <= set(paths[path][method]["responses"])


def test_the_chart_s_environment_turns_auth_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "RECSERVE_API__AUTH__ENABLED": "true",
        "RECSERVE_API__AUTH__KEYS_FILE": "/etc/recserve/api-keys/keys.json",
        "RECSERVE_API__RATE_LIMIT__REQUESTS_PER_SECOND": "50",
        "RECSERVE_API__RATE_LIMIT__BURST": "100",
        "RECSERVE_API__EXPLAIN_ENABLED": "false",
        "RECSERVE_DEMO__ENABLED": "false",
    }.items():
        monkeypatch.setenv(name, value)
    api = ServeSettings().api
    assert api.auth.enabled and api.auth.keys_file == Path("/etc/recserve/api-keys/keys.json")
    assert (api.rate_limit.requests_per_second, api.rate_limit.burst) == (50.0, 100)
    assert not api.explain_enabled and not ServeSettings().demo.enabled
    monkeypatch.delenv("RECSERVE_API__AUTH__KEYS_FILE")
    with pytest.raises(ValueError, match=r"api\.auth\.enabled needs api\.auth\.keys_file"):
        ServeSettings()


def test_auth_is_off_by_default() -> None:
    # So that a local run and the README's curls need no key.
    api = ServeSettings().api
    assert not api.auth.enabled and api.rate_limit.requests_per_second == 0
    assert api.explain_enabled and ServeSettings().demo.enabled


def test_the_openapi_document_declares_the_keys_and_exempts_the_health_checks(api: Api) -> None:
    spec = api.call("GET", "/openapi.json", KEYS["nothing"]).json()
    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    assert spec["security"] == [{"bearer": []}, {"apiKey": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert spec["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/v1/recommendations"]["post"]
    assert "/v1/demo/users" in spec["paths"]  # mounted after create_api, still documented
