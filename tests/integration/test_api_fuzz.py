"""Schema-driven fuzzing of the HTTP API in CI: 300 schemathesis cases from the app's own
`/openapi.json`, positive and negative, every operation (the demo's included); none may get a 5xx or an
error outside the API's error shape.

The app is `create_api` + `mount_demo` in process with the real stages behind it (the four pure
stages over the tiny bundle of test_recommend, as test_demo_api serves them) and the real event
writer (`EventLogWriter`'s Lua script on the shared Redis, under this test's key prefix), so a valid
but odd request reaches the code that would fail on it. The bigger run against a served graph is
`bench/fuzz_api.py` (2,000 cases and more); both share `bench.fuzz_api.fuzz`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis

from bench.fuzz_api import fuzz, print_report, with_event_items
from serve_app.auth import key_entry
from serve_app.config import EventLogConfig, RealtimeConfig, ServeSettings
from serve_app.demo import mount_demo
from serve_app.event_writer import EventWriteSummary
from serve_app.events import EventLogWriter
from serve_app.ingress import create_api
from serve_app.metrics import RequestMetrics
from serve_app.recommend import ServingModel
from serve_app.router import Readiness
from serve_app.schemas import Event
from tests.unit.test_demo_api import InProcess, tables  # noqa: F401  (tables: a fixture)
from tests.unit.test_recommend import make_model

pytestmark = pytest.mark.integration

CASES = 300
API_KEY = "fuzz-key-0123456789"  # sent as a Bearer token, as bench/fuzz_api.py does


class RealStages(InProcess):
    """Recommendations from the pure stages, events through the real writer on Redis."""

    def __init__(self, model: ServingModel, writer: EventLogWriter) -> None:
        super().__init__(model)
        self.writer = writer

    async def write_events(self, events: list[Event]) -> EventWriteSummary:
        result = self.writer.write(events)
        return EventWriteSummary(written=result.accepted, duplicates=result.duplicates)

    async def readiness(self) -> Readiness:
        return Readiness(True, "7", "models:/recserve@champion", time.time(), None)

    async def experiments(self) -> dict[str, Any]:
        return {"experiment": "default", "variants": [], "shadow": None}


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return make_model()


def test_300_schema_driven_cases_get_no_server_error_and_only_shaped_errors(
    model: ServingModel,
    tables: Path,  # noqa: F811
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    stream = f"{key_prefix}:events"
    writer = EventLogWriter(
        redis_client, RealtimeConfig(key_prefix=key_prefix), EventLogConfig(stream_key=stream)
    )
    backend = RealStages(model, writer)
    # Auth on, as the chart runs it: the fuzz key holds every scope, so the cases reach the routes
    # (tests/unit/test_api_auth.py covers the refusals).
    keys_file = tmp_path / "keys.json"
    entry = key_entry(API_KEY, "fuzz", ("recommend", "events", "admin", "debug"))
    keys_file.write_text(json.dumps({"keys": [entry]}))
    settings = ServeSettings(
        feature_store={"data_dir": tables},
        api={"admin_api_key": "admin-secret", "auth": {"enabled": True, "keys_file": keys_file}},
        demo={"catalog_path": tables / "catalog.parquet", "users_path": tables / "users.parquet"},
    )
    metrics = RequestMetrics()
    app = create_api(backend, settings.api, metrics)
    mount_demo(app, backend, settings, metrics)
    schema = schemathesis.openapi.from_dict(with_event_items(app.openapi()))
    schema.app = app  # requests go to the app in process

    def send(case: Any) -> tuple[int, str]:
        response = case.call(headers={"Authorization": f"Bearer {API_KEY}"})
        return response.status_code, response.text

    report = fuzz(schema, CASES, send, seed=29)
    print_report(report)

    assert report.cases >= CASES
    assert report.failures == [], "\n".join(
        f"{f.status} {f.request} -> {f.response}" for f in report.failures
    )
    rows = {name: op.row() for name, op in report.operations.items()}
    assert {"POST /v1/recommendations", "POST /v1/events", "GET /v1/demo/catalog"} <= set(rows)
    assert all(row["cases"] > 0 for row in rows.values()), rows
    # Both sides of each body were exercised: valid requests reached the stages and the writer
    # (the events are in the stream), invalid ones were refused with a 4xx.
    for name in ("POST /v1/recommendations", "POST /v1/events"):
        assert rows[name]["2xx"] > 0 and rows[name]["4xx"] > 0, rows[name]
    assert redis_client.xlen(stream) > 0
