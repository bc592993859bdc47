"""The demo page's HTTP side without Ray: static pages, the catalog/users/vectors/stats endpoints and
`"explain": true`, over FastAPI's TestClient, with the pure stages of test_recommend answering in process.

Expectations come from the hand-written Parquet tables below and from the trace's own contract.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from serve_app.config import RankingConfig, ServeSettings
from serve_app.demo import MAX_PAGE, mount_demo
from serve_app.features import FeatureShapes, assemble_user_features
from serve_app.ingress import create_api
from serve_app.metrics import RequestMetrics
from serve_app.recommend import ServingModel, recommend_in_process
from serve_app.stages.records import Query, Recommendations
from tests.unit.test_ingress import Unreachable, assert_error
from tests.unit.test_recommend import DIM, HISTORY, make_model

CATEGORIES = ["a", "b", "c"]


class InProcess(Unreachable):
    """The four pure stages over the tiny bundle; every user has clicked i01 and i02."""

    def __init__(self, model: ServingModel) -> None:
        self.model = model
        self.queries: list[Query] = []

    async def recommend(self, query: Query) -> Recommendations:
        self.queries.append(query)
        shapes = FeatureShapes(n_categories=3, embedding_dim=DIM, history_length=HISTORY)
        batch: dict[str, list[Any]] = {
            "event_count": [6.0],
            "category_prefs": [[0.1, 0.6, 0.3]],
            "base_embedding": [None],
            "recent_items": [["i01", "i02"]],
        }
        features = assemble_user_features([query.user_id], batch, None, shapes, "7", False)
        stamped = replace(query, model_version="7", variant="champion")
        (result,) = recommend_in_process(
            self.model, [stamped], features, [("i01", "i02")], RankingConfig()
        )
        return result


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return make_model()


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    pq.write_table(
        pa.table(
            {
                "item_id": [f"i{i:02d}" for i in range(30)],
                "category": [CATEGORIES[i % 3] for i in range(30)],
                "price": [float(i) + 0.5 for i in range(30)],
                "title": [f"Thing {i}" if i != 7 else "Red Lamp" for i in range(30)],
            }
        ),
        tmp_path / "catalog.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "user_id": ["light", "heavy", "middle"],
                "event_count": [1.0, 9.0, 4.0],
                "seen_items": [["i00"], ["i01", "i04", "i02"], []],
            }
        ),
        tmp_path / "users.parquet",
    )
    return tmp_path


def demo_client(backend: Any, tables: Path, **demo: Any) -> TestClient:
    settings = ServeSettings(
        feature_store={"data_dir": tables},
        demo={
            "catalog_path": tables / "catalog.parquet",
            "users_path": tables / "users.parquet",
            **demo,
        },
    )
    metrics = RequestMetrics()
    api = create_api(backend, settings.api, metrics)
    mount_demo(api, backend, settings, metrics)
    return TestClient(api, raise_server_exceptions=False)


def test_the_pages_and_their_assets_are_served(model: ServingModel, tables: Path) -> None:
    api = demo_client(InProcess(model), tables)
    page = api.get("/demo")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/demo/static/demo.js"' in page.text
    ops = api.get("/demo/ops")
    assert ops.status_code == 200 and 'src="/demo/static/ops.js"' in ops.text
    for asset in ("demo.js", "ops.js", "demo.css"):
        assert api.get(f"/demo/static/{asset}").status_code == 200
    assert_error(api.get("/demo/static/../demo.py"), 404, "not_found")


def test_catalog_is_searchable_filterable_and_paged(model: ServingModel, tables: Path) -> None:
    api = demo_client(InProcess(model), tables)
    body = api.get("/v1/demo/catalog", params={"limit": 5}).json()
    assert body["total"] == 30 and body["categories"] == CATEGORIES
    assert body["items"][0] == {"item_id": "i00", "title": "Thing 0", "category": "a", "price": 0.5}
    assert len(body["items"]) == 5
    lamp = api.get("/v1/demo/catalog", params={"q": "red lamp"}).json()
    assert [i["item_id"] for i in lamp["items"]] == ["i07"]
    b = api.get("/v1/demo/catalog", params={"category": "b", "offset": 8}).json()
    assert b["total"] == 10 and [i["item_id"] for i in b["items"]] == ["i25", "i28"]


def test_bad_catalog_queries_get_4xx_naming_the_field(model: ServingModel, tables: Path) -> None:
    api = demo_client(InProcess(model), tables)
    assert_error(
        api.get("/v1/demo/catalog", params={"category": "z"}), 422, "invalid_request", "category"
    )
    assert_error(
        api.get("/v1/demo/catalog", params={"limit": MAX_PAGE + 1}), 422, "invalid_request", "limit"
    )
    assert_error(
        api.get("/v1/demo/catalog", params={"offset": -1}), 422, "invalid_request", "offset"
    )
    assert_error(api.get("/v1/demo/catalog", params={"q": "x" * 65}), 422, "invalid_request", "q")


def test_known_users_come_most_active_first_with_their_main_category(
    model: ServingModel, tables: Path
) -> None:
    api = demo_client(InProcess(model), tables, max_users=2)
    users = api.get("/v1/demo/users").json()["users"]
    # heavy saw i01 (b), i04 (b), i02 (c): mostly b.
    assert users == [
        {"user_id": "heavy", "event_count": 9.0, "top_category": "b"},
        {"user_id": "middle", "event_count": 4.0, "top_category": None},
    ]


def test_missing_tables_answer_503_json(model: ServingModel, tables: Path) -> None:
    api = demo_client(InProcess(model), tables, catalog_path=tables / "nope.parquet")
    assert_error(api.get("/v1/demo/users"), 503, "demo_unavailable")
    assert_error(api.get("/v1/demo/catalog"), 503, "demo_unavailable")


def test_explain_is_off_by_default_and_typed_when_asked(model: ServingModel, tables: Path) -> None:
    backend = InProcess(model)
    api = demo_client(backend, tables)
    plain = api.post("/v1/recommendations", json={"user_id": "u1", "k": 4})
    assert plain.status_code == 200 and "explain" not in plain.json()
    assert backend.queries[-1].explain is False
    asked = api.post("/v1/recommendations", json={"user_id": "u1", "k": 4, "explain": True})
    assert asked.status_code == 200
    body = asked.json()
    assert backend.queries[-1].explain is True
    assert body["items"] == plain.json()["items"]
    trace = body["explain"]
    assert [i["item_id"] for i in trace["items"]] == [i["item_id"] for i in body["items"]]
    assert {r["rule"] for r in trace["removed"]} == {"duplicate", "seen", "filters", "category_cap"}
    assert len(trace["user"]["combined"]) == DIM
    assert_error(
        api.post("/v1/recommendations", json={"user_id": "u1", "explain": "yes"}),
        422,
        "invalid_request",
        "explain",
    )
    schema = api.get("/openapi.json").json()["components"]["schemas"]
    assert {"ExplainTrace", "ItemExplanation", "CatalogPage", "UserVectorsResponse"} <= set(schema)


def test_user_vectors_are_read_through_the_graph(model: ServingModel, tables: Path) -> None:
    backend = InProcess(model)
    api = demo_client(backend, tables)
    body = api.get("/v1/demo/users/u1/vectors").json()
    assert backend.queries[-1].explain is True and backend.queries[-1].k == 1
    assert body["user_id"] == "u1" and body["model_version"] == "7"
    vectors = body["vectors"]
    combined = np.array(vectors["combined"])
    assert len(combined) == DIM and np.linalg.norm(combined) == pytest.approx(1.0, abs=1e-4)
    assert vectors["delta"] == [0.0] * DIM
    assert_error(api.get("/v1/demo/users/not%20ok/vectors"), 422, "invalid_request", "user_id")


def test_stats_count_this_replicas_recommendations(model: ServingModel, tables: Path) -> None:
    api = demo_client(InProcess(model), tables)
    for _ in range(3):
        assert api.post("/v1/recommendations", json={"user_id": "u1", "k": 2}).status_code == 200
    api.post("/v1/recommendations", json={"user_id": "u1", "k": 0})  # 422: counted, not timed
    stats = api.get("/v1/demo/stats").json()
    assert stats["requests"] == 3 and stats["served"] == 3 and stats["errors"] == 0
    assert stats["fallback_share"] == 0.0 and stats["p99_ms"] >= stats["p50_ms"] > 0
    assert stats["shadow"]["mirrored"] == 0  # no shadow configured


# --- the catalog at scale: paging, the bound on a search, the id lookup ---------------------------


def big_catalog(path: Path, n: int) -> Path:
    """`n` items in categories a/b/c; every 7th is a "lamp", item 5 a "Blue Lamp" of category c."""
    titles = [f"Lamp {i}" if i % 7 == 0 else f"Chair {i}" for i in range(n)]
    titles[5] = "Blue Lamp"
    pq.write_table(
        pa.table(
            {
                "item_id": [f"x{i}" for i in range(n)],
                "category": [CATEGORIES[i % 3] for i in range(n)],
                "price": [1.0] * n,
                "title": titles,
            }
        ),
        path,
    )
    return path


def test_search_pages_through_matches_in_category_then_catalog_order(
    model: ServingModel, tables: Path
) -> None:
    n = 300
    api = demo_client(InProcess(model), tables, catalog_path=big_catalog(tables / "big.parquet", n))
    lamps = [i for i in range(n) if i % 7 == 0 or i == 5]
    expected = sorted(lamps, key=lambda i: (CATEGORIES[i % 3], i))
    pages = []
    for offset in range(0, len(expected), 10):
        body = api.get(
            "/v1/demo/catalog", params={"q": "LAMP", "offset": offset, "limit": 10}
        ).json()
        assert body["total"] == len(expected)
        pages += [i["item_id"] for i in body["items"]]
    assert pages == [f"x{i}" for i in expected]
    in_c = api.get("/v1/demo/catalog", params={"q": "lamp", "category": "c", "limit": 3}).json()
    want_c = [i for i in expected if i % 3 == 2]
    assert in_c["total"] == len(want_c)
    assert [i["item_id"] for i in in_c["items"]] == [f"x{i}" for i in want_c[:3]]
    # Past the end: an empty page with the same total.
    tail = api.get("/v1/demo/catalog", params={"q": "lamp", "offset": 1000}).json()
    assert tail["items"] == [] and tail["total"] == len(expected)


def test_search_matches_word_beginnings_exactly_as_a_plain_scan_would(tmp_path: Path) -> None:
    """Random titles (mixed case, punctuation, accents), random queries (word beginnings, several
    words, words of the id and category, no match), with and without a category: the same items in
    the same order as checking every item's words in Python."""
    import re

    import serve_app.demo_catalog as demo_catalog

    rng = np.random.default_rng(7)
    vocabulary = [
        "Lamp",
        "lamp-shade",
        "Café",
        "chair",
        "CHAIRS",
        "red",
        "blue",
        "x-ray",
        "42",
        "4x4",
    ]
    n = 400
    titles = [
        " ".join(
            str(vocabulary[int(k)]) for k in rng.integers(0, len(vocabulary), rng.integers(0, 4))
        )
        + ("." if i % 5 == 0 else "")
        for i in range(n)
    ]
    ids = [f"SKU-{i}" for i in range(n)]
    cats = [CATEGORIES[int(c)] for c in rng.integers(0, 3, n)]
    path = tmp_path / "c.parquet"
    pq.write_table(
        pa.table({"item_id": ids, "category": cats, "price": [1.0] * n, "title": titles}), path
    )
    catalog = demo_catalog.CatalogIndex.load(path)

    def words(text: str) -> list[str]:
        return re.findall(r"[^\W_]+", text.lower())

    def plain(q: str, category: str | None) -> list[str]:
        wanted = words(q)
        hits = []
        for i in range(n):
            shown = titles[i] or ids[i]
            own = words(shown) + words(ids[i]) + words(cats[i])
            if (category is None or cats[i] == category) and all(
                any(w.startswith(x) for w in own) for x in wanted
            ):
                hits.append(i)
        return [ids[i] for i in sorted(hits, key=lambda i: (cats[i], i))]

    queries = [
        "lamp",
        "LA",
        "caf",
        "café",
        "chair red",
        "x-ray",
        "4",
        "4x",
        "sku-1",
        "sku 39",
        "b",
        "zzz",
        "lamp zzz",
        "shade lamp",
        "42 blue",
        "Lamp, chair!",
    ]
    for q in queries:
        for category in (None, "b"):
            code = None if category is None else catalog.category_code(category)
            found = catalog.search(q, code, 0, n)
            assert [r.item_id for r in found.rows] == plain(q, category), (q, category)
            assert found.total == len(found.rows)
            if found.total > 3:  # a later page is the same order's slice
                page = catalog.search(q, code, 2, 2)
                assert [r.item_id for r in page.rows] == plain(q, category)[2:4]
    # Words only: separators alone list the catalog, as an empty search does.
    assert catalog.search(" -- ", None, 0, 5).total == n


def test_search_needs_every_word_of_the_query(tmp_path: Path) -> None:
    import serve_app.demo_catalog as demo_catalog

    catalog = demo_catalog.CatalogIndex.load(big_catalog(tmp_path / "c.parquet", 60))
    found = catalog.search("blue lamp", None, 0, 10)
    assert [r.item_id for r in found.rows] == ["x5"] and found.total == 1
    titles = [r.title for r in catalog.search("chair 4", None, 0, 100).rows]
    assert sorted(titles) == sorted(
        f"Chair {i}" for i in range(60) if str(i).startswith("4") and i % 7
    )
    # Words of the id count, by their beginning: "lamp x5" is Blue Lamp (x5) and Lamp 56.
    assert [r.item_id for r in catalog.search("lamp x5", None, 0, 10).rows] == ["x5", "x56"]
    assert catalog.search("lamp\x1fx5", None, 0, 10).total == 2  # a separator like any other
    # The common word goes through the bitmap, the rare one through a sort: the same answer.
    many = catalog.search("chair", None, 0, 100).total
    assert many == sum(1 for i in range(60) if i % 7 and i != 5)


def test_the_catalog_search_runs_off_the_event_loop(
    model: ServingModel, tables: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import serve_app.demo as demo

    loops: list[bool] = []
    real = demo.catalog_page

    def spy(*args: Any) -> Any:
        try:
            asyncio.get_running_loop()
            loops.append(True)
        except RuntimeError:
            loops.append(False)
        return real(*args)

    monkeypatch.setattr(demo, "catalog_page", spy)
    api = demo_client(InProcess(model), tables)
    assert api.get("/v1/demo/catalog", params={"q": "thing"}).status_code == 200
    assert loops == [False]


def test_items_are_looked_up_by_id_in_the_order_asked(model: ServingModel, tables: Path) -> None:
    api = demo_client(InProcess(model), tables)
    body = api.get("/v1/demo/items", params={"ids": "i07,nope,i01,i07"}).json()
    assert body == {
        "items": [
            {"item_id": "i07", "title": "Red Lamp", "category": "b", "price": 7.5},
            {"item_id": "i01", "title": "Thing 1", "category": "b", "price": 1.5},
        ],
        "missing": ["nope"],
    }
    many = ",".join(f"i{i:02d}" for i in range(30))
    assert [
        i["item_id"] for i in api.get("/v1/demo/items", params={"ids": many}).json()["items"]
    ] == [f"i{i:02d}" for i in range(30)]


def test_bad_item_lookups_get_4xx_naming_ids(model: ServingModel, tables: Path) -> None:
    from serve_app.demo import MAX_LOOKUP

    api = demo_client(InProcess(model), tables)
    assert_error(api.get("/v1/demo/items"), 422, "invalid_request", "ids")
    assert_error(api.get("/v1/demo/items", params={"ids": " , "}), 422, "invalid_request", "ids")
    assert_error(
        api.get("/v1/demo/items", params={"ids": "i01,not ok"}), 422, "invalid_request", "ids"
    )
    too_many = ",".join(f"i{i}" for i in range(MAX_LOOKUP + 1))
    assert_error(api.get("/v1/demo/items", params={"ids": too_many}), 422, "invalid_request", "ids")
    assert api.get("/v1/demo/items", params={"ids": too_many.rsplit(",", 1)[0]}).status_code == 200


def test_known_users_read_only_what_the_cut_needs_and_match_a_plain_sort(tmp_path: Path) -> None:
    """Several snapshot rows per user, ties, row groups of 7 rows: the same users as sorting the
    whole table by (-event_count, user_id) and keeping each user's first row."""
    from serve_app.demo import known_users
    from serve_app.demo_catalog import CatalogIndex

    rng = np.random.default_rng(3)
    n = 200
    users = [f"u{int(u)}" for u in rng.integers(0, 60, n)]
    counts = rng.integers(0, 12, n).astype(float)
    seen = [
        [f"i{int(i):02d}" for i in rng.integers(0, 30, int(rng.integers(0, 4)))] for _ in range(n)
    ]
    path = tmp_path / "users.parquet"
    pq.write_table(
        pa.table({"user_id": users, "event_count": counts, "seen_items": seen}),
        path,
        row_group_size=7,
    )
    catalog = CatalogIndex.from_table(
        pa.table(
            {
                "item_id": [f"i{i:02d}" for i in range(30)],
                "category": [CATEGORIES[i % 3] for i in range(30)],
                "price": [1.0] * 30,
            }
        )
    )
    for max_users in (1, 5, 17, 60, 100):
        got = known_users(path, catalog, max_users)
        order = sorted(range(n), key=lambda r: (-counts[r], users[r]))
        first: dict[str, int] = {}
        for r in order:
            first.setdefault(users[r], r)
        want = list(first.values())[:max_users]
        assert [(u.user_id, u.event_count) for u in got] == [(users[r], counts[r]) for r in want]
        for u, r in zip(got, want, strict=True):
            cats = Counter(CATEGORIES[int(i[1:]) % 3] for i in dict.fromkeys(seen[r]))
            assert u.top_category == (cats.most_common(1)[0][0] if cats else None)


def test_a_preloaded_source_serves_every_route_without_loading_again(
    model: ServingModel, tables: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import serve_app.demo as demo

    loads: list[Path] = []
    real = demo.DemoTables.load

    def counting(catalog_file: Path, users_file: Path, max_users: int) -> demo.DemoTables:
        loads.append(catalog_file)
        return real(catalog_file, users_file, max_users)

    monkeypatch.setattr(demo.DemoTables, "load", counting)
    settings = ServeSettings(
        feature_store={"data_dir": tables},
        demo={"catalog_path": tables / "nope.parquet", "users_path": tables / "users.parquet"},
    )
    missing = demo.DemoSource(settings)
    asyncio.run(missing.preload())  # logged, not raised
    assert len(loads) == 1

    settings = ServeSettings(
        feature_store={"data_dir": tables},
        demo={"catalog_path": tables / "catalog.parquet", "users_path": tables / "users.parquet"},
    )
    source = demo.DemoSource(settings)
    asyncio.run(source.preload())
    assert len(loads) == 2
    backend = InProcess(model)
    api = create_api(backend, settings.api, RequestMetrics())
    mount_demo(api, backend, settings, None, source)
    client = TestClient(api, raise_server_exceptions=False)
    assert client.get("/v1/demo/catalog", params={"q": "lamp"}).json()["total"] == 1
    assert client.get("/v1/demo/users").status_code == 200
    assert client.get("/v1/demo/items", params={"ids": "i07"}).status_code == 200
    assert len(loads) == 2
