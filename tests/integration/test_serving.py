"""The online graph on real Ray Serve, a real MLflow registry, Feast (SQLite) and Redis, over HTTP.

One deployment for the session (`serving_app` in conftest). Expectations come from the data the bundle was
trained on (event log, catalog, popularity.json), never from an earlier response. The Redis tests stop
and freeze the graph's private Redis: they run last in this module.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pandas as pd
import pytest

from serve_app.schemas import POSITIVE_EVENT_TYPES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import ServingApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PURE = {"mmr_lambda": 1.0, "category_cap": False}


@pytest.fixture(scope="module")
def api(serving_app: ServingApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serving_app.url, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def catalog(serving_app: ServingApp) -> pd.DataFrame:
    return pd.read_parquet(serving_app.bundle.dataset_dir / "catalog.parquet").set_index("item_id")


@pytest.fixture(scope="module")
def events(serving_app: ServingApp) -> pd.DataFrame:
    return pd.read_parquet(serving_app.bundle.dataset_dir / "events.parquet")


@pytest.fixture(scope="module")
def popularity(serving_app: ServingApp) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        (serving_app.bundle.bundle_dir / "popularity.json").read_text()
    )
    return result


def positives(events: pd.DataFrame, user_id: str) -> set[str]:
    mine = events[(events["user_id"] == user_id) & events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    return set(mine["item_id"])


def heavy_users(events: pd.DataFrame, minimum: int) -> list[str]:
    pos = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    counts = pos.groupby("user_id")["item_id"].nunique()
    return sorted(counts[counts >= minimum].index)


def recommend(api: httpx.Client, user_id: str, k: int = 10, **extra: Any) -> dict[str, Any]:
    response = api.post("/v1/recommendations", json={"user_id": user_id, "k": k, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_request_returns_k_distinct_unseen_items_in_descending_score_order(
    api: httpx.Client, serving_app: ServingApp, events: pd.DataFrame
) -> None:
    user = heavy_users(events, 10)[0]
    for k in (1, 10, 37):
        response = api.post(
            "/v1/recommendations", json={"user_id": user, "k": k}, headers={"X-Request-ID": "t-1"}
        )
        assert response.status_code == 200
        body = response.json()
        assert body["request_id"] == "t-1" and body["user_id"] == user
        assert body["variant"] == "champion"
        assert body["model_version"] == serving_app.bundle.version
        assert body["fallback"] is None
        items = body["items"]
        ids = [i["item_id"] for i in items]
        assert len(ids) == k and len(set(ids)) == k
        assert [i["rank"] for i in items] == list(range(1, k + 1))
        scores = [i["score"] for i in items]
        assert scores == sorted(scores, reverse=True)
        assert not set(ids) & positives(events, user)
        assert {i["source"] for i in items} <= {"retrieval", "collaborative"}


def test_an_unknown_user_gets_popularity_flagged_cold_start(
    api: httpx.Client, popularity: dict[str, Any]
) -> None:
    body = recommend(api, "never-seen-before", 8, options=PURE)
    assert body["fallback"] == "cold_start"
    assert [i["item_id"] for i in body["items"]] == popularity["global"][:8]
    assert {i["source"] for i in body["items"]} == {"popularity"}
    segment, ranked = next(iter(popularity["by_category"].items()))
    body = recommend(api, "another-stranger", 5, options=PURE, context={"segment": segment})
    assert [i["item_id"] for i in body["items"]] == ranked[:5]
    default = recommend(api, "a-third-stranger", 10)
    assert default["fallback"] == "cold_start"
    assert {i["item_id"] for i in default["items"]} <= set(popularity["global"])


def test_filters_leave_out_items_and_categories(
    api: httpx.Client, events: pd.DataFrame, catalog: pd.DataFrame
) -> None:
    user = heavy_users(events, 10)[1]
    before = [i["item_id"] for i in recommend(api, user, 10)["items"]]
    banned_category = str(catalog.loc[before[0], "category"])
    body = recommend(
        api,
        user,
        10,
        filters={"exclude_categories": [banned_category], "exclude_item_ids": before[1:3]},
    )
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 10
    assert banned_category not in set(catalog.loc[ids, "category"])
    assert not set(ids) & set(before[1:3])
    allowed = sorted(catalog["category"].unique())[:2]
    body = recommend(api, user, 10, filters={"categories": allowed})
    assert set(catalog.loc[[i["item_id"] for i in body["items"]], "category"]) <= set(allowed)


def test_clicks_on_one_category_raise_its_share_and_hide_the_clicked_items(
    api: httpx.Client, events: pd.DataFrame, catalog: pd.DataFrame, popularity: dict[str, Any]
) -> None:
    """Over several heavy users, not one: each clicks 5 unseen popular items of the category least
    present in their list. The ranker weighs a burst of clicks against a long history, so one user's
    list may stay put; at least half must move, and the clicked items must never come back. (In
    process 29 of 40 heavy users' lists move: over 8 users a 60% bar failed one run in five.)"""
    users = heavy_users(events, 10)[2:22]
    moved, shares_before, shares_after = 0, [], []
    for user in users:
        seen = positives(events, user)
        before = [i["item_id"] for i in recommend(api, user, 10)["items"]]
        shares = Counter(catalog.loc[before, "category"])
        # The least represented category of the list that has enough unseen popular items.
        candidates = sorted(catalog["category"].unique(), key=lambda c: (shares.get(c, 0), c))
        target = next(
            c
            for c in candidates
            if len([i for i in popularity["by_category"][c] if i not in seen and i not in before])
            >= 5
        )
        clicked = [
            i for i in popularity["by_category"][target] if i not in seen and i not in before
        ][:5]
        now = datetime.now(UTC).isoformat()
        response = api.post(
            "/v1/events",
            json={
                "events": [
                    {"user_id": user, "item_id": item, "event_type": "click", "timestamp": now}
                    for item in clicked
                ]
            },
        )
        assert response.status_code == 202 and response.json() == {
            "accepted": 5,
            "rejected": [],
            "spooled": 0,
        }
        after = [i["item_id"] for i in recommend(api, user, 10)["items"]]
        assert not set(after) & set(clicked), user
        share_before = shares.get(target, 0) / 10
        share_after = Counter(catalog.loc[after, "category"]).get(target, 0) / 10
        moved += share_after > share_before
        shares_before.append(share_before)
        shares_after.append(share_after)
    assert moved >= 0.5 * len(users), (moved, shares_before, shares_after)
    assert np.mean(shares_after) > np.mean(shares_before) + 0.1, (shares_before, shares_after)


def test_bad_inputs_get_the_documented_4xx_over_http(api: httpx.Client) -> None:
    def code(response: httpx.Response) -> tuple[int, str, str | None]:
        body = response.json()
        return response.status_code, body["error"]["code"], body["error"]["field"]

    post = api.post
    json_headers = {"Content-Type": "application/json"}
    cases = {
        "malformed json": (
            post("/v1/recommendations", content=b'{"user_id": ', headers=json_headers),
            (400, "malformed_json", None),
        ),
        "wrong type": (
            post("/v1/recommendations", json={"user_id": ["u1"]}),
            (422, "invalid_request", "user_id"),
        ),
        "unknown field": (
            post("/v1/recommendations", json={"user_id": "u1", "limit": 3}),
            (422, "invalid_request", "limit"),
        ),
        "k too large": (
            post("/v1/recommendations", json={"user_id": "u1", "k": 500}),
            (422, "invalid_request", "k"),
        ),
        "k zero": (
            post("/v1/recommendations", json={"user_id": "u1", "k": 0}),
            (422, "invalid_request", "k"),
        ),
        "bad id": (
            post("/v1/recommendations", json={"user_id": "u1/../x"}),
            (422, "invalid_request", "user_id"),
        ),
        "oversize": (
            post(
                "/v1/recommendations",
                content=b'{"user_id": "' + b"u" * (1 << 20) + b'"}',
                headers=json_headers,
            ),
            (413, "body_too_large", None),
        ),
        "too many events": (
            post(
                "/v1/events",
                json={"events": [{"user_id": "u1", "item_id": "i1", "event_type": "view"}] * 1_001},
            ),
            (422, "too_many_events", "events"),
        ),
        "wrong media type": (
            post("/v1/events", content=b"events", headers={"Content-Type": "text/plain"}),
            (415, "unsupported_media_type", None),
        ),
        "unknown path": (api.get("/v2/recommendations"), (404, "not_found", None)),
        "admin without key": (post("/v1/admin/reload"), (401, "unauthorized", "X-API-Key")),
    }
    got = {name: code(response) for name, (response, _) in cases.items()}
    assert got == {name: expected for name, (_, expected) in cases.items()}


def test_admin_reload_health_readiness_and_docs(api: httpx.Client, serving_app: ServingApp) -> None:
    reload = api.post("/v1/admin/reload", headers={"X-API-Key": serving_app.admin_key})
    assert reload.status_code == 200
    assert reload.json()["current"] == serving_app.bundle.version
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == serving_app.bundle.version
    assert api.get("/docs").status_code == 200
    assert "/v1/recommendations" in api.get("/openapi.json").json()["paths"]


def test_with_redis_stopped_recommendations_degrade_and_events_are_spooled_then_replayed(
    api: httpx.Client, serving_app: ServingApp, events: pd.DataFrame
) -> None:
    import redis

    user = heavy_users(events, 10)[3]
    serving_app.redis.stop()
    try:
        body = recommend(api, user, 10)
        assert body["fallback"] == "degraded"
        ids = [i["item_id"] for i in body["items"]]
        assert len(set(ids)) == 10 and not set(ids) & positives(events, user)
        cold = recommend(api, "stranger-during-outage", 5)
        assert cold["fallback"] == "degraded" and len(cold["items"]) == 5
        click = {"user_id": user, "item_id": ids[0], "event_type": "click"}
        response = api.post("/v1/events", json={"events": [click]})
        # Accepted into the event writer's local spool, not refused.
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 1, "rejected": [], "spooled": 1}
    finally:
        serving_app.redis.start()
    # The breaker retries Redis after its cooldown (1 s): answers are whole again.
    deadline = datetime.now(UTC).timestamp() + 15
    while recommend(api, user, 10)["fallback"] is not None:
        assert datetime.now(UTC).timestamp() < deadline, "still degraded after Redis came back"
    # The spooled click reaches the (restarted, empty) stream by the replay.
    client: Any = redis.Redis.from_url(serving_app.redis.url)
    deadline = datetime.now(UTC).timestamp() + 15
    while True:
        logged = [
            (f[b"user_id"].decode(), f[b"item_id"].decode(), f[b"event_type"].decode())
            for _, f in client.xrange("recserve:events")
        ]
        if (user, ids[0], "click") in logged:
            break
        assert datetime.now(UTC).timestamp() < deadline, "the spooled click was not replayed"
        time.sleep(0.05)
    assert logged.count((user, ids[0], "click")) == 1
    response = api.post(
        "/v1/events", json={"events": [{"user_id": user, "item_id": "i1", "event_type": "view"}]}
    )
    assert response.status_code == 202 and response.json()["spooled"] == 0


def test_twenty_seconds_of_hung_redis_at_six_event_batches_a_second_lose_and_double_nothing(
    api: httpx.Client, serving_app: ServingApp, catalog: pd.DataFrame
) -> None:
    """The issue's acceptance through the graph: 6 batches/s of 5 events, Redis hung (SIGSTOP: every
    call times out, the data stays) for 20 s in the middle. Every batch answered 202; the stream holds
    each event sent exactly once, in the order sent; the users' counters and recent items caught up."""
    import redis

    from serve_app.features import FeatureShapes, OnlineFeatureReader, connect_redis

    items = [str(i) for i in catalog.index[:40]]
    kinds = ("click", "view", "purchase", "view", "add_to_cart")
    start = datetime.now(UTC) - timedelta(seconds=40)
    sent: list[dict[str, Any]] = []
    spooled = statuses = 0
    latencies: list[float] = []
    when: list[float] = []
    t0 = time.perf_counter()

    def post(batch: list[dict[str, Any]]) -> dict[str, Any]:
        began = time.perf_counter()
        response = api.post("/v1/events", json={"events": batch})
        latencies.append((time.perf_counter() - began) * 1000)
        when.append(began - t0)
        assert response.status_code == 202, response.text
        sent.extend(batch)
        body: dict[str, Any] = response.json()
        return body

    def batch_of(n: int) -> list[dict[str, Any]]:
        return [
            {
                "user_id": f"outage-u{(5 * n + k) % 9}",
                "item_id": items[(7 * n + 3 * k) % len(items)],
                "event_type": kinds[(n + k) % len(kinds)],
                # Explicit timestamps: the ids are known here, independently of the server.
                "timestamp": (start + timedelta(milliseconds=5 * n + k)).isoformat(),
            }
            for k in range(5)
        ]

    before, outage, after, rate = 3.0, 20.0, 4.0, 6
    t0 = time.perf_counter()
    frozen = thawed = False
    try:
        for n in range(int((before + outage + after) * rate)):
            time.sleep(max(0.0, t0 + n / rate - time.perf_counter()))  # the open-loop schedule
            elapsed = time.perf_counter() - t0
            if not frozen and elapsed >= before:
                serving_app.redis.freeze()
                frozen = True
            if frozen and not thawed and elapsed >= before + outage:
                serving_app.redis.thaw()
                thawed = True
            body = post(batch_of(n))
            spooled += body["spooled"]
            statuses += 1
    finally:
        if frozen and not thawed:
            serving_app.redis.thaw()
    assert spooled >= 0.9 * outage * rate * 5
    # The spool is empty when a new event goes straight to Redis (spooled 0): the replay is done.
    deadline = time.perf_counter() + 60
    n = 10_000
    while post(batch_of(n)[:1])["spooled"]:
        assert time.perf_counter() < deadline, "the spool was not replayed in time"
        time.sleep(0.1)
        n += 1

    client: Any = redis.Redis.from_url(serving_app.redis.url)
    logged = [
        f[b"event_id"].decode()
        for _, f in client.xrange("recserve:events")
        if f[b"user_id"].startswith(b"outage-")
    ]
    from serve_app.events import event_id
    from serve_app.schemas import Event

    events = [Event.model_validate(e) for e in sent]
    expected = [event_id(e) for e in events]
    assert len(set(expected)) == len(expected)
    lost = set(expected) - set(logged)
    duplicated = len(logged) - len(set(logged))
    ms = sorted(latencies)
    print(
        f"\n{len(sent)} events sent in {statuses} batches, {spooled} spooled; lost {len(lost)}, "
        f"duplicated {duplicated}; POST /v1/events p50 {ms[len(ms) // 2]:.1f} ms, "
        f"p99 {ms[int(len(ms) * 0.99)]:.1f} ms, max {ms[-1]:.1f} ms"
    )
    slowest = sorted(zip(latencies, when, strict=True), reverse=True)[:4]
    print(
        "slowest POSTs (ms, s after start; frozen 3-23 s):",
        [f"{a:.0f}@{b:.1f}" for a, b in slowest],
    )
    assert (len(lost), duplicated) == (0, 0)
    assert logged == expected

    users = sorted({e.user_id for e in events})
    reader = OnlineFeatureReader(
        None,
        connect_redis(serving_app.redis.url, 1.0),
        key_prefix="recserve:rt",
        store_on_redis=False,
    )
    got = reader.users(users, FeatureShapes(1, 1, 20), model_version=None, now=time.time())
    for row, user in enumerate(users):
        mine = [e for e in events if e.user_id == user]
        recent: tuple[str, ...] = ()
        for e in mine:
            if e.event_type in POSITIVE_EVENT_TYPES and e.item_id not in recent:
                recent = (e.item_id, *recent)[:20]
        assert got.count_1h[row] == len(mine), user
        assert got.recent_items[row] == recent, user
