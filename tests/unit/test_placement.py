"""Placement: the presets and custom groups resolve to the deployment names the chart mirrors, a bad
value is refused naming the setting, the config and CLI print what a placement yields, the chain's
fallbacks are the same whatever the grouping, and the stage logic imports no Ray."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.chain import FallbackLists, Progress, advance, ranker_order
from serve_app.cli import build_parser, main, settings_overrides
from serve_app.config import ServeSettings, deployment_options, serve_config
from serve_app.placement import (
    FINAL,
    STAGES,
    Group,
    PlacementError,
    deployment_names,
    resolve_placement,
)
from serve_app.stages.ranker import score_batch
from serve_app.stages.records import (
    Filters,
    Query,
    Recommendations,
    UserState,
    cold_user,
    retrieval_order,
)
from serve_app.stages.reranker import popular_batch, rerank_batch
from serve_app.stages.retriever import retrieve_batch
from tests.unit.test_recommend import make_model
from tests.unit.test_stage_batches import RANKING, users

STAGES_DIR = Path(__file__).resolve().parents[2] / "serve_app" / "stages"


def test_presets_name_the_deployments_the_chart_mirrors() -> None:
    assert resolve_placement("split") == (
        Group("UserTower", ("user_tower",)),
        Group("Retriever", ("retriever",)),
        Group("Ranker", ("ranker",)),
        Group("ReRanker", ("reranker",)),
    )
    assert resolve_placement("two-tier") == (
        Group("Retrieval", ("user_tower", "retriever")),
        Group("Ranking", ("ranker", "reranker")),
    )
    (fused,) = resolve_placement("fused")
    assert fused.stages == STAGES and fused.in_ingress
    assert deployment_names("fused") == []  # the chain runs in the Ingress: no stage deployment


def test_custom_groups_are_named_by_their_stages() -> None:
    groups = resolve_placement([["user_tower", "retriever", "ranker"], ["reranker"]])
    assert [g.name for g in groups] == ["UserTowerRetrieverRanker", "ReRanker"]
    assert [
        g.name for g in resolve_placement([["user_tower"], ["retriever", "ranker", "reranker"]])
    ] == [
        "UserTower",
        "RetrieverRankerReRanker",
    ]
    # The named cuts keep their names when spelled out; the whole chain as a deployment: Pipeline.
    assert deployment_names('[["user_tower", "retriever"], ["ranker", "reranker"]]') == [
        "Retrieval",
        "Ranking",
    ]
    (pipeline,) = resolve_placement([list(STAGES)])
    assert pipeline == Group("Pipeline", STAGES) and not pipeline.in_ingress


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fuse", "unknown preset 'fuse'"),
        (
            [["user_tower", "retriever"], ["reranker", "ranker"]],
            "consecutive stages in chain order",
        ),
        (
            [["retriever"], ["user_tower", "ranker", "reranker"]],
            "consecutive stages in chain order",
        ),
        ([["user_tower", "retriever", "ranker"]], "missing reranker"),
        ([["user_tower", "retriever"], ["retriever", "ranker", "reranker"]], "repeated retriever"),
        ([["user_tower", "retriever", "ranker", "reranker", "explainer"]], "unknown stage"),
        ([["user_tower", "retriever", "ranker", "reranker"], []], "at least one stage"),
        ("[[", "not a JSON list"),
    ],
)
def test_a_bad_placement_is_refused_naming_the_setting(value: Any, message: str) -> None:
    with pytest.raises(PlacementError, match=message) as excinfo:
        resolve_placement(value)
    assert str(excinfo.value).startswith("placement: ")
    with pytest.raises(ValidationError, match="placement"):
        ServeSettings(placement=value)


def test_the_setting_comes_from_the_environment_as_a_name_or_a_json_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ServeSettings().placement == "split"
    monkeypatch.setenv("RECSERVE_PLACEMENT", "two-tier")
    assert ServeSettings().placement == "two-tier"
    monkeypatch.setenv("RECSERVE_PLACEMENT", '[["user_tower","retriever","ranker"],["reranker"]]')
    assert ServeSettings().placement == [["user_tower", "retriever", "ranker"], ["reranker"]]


@pytest.mark.parametrize(
    ("placement", "stage_deployments"),
    [
        ("split", ["UserTower", "Retriever", "Ranker", "ReRanker"]),
        ("two-tier", ["Retrieval", "Ranking"]),
        ("fused", []),
        ([list(STAGES)], ["Pipeline"]),
        (
            [["user_tower", "retriever", "ranker"], ["reranker"]],
            ["UserTowerRetrieverRanker", "ReRanker"],
        ),
    ],
)
def test_the_serve_config_holds_the_placements_deployments_each_with_its_options(
    placement: Any, stage_deployments: list[str]
) -> None:
    config = serve_config({}, placement=placement)
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert [d.name for d in app.deployments] == ["Ingress", *stage_deployments, "EventWriter"]
    assert config["applications"][0]["args"]["settings"]["placement"] == placement
    assert "placement_deployments" not in config  # only the file's own key, never printed
    options = deployment_options(config)
    for name in stage_deployments:
        assert options[name]["user_config"]["batching"]["max_batch_size"] >= 1, name
        assert options[name]["max_queued_requests"] > 0, name
    at_max = sum(
        o["ray_actor_options"]["num_cpus"] * o["autoscaling_config"]["max_replicas"]
        for o in options.values()
    )
    assert at_max <= 2.0 + 1e-9  # every placement fits the 2-core node it is sized for


def test_overrides_reach_a_group_and_name_the_placement_when_unknown() -> None:
    config = serve_config(
        {
            "RECSERVE_PLACEMENT": "two-tier",
            "RECSERVE_DEPLOYMENT__RANKING__MAX_ONGOING_REQUESTS": "5",
        }
    )
    assert deployment_options(config)["Ranking"]["max_ongoing_requests"] == 5
    with pytest.raises(ValueError, match="no deployment named 'RANKER' in placement 'two-tier'"):
        serve_config(
            {"RECSERVE_DEPLOYMENT__RANKER__MAX_ONGOING_REQUESTS": "5"}, placement="two-tier"
        )


def test_recserve_serve_config_prints_the_deployments_of_the_placement(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "--placement", "two-tier"]) == 0
    out = capsys.readouterr().out
    assert "#   Retrieval: user_tower + retriever\n#   Ranking: ranker + reranker\n" in out
    names = [d["name"] for d in yaml.safe_load(out)["applications"][0]["deployments"]]
    assert names == ["Ingress", "Retrieval", "Ranking", "EventWriter"]
    assert main(["config", "--placement", "fused"]) == 0
    out = capsys.readouterr().out
    assert "#   Ingress: user_tower + retriever + ranker + reranker (in the Ingress replica" in out
    with pytest.raises(SystemExit):
        main(["config", "--placement", '[["ranker"], ["user_tower", "retriever", "reranker"]]'])
    assert (
        "argument --placement: placement: groups must hold consecutive" in capsys.readouterr().err
    )


def test_no_module_of_the_stages_imports_ray() -> None:
    modules = sorted(STAGES_DIR.glob("*.py"))
    assert len(modules) >= 5  # the four stages and their records: the rule checks real files
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "ray" or n.startswith("ray.") for n in names), (path.name, names)


# --- the chain's fallbacks are the same in a group and across hops -------------------------------


class Stages:
    """The stage functions of one tiny bundle; `failing` stages raise as a dead stage would."""

    def __init__(self, failing: set[str]) -> None:
        self.model = make_model()
        self.failing = failing
        self.calls: list[str] = []

    async def call(self, name: str, batch: list[Any]) -> list[Any] | None:
        self.calls.append(name)
        if name in self.failing or (name == "popular" and "reranker" in self.failing):
            return None
        m = self.model
        if name == "retriever":
            return retrieve_batch(m.retrieval, batch, RANKING)
        if name == "ranker":
            return score_batch(m.ranking, batch)
        if name == "reranker":
            return rerank_batch(m.reranking, batch, RANKING)
        assert name == "popular"
        return popular_batch(m.reranking, batch, RANKING)

    async def popular(self, batch: list[UserState]) -> list[Recommendations]:
        raise AssertionError("the re-ranker's popular answers unless it is failing")

    async def ranker_order(self, scored: list[Any]) -> list[Recommendations]:
        return [ranker_order(s, self.model.reranking.catalog.item_ids) for s in scored]


def through(
    stages: Stages, groups: list[list[str]], start: list[UserState]
) -> list[Recommendations]:
    async def run() -> Progress:
        progress = Progress(STAGES.index("retriever"), start)
        for group in groups:
            progress = await advance(progress, group, stages.call, stages)
        return progress

    progress = asyncio.run(run())
    assert progress.at == FINAL
    return progress.batch


def listing(results: list[Recommendations]) -> list[Any]:
    return [
        (r.request_id, r.fallback, [(i.item_id, i.score, i.source) for i in r.items])
        for r in results
    ]


@pytest.mark.parametrize("failing", [set(), {"retriever"}, {"ranker"}, {"reranker"}])
def test_a_failing_stage_is_answered_around_the_same_in_a_group_and_across_hops(
    failing: set[str],
) -> None:
    start = users(make_model(), make_model().version)
    fused = through(Stages(failing), [["retriever", "ranker", "reranker"]], start)
    split = through(Stages(failing), [["retriever"], ["ranker"], ["reranker"]], start)
    assert listing(fused) == listing(split)
    heavy = fused[0]  # a known user with a vector: degraded by any failing stage, whole otherwise
    assert heavy.fallback == ("degraded" if failing else None)
    model = make_model()
    if failing == {"retriever"}:  # popularity lists through the re-ranker's rules
        assert listing(fused) == listing(popular_batch(model.reranking, start, RANKING))
    if failing == {"ranker"}:  # the re-ranker over retrieval order
        candidates = retrieve_batch(model.retrieval, start, RANKING)
        expected = rerank_batch(model.reranking, [retrieval_order(c) for c in candidates], RANKING)
        assert listing(fused) == listing(expected)


def test_a_failing_retriever_skips_the_ranker_and_asks_the_reranker_for_popular_lists() -> None:
    stages = Stages({"retriever"})
    through(stages, [["retriever"], ["ranker"], ["reranker"]], users(make_model(), "7"))
    assert stages.calls == ["retriever", "popular"]


def test_the_ingress_answers_alone_from_small_popularity_lists_by_segment_and_filters() -> None:
    lists = FallbackLists(
        version="7",
        top=(("i1", "a"), ("i2", "b"), ("i3", "a"), ("i4", "c"), ("i5", "b")),
        by_category={"a": ("i1", "i3", "i6"), "b": ("i2", "i5"), "c": ("i4",)},
    )

    def answer(**query: Any) -> list[str]:
        result = lists.answer(
            cold_user(Query("r", "u", query.pop("k", 3), model_version="7", **query))
        )
        assert result.fallback == "degraded" and {i.source for i in result.items} == {"popularity"}
        return [i.item_id for i in result.items]

    assert answer() == ["i1", "i2", "i3"]  # the global order
    assert answer(segment="b") == ["i2", "i5", "i1"]  # the segment's items first, then global
    assert answer(k=4, filters=Filters(exclude_categories=frozenset({"a"}))) == ["i2", "i4", "i5"]
    assert answer(filters=Filters(categories=frozenset({"a"}))) == ["i1", "i3", "i6"]
    assert answer(filters=Filters(exclude_item_ids=frozenset({"i1"}))) == ["i2", "i3", "i4"]


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_the_placement_flag_of_serve_and_demo_reaches_the_settings(command: str) -> None:
    args = build_parser().parse_args([command, "--placement", "fused"])
    assert ServeSettings(**settings_overrides(args)).placement == "fused"
    custom = '[["user_tower","retriever","ranker"],["reranker"]]'
    args = build_parser().parse_args([command, "--placement", custom])
    assert ServeSettings(**settings_overrides(args)).placement == [
        ["user_tower", "retriever", "ranker"],
        ["reranker"],
    ]
    # Without the flag the environment (or split) decides: nothing is set here.
    assert "placement" not in settings_overrides(build_parser().parse_args([command]))


def test_under_fused_the_ingress_takes_one_replica_per_core_and_the_others_keep_theirs() -> None:
    fused = deployment_options(serve_config({}, placement="fused"))["Ingress"]
    split = deployment_options(serve_config({}, placement="split"))["Ingress"]
    assert (
        fused["autoscaling_config"]["min_replicas"]
        == fused["autoscaling_config"]["max_replicas"]
        == 2
    )
    assert fused["ray_actor_options"]["num_cpus"] > split["ray_actor_options"]["num_cpus"]
    assert fused["user_config"] == split["user_config"]  # only what the file's fused_ingress names
    assert split["autoscaling_config"]["max_replicas"] == 1
