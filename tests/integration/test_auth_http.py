"""API keys over HTTP against the real graph: auth turned on the way the chart turns it on
(`RECSERVE_API__AUTH__ENABLED` and `RECSERVE_API__AUTH__KEYS_FILE` in the environment the app is
built in, the keys file laid out as a Kubernetes Secret volume), on Ray Serve beside the session's
graph (`fused`: the whole chain in one Ingress replica), the demo on.

Every route the deployed app documents in /openapi.json, and the pages it does not: 401 without a key
or with an unknown one, 403 with a key lacking the scope, the answer with the right one. Then a key
rotated by swapping the Secret's symlink is taken without a restart, and the rate limit answers 429
with Retry-After.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pandas as pd
import pytest

from serve_app.auth import key_entry

if TYPE_CHECKING:
    from tests.conftest import TrainedBundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "secured"
PREFIX = f"/{APP}"
KEYS = {
    "client": ("k-client-http-000000001", ["recommend", "events"]),
    "admin": ("k-admin-http-0000000002", ["admin"]),
    "debug": ("k-debug-http-0000000003", ["debug"]),
    "analyst": ("k-analyst-http-00000004", ["recommend", "debug"]),
    "nothing": ("k-nothing-http-00000005", []),
    "limited": ("k-limited-http-00000006", ["recommend"]),  # only the rate limit test uses it
}
ROTATED = ("k-rotated-http-00000007", ["recommend"])
# The rate limit: generous enough for what the other tests send per key (< 40 requests each).
RATE = 0.5
BURST = 40
# The scope each route needs (docs/security.md); None: any valid key.
NEEDS = {
    ("POST", "/v1/recommendations"): "recommend",
    ("POST", "/v1/events"): "events",
    ("GET", "/v1/experiments"): "admin",
    ("POST", "/v1/admin/reload"): "admin",
    ("GET", "/v1/demo/catalog"): "debug",
    ("GET", "/v1/demo/items"): "debug",
    ("GET", "/v1/demo/users"): "debug",
    ("GET", "/v1/demo/users/{user_id}/vectors"): "debug",
    ("GET", "/v1/demo/stats"): "debug",
    ("GET", "/demo"): "debug",
    ("GET", "/demo/ops"): "debug",
    ("GET", "/demo/static/demo.js"): "debug",
    ("GET", "/docs"): None,
    ("GET", "/redoc"): None,
    ("GET", "/openapi.json"): None,
}
OPEN = {("GET", "/healthz"), ("GET", "/readyz")}


class SecretVolume:
    """The layout the kubelet gives a Secret volume: keys.json -> ..data/keys.json, ..data -> a
    timestamped directory, swapped atomically on an update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir(parents=True)
        (root / "keys.json").symlink_to("..data/keys.json")

    @property
    def path(self) -> Path:
        return self.root / "keys.json"

    def write(self, keys: dict[str, tuple[str, list[str]]]) -> None:
        self.generation += 1
        fresh = self.root / f"..gen_{self.generation}"
        fresh.mkdir()
        entries = [key_entry(key, name, scopes) for name, (key, scopes) in keys.items()]
        (fresh / "keys.json").write_text(json.dumps({"keys": entries}))
        link = self.root / "..data_tmp"
        link.symlink_to(fresh.name)
        os.replace(link, self.root / "..data")


@dataclass(frozen=True)
class Secured:
    url: str
    volume: SecretVolume
    user: str
    item: str


@pytest.fixture(scope="module")
def secured(
    serve_url: str,
    trained_bundle: TrainedBundle,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Secured]:
    """The graph with auth on, beside the session's (its own Redis keys, one small replica)."""
    import redis
    from ray import serve

    from serve_app.cli import deploy, wait_ready
    from serve_app.config import serve_config

    volume = SecretVolume(tmp_path_factory.mktemp("api-keys") / "volume")
    volume.write(KEYS)
    config = serve_config({}, placement="fused")
    for deployment in config["applications"][0]["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.01
        deployment["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    prefix = f"test-auth:{uuid.uuid4().hex[:12]}"
    settings = {
        "feature_store": {"data_dir": str(trained_bundle.data_dir), "profile": "embedded"},
        "redis_url": redis_url,
        "realtime": {"key_prefix": f"{prefix}:rt"},
        "event_log": {"stream_key": f"{prefix}:events"},
        "event_spool": {"directory": str(tmp_path_factory.mktemp("auth-spool"))},
        "experiment": {"key_prefix": f"{prefix}:exp"},
        "models": {"tracking_uri": trained_bundle.tracking_uri},
        "placement": "fused",
        "api": {"rate_limit": {"requests_per_second": RATE, "burst": BURST}},
        "demo": {"enabled": True},
    }
    with pytest.MonkeyPatch.context() as env:
        # As the chart does: the app builder reads these from its environment.
        env.setenv("RECSERVE_API__AUTH__ENABLED", "true")
        env.setenv("RECSERVE_API__AUTH__KEYS_FILE", str(volume.path))
        deploy(settings, config, name=APP, route_prefix=PREFIX)
    events = pd.read_parquet(trained_bundle.dataset_dir / "events.parquet")
    try:
        wait_ready(serve_url + PREFIX, 300)
        yield Secured(
            serve_url + PREFIX,
            volume,
            str(events["user_id"].iloc[0]),
            str(events["item_id"].iloc[0]),
        )
    finally:
        serve.delete(APP)
        client: Any = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if stale:
            client.delete(*stale)


def call(
    secured: Secured, method: str, path: str, key: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    concrete = path.replace("{user_id}", secured.user)
    if concrete == "/v1/demo/items":
        concrete += f"?ids={secured.item}"
    route = path.split("?")[0]
    if "json" not in kwargs:
        if route == "/v1/recommendations":
            kwargs["json"] = {"user_id": secured.user, "k": 3}
        elif route == "/v1/events":
            click = {"user_id": secured.user, "item_id": secured.item, "event_type": "click"}
            kwargs["json"] = {"events": [click]}
    return httpx.request(method, secured.url + concrete, headers=headers, timeout=30.0, **kwargs)


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_every_documented_route_is_one_the_test_knows(secured: Secured) -> None:
    spec = call(secured, "GET", "/openapi.json", KEYS["nothing"][0])
    assert spec.status_code == 200
    documented = {
        (method.upper(), path)
        for path, methods in spec.json()["paths"].items()
        for method in methods
    }
    # The pages (docs, demo) are not in the schema; every API route is, with the health checks.
    assert documented == {r for r in NEEDS if r[1].startswith("/v1/")} | OPEN


def test_health_checks_answer_without_a_key(secured: Secured) -> None:
    assert call(secured, "GET", "/healthz").json() == {"status": "ok"}
    assert call(secured, "GET", "/readyz").status_code == 200


@pytest.mark.parametrize(("method", "path"), sorted(NEEDS))
def test_a_route_answers_401_without_a_key_403_without_its_scope_and_works_with_it(
    secured: Secured, method: str, path: str
) -> None:
    needed = NEEDS[(method, path)]
    assert_refused(call(secured, method, path), 401, "unauthorized")
    assert_refused(call(secured, method, path, "k-unknown-http-0000000"), 401, "unauthorized")
    for name, (key, scopes) in KEYS.items():
        if name == "limited":
            continue
        response = call(secured, method, path, key)
        if needed is None or needed in scopes:
            assert response.status_code in (200, 202), (name, response.text)
        else:
            assert_refused(response, 403, "forbidden")
            assert f"'{needed}'" in response.json()["error"]["message"]


def test_explain_and_timings_need_debug_beside_recommend(secured: Secured) -> None:
    explain = {"user_id": secured.user, "k": 3, "explain": True}
    client, analyst = KEYS["client"][0], KEYS["analyst"][0]
    refused = call(secured, "POST", "/v1/recommendations", client, json=explain)
    assert_refused(refused, 403, "forbidden")
    assert refused.json()["error"]["field"] == "explain"
    traced = call(secured, "POST", "/v1/recommendations", analyst, json=explain)
    assert traced.status_code == 200 and "explain" in traced.json()
    assert_refused(call(secured, "POST", "/v1/recommendations?debug=1", client), 403, "forbidden")
    timed = call(secured, "POST", "/v1/recommendations?debug=1", analyst)
    assert timed.status_code == 200 and "timings_ms" in timed.json()["debug"]


def test_a_key_rotated_in_the_secret_is_taken_without_a_restart(secured: Secured) -> None:
    new_key, old_key = ROTATED[0], KEYS["client"][0]
    assert_refused(call(secured, "POST", "/v1/recommendations", new_key), 401, "unauthorized")
    secured.volume.write({**KEYS, "rotated": ROTATED})
    deadline = time.monotonic() + 30
    while call(secured, "POST", "/v1/recommendations", new_key).status_code != 200:
        assert time.monotonic() < deadline, "the rotated key was not taken within 30 s"
        time.sleep(0.1)  # the Ingress checks the file once a second
    # The old key goes in the next update.
    secured.volume.write({**{n: k for n, k in KEYS.items() if n != "client"}, "rotated": ROTATED})
    while call(secured, "POST", "/v1/recommendations", old_key).status_code != 401:
        assert time.monotonic() < deadline, "the removed key still worked after 30 s"
        time.sleep(0.1)
    secured.volume.write({**KEYS, "rotated": ROTATED})  # as before, for the other tests


def test_a_key_over_its_rate_gets_429_with_retry_after(secured: Secured) -> None:
    key = KEYS["limited"][0]
    statuses: list[int] = []
    started = time.monotonic()
    while len(statuses) < 3 * BURST and (not statuses or statuses[-1] != 429):
        statuses.append(call(secured, "POST", "/v1/recommendations", key).status_code)
    elapsed = time.monotonic() - started
    assert statuses[-1] == 429, f"no 429 in {len(statuses)} requests"
    answered = statuses[:-1]
    assert set(answered) == {200}
    # The burst, plus what refilled meanwhile at RATE a second.
    assert BURST <= len(answered) <= BURST + RATE * elapsed + 1
    limited = call(secured, "POST", "/v1/recommendations", key)
    assert_refused(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    # Another key is not limited by this one's bucket.
    assert call(secured, "POST", "/v1/recommendations", KEYS["analyst"][0]).status_code == 200
