"""The stages' registry child process on real MLflow (sqlite, local files): it downloads as the
in-process path does, raises the same errors, caches what it downloads, and keeps MLflow out of
the stage replicas.

The reference is `serve_app.bundle.fetch_bundle` called in this process and the registration order
(versions 1, 2).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from serve_app.bundle import fetch_bundle
from serve_app.errors import BundleIntegrityError, ModelUnavailable, RecserveError
from serve_app.models import ChildProcessModelSource
from serve_app.registry_process import RegistryProcess
from serve_app.schemas import MANIFEST_SHA256_TAG
from tests.bundle_factory import make_tiny_bundle, rewrite_consistently, tamper_registered
from tests.conftest import TrainedBundle
from tests.fresh_interpreter import run_probe
from training.registry import CHAMPION, default_tracking_uri, register_bundle

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class CountingRegistryProcess(RegistryProcess):
    """The real child process, with a record of every spawn."""

    spawned: list[str] = field(default_factory=list)

    def call(self, command: str, tracking_uri: str, model_name: str, *args: str) -> dict[str, Any]:
        self.spawned.append(command)
        return super().call(command, tracking_uri, model_name, *args)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return default_tracking_uri(tmp_path_factory.mktemp("registry-child"))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    make_tiny_bundle(directory, n_items=20, dim=4, seed=2)
    return directory


def register_two(bundle_dir: Path, tracking_uri: str, model_name: str) -> None:
    """Versions 1 and 2 (challenger on 2), champion set on 1."""
    for _ in range(2):
        register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name=model_name)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(model_name, CHAMPION, "1")


def child_source(tracking_uri: str, model_name: str, cache_dir: Path) -> ChildProcessModelSource:
    return ChildProcessModelSource(
        tracking_uri, model_name, CHAMPION, cache_dir, registry=CountingRegistryProcess()
    )


def raised(call: Callable[[], object]) -> RecserveError:
    with pytest.raises(RecserveError) as excinfo:
        call()
    return excinfo.value


def test_a_missing_version_is_model_unavailable_with_the_same_message(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="missing")
    source = child_source(tracking_uri, "missing", tmp_path / "child")

    child = raised(lambda: source.fetch("7"))
    in_process = raised(lambda: fetch_bundle(tracking_uri, "missing", "7", tmp_path / "in"))

    assert type(child) is type(in_process) is ModelUnavailable
    assert "download of missing v7 failed" in child.message
    assert child.message == in_process.message
    assert source.registry.spawned == ["fetch"]  # type: ignore[attr-defined]
    assert list((tmp_path / "child" / "missing").iterdir()) == []  # nothing half-written


def test_a_fetch_through_the_child_caches_a_verified_copy_and_a_second_is_a_hit_without_a_child(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    register_two(bundle_dir, tracking_uri, "fetched")
    source = child_source(tracking_uri, "fetched", tmp_path / "cache")

    path = source.fetch("2")

    assert source.registry.spawned == ["fetch"]  # type: ignore[attr-defined]
    assert path == tmp_path / "cache" / "fetched" / "2"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model_version"] == "2" and manifest["model_name"] == "fetched"
    # Every bundle file arrived with the bytes that were registered (the manifest is restamped).
    for name in sorted(p.name for p in bundle_dir.iterdir() if p.name != "manifest.json"):
        digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((bundle_dir / name).read_bytes()).hexdigest(), name
    assert [p.name for p in (tmp_path / "cache" / "fetched").iterdir()] == ["2"]

    # A child cannot even start now: the hit is answered in this process.
    unreachable = CountingRegistryProcess(python=str(tmp_path / "no-such-python"))
    cached = ChildProcessModelSource(
        tracking_uri, "fetched", CHAMPION, tmp_path / "cache", registry=unreachable
    )
    assert cached.fetch("2") == path
    assert unreachable.spawned == []
    # ...and would have failed, had it been needed.
    with pytest.raises(ModelUnavailable, match="could not start"):
        cached.fetch("1")
    assert unreachable.spawned == ["fetch"]


def test_a_tampered_artifact_is_the_same_integrity_error_through_the_child_and_not_cached(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    registered = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="tampered")
    tamper_registered(registered.source_uri)
    source = child_source(tracking_uri, "tampered", tmp_path / "child")

    child = raised(lambda: source.fetch(registered.version))
    in_process = raised(
        lambda: fetch_bundle(tracking_uri, "tampered", registered.version, tmp_path / "in")
    )

    assert isinstance(child, BundleIntegrityError) and isinstance(in_process, BundleIntegrityError)
    assert child.file == in_process.file == "item_embeddings.npy"
    assert child.message == in_process.message
    assert "checksum mismatch" in child.message
    assert list((tmp_path / "child" / "tampered").iterdir()) == []


def test_a_rewritten_manifest_is_refused_through_the_child_and_untagged_passes_only_if_allowed(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    rewritten = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="rewritten")
    rewrite_consistently(rewritten.source_uri)
    source = child_source(tracking_uri, "rewritten", tmp_path / "child")

    child = raised(lambda: source.fetch(rewritten.version))
    in_process = raised(
        lambda: fetch_bundle(tracking_uri, "rewritten", rewritten.version, tmp_path / "in")
    )
    assert isinstance(child, BundleIntegrityError) and child.file == "manifest.json"
    assert child.message == in_process.message
    assert "changed in the artifact store after registration" in child.message

    untagged = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="untagged")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.delete_model_version_tag("untagged", untagged.version, MANIFEST_SHA256_TAG)
    refused = raised(lambda: child_source(tracking_uri, "untagged", tmp_path / "a").fetch("1"))
    assert f"has no {MANIFEST_SHA256_TAG} tag" in refused.message
    allowed = ChildProcessModelSource(
        tracking_uri, "untagged", CHAMPION, tmp_path / "b", allow_untagged=True
    )
    assert allowed.fetch("1") == tmp_path / "b" / "untagged" / "1"


def test_a_child_past_its_timeout_is_killed_and_model_unavailable(
    tracking_uri: str, tmp_path: Path
) -> None:
    registry = RegistryProcess(timeout_seconds=0.05)
    with pytest.raises(ModelUnavailable, match=r"took longer than 0\.05 s"):
        registry.fetch(tracking_uri, "twin", "1", tmp_path)


PROBE = """
import asyncio, json, sys
from pathlib import Path
import serve_app.deployments.ranker, serve_app.deployments.reranker, serve_app.deployments.retriever, serve_app.deployments.user_tower
from serve_app.config import ServeSettings
from serve_app.models import ChildProcessModelSource, ModelSource, VersionedStage
from serve_app.stages.ranker import RankingModel
from serve_app.stages.reranker import ReRankingModel
from serve_app.stages.retriever import RetrievalModel
import serve_app.deployments.user_tower  # the host's imports, as a replica has them
from serve_app.stages.user_tower import TowerModel

tracking_uri, cache_dir = sys.argv[1], Path(sys.argv[2])
settings = ServeSettings(
    models={"uri": "models:/probe@champion", "tracking_uri": tracking_uri, "cache_dir": cache_dir}
)
# As the router does before it warms the stages: version 1 fetched into the node's cache (through
# a child here, so this process never imports MLflow) and recorded as served.
source = ChildProcessModelSource.from_settings(settings)
source.fetch("1")
source.note_serving(["1"])
loaded = {}
for loader in (TowerModel.from_directory, RetrievalModel.from_directory, RankingModel.from_directory,
               ReRankingModel.from_directory):
    stage = VersionedStage()
    stage._init_models(settings, loader)  # loads version 1, named by the hint, from the cache
    asyncio.run(stage.warm("2"))  # as the router warms a stage before a swap: not cached before
    loaded[type(next(iter(stage._models.values()))).__name__] = sorted(stage._models)
stages = "mlflow" in sys.modules
ModelSource.from_settings(settings).resolve()  # the in-process path: the probe sees MLflow
print(json.dumps({"loaded": loaded, "mlflow": stages, "mlflow_in_process": "mlflow" in sys.modules}))
"""


@pytest.mark.slow
def test_stage_replicas_load_registered_versions_without_importing_mlflow(
    trained_bundle: TrainedBundle, tracking_uri: str, tmp_path: Path
) -> None:
    # A bundle every stage can serve (the tiny factory bundle predates the serving contract).
    register_two(trained_bundle.bundle_dir, tracking_uri, "probe")
    result = run_probe(PROBE, tracking_uri, str(tmp_path / "cache"), timeout=600)
    assert result == {
        "loaded": {
            name: ["1", "2"]
            for name in ("TowerModel", "RetrievalModel", "RankingModel", "ReRankingModel")
        },
        "mlflow": False,
        "mlflow_in_process": True,
    }
    cached = sorted(p.name for p in (tmp_path / "cache" / "probe").iterdir())
    assert cached == ["1", "2", "serving.json"]
