"""Registry round trip on real MLflow (sqlite, local files): register, fetch, promote, roll back."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from serve_app.bundle import fetch_bundle, load_bundle, resolve_alias, verify_bundle
from serve_app.errors import BundleIntegrityError, ModelUnavailable
from serve_app.schemas import MANIFEST_SHA256_TAG
from tests.bundle_factory import make_tiny_bundle, rewrite_consistently, tamper_registered
from training.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    RegistryError,
    default_tracking_uri,
    pin_manifest,
    promote,
    register_bundle,
    rollback,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One MLflow database per module (its schema takes seconds to build); one model name per test.
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def tracking_uri(data_dir: Path) -> str:
    return default_tracking_uri(data_dir)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    make_tiny_bundle(directory, n_items=20, dim=4, seed=1)
    return directory


def _aliases(tracking_uri: str, model_name: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return {k: str(v) for k, v in client.get_registered_model(model_name).aliases.items()}


def _register(bundle_dir: Path, tracking_uri: str, model_name: str, ndcg: float) -> str:
    return register_bundle(
        bundle_dir, tracking_uri=tracking_uri, model_name=model_name, metrics={"ndcg@10": ndcg}
    ).version


def test_register_twice_gives_versions_1_and_2_with_challenger_on_2(
    bundle_dir: Path, tracking_uri: str, data_dir: Path
) -> None:
    first = register_bundle(
        bundle_dir, tracking_uri=tracking_uri, model_name="reg", metrics={"ndcg@10": 0.25}
    )
    second = register_bundle(
        bundle_dir, tracking_uri=tracking_uri, model_name="reg", params={"epochs": 3}
    )
    assert (first.version, second.version) == ("1", "2")
    assert _aliases(tracking_uri, "reg") == {CHALLENGER: "2"}

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED"
    # '@' is not allowed in MLflow keys; the manifest's metrics are logged unless overridden.
    assert run.data.metrics == {"ndcg_at_10": 0.30, "recall_at_100": 0.50}
    assert client.get_run(first.run_id).data.metrics["ndcg_at_10"] == 0.25
    assert run.data.params["epochs"] == "3" and run.data.params["seed"] == "1"
    assert client.get_model_version("reg", "2").run_id == second.run_id
    # Plain artifacts under the configured location next to the database, not an MLflow model.
    assert second.source_uri.startswith((data_dir / "mlartifacts").as_uri())
    artifacts = {Path(a.path).name for a in client.list_artifacts(second.run_id, "bundle")}
    assert "manifest.json" in artifacts and "MLmodel" not in artifacts


def test_fetch_by_alias_returns_a_verified_bundle_stamped_with_its_version(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    _register(bundle_dir, tracking_uri, "fetch", 0.3)
    _register(bundle_dir, tracking_uri, "fetch", 0.3)

    version = resolve_alias(tracking_uri, "fetch", CHALLENGER)
    path = fetch_bundle(tracking_uri, "fetch", version, tmp_path / "cache")

    assert version == "2"
    assert path == tmp_path / "cache" / "fetch" / "2"
    manifest = verify_bundle(path)
    assert manifest.model_version == "2" and manifest.model_name == "fetch"
    assert load_bundle(path).manifest.num_items == 20
    # Nothing left behind from the download besides the version directory.
    assert [p.name for p in (tmp_path / "cache" / "fetch").iterdir()] == ["2"]


def test_unknown_alias_is_model_unavailable(bundle_dir: Path, tracking_uri: str) -> None:
    _register(bundle_dir, tracking_uri, "noalias", 0.3)
    with pytest.raises(ModelUnavailable, match="no alias 'champion'"):
        resolve_alias(tracking_uri, "noalias", CHAMPION)


def test_second_fetch_is_served_from_cache_without_mlflow(
    bundle_dir: Path, tracking_uri: str, data_dir: Path, tmp_path: Path
) -> None:
    version = _register(bundle_dir, tracking_uri, "cached", 0.3)
    first = fetch_bundle(tracking_uri, "cached", version, tmp_path / "cache")
    stamp = (first.stat().st_mtime_ns, (first / "manifest.json").stat().st_mtime_ns)

    aside = data_dir.parent / f"{data_dir.name}-aside"
    aside.mkdir()
    shutil.move(data_dir / "mlflow.db", aside / "mlflow.db")
    shutil.move(data_dir / "mlartifacts", aside / "mlartifacts")
    try:
        second = fetch_bundle(tracking_uri, "cached", version, tmp_path / "cache")
        # Had MLflow been touched, it would have created a fresh database at the tracking URI.
        assert not (data_dir / "mlflow.db").exists()
    finally:
        shutil.move(aside / "mlflow.db", data_dir / "mlflow.db")
        shutil.move(aside / "mlartifacts", data_dir / "mlartifacts")
        aside.rmdir()
    assert second == first
    assert (second.stat().st_mtime_ns, (second / "manifest.json").stat().st_mtime_ns) == stamp


def test_tampered_registered_artifact_is_refused_and_not_cached(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    registered = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="tampered")
    tamper_registered(registered.source_uri)

    with pytest.raises(BundleIntegrityError, match=r"item_embeddings\.npy: checksum mismatch"):
        fetch_bundle(tracking_uri, "tampered", registered.version, tmp_path / "cache")
    assert list((tmp_path / "cache" / "tampered").iterdir()) == []


def test_registration_pins_the_sha256_of_the_stored_manifest_as_a_version_tag(
    bundle_dir: Path, tracking_uri: str
) -> None:
    registered = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="pinned")
    stored = Path(registered.source_uri.removeprefix("file://")) / "manifest.json"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags = client.get_model_version("pinned", registered.version).tags
    assert tags[MANIFEST_SHA256_TAG] == hashlib.sha256(stored.read_bytes()).hexdigest()
    # The stored manifest is the stamped one (it names its version), not the local directory's.
    assert (
        tags[MANIFEST_SHA256_TAG]
        != hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    )


def test_files_and_manifest_rewritten_together_in_the_store_are_refused_and_not_cached(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    registered = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="rewritten")
    rewrite_consistently(registered.source_uri, "ranker.ubj")

    with pytest.raises(BundleIntegrityError) as refused:
        fetch_bundle(tracking_uri, "rewritten", registered.version, tmp_path / "cache")
    assert refused.value.file == "manifest.json"
    assert "changed in the artifact store after registration" in refused.value.message
    assert list((tmp_path / "cache" / "rewritten").iterdir()) == []
    # Nothing else was wrong with it: the files agree with the rewritten manifest.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.delete_model_version_tag("rewritten", registered.version, MANIFEST_SHA256_TAG)
    path = fetch_bundle(
        tracking_uri, "rewritten", registered.version, tmp_path / "cache", allow_untagged=True
    )
    served = (path / "ranker.ubj").read_bytes()
    assert served == (bundle_dir / "ranker.ubj").read_bytes() + b"tampered"


def test_a_version_without_the_tag_is_refused_unless_untagged_versions_are_allowed(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    registered = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="untagged")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.delete_model_version_tag("untagged", registered.version, MANIFEST_SHA256_TAG)

    with pytest.raises(BundleIntegrityError, match=f"has no {MANIFEST_SHA256_TAG} tag"):
        fetch_bundle(tracking_uri, "untagged", registered.version, tmp_path / "cache")
    assert list((tmp_path / "cache" / "untagged").iterdir()) == []
    path = fetch_bundle(
        tracking_uri, "untagged", registered.version, tmp_path / "cache", allow_untagged=True
    )
    assert verify_bundle(path).model_version == registered.version


def test_pinning_an_untagged_version_lets_it_be_served_and_never_moves_a_pin(
    bundle_dir: Path, tracking_uri: str, tmp_path: Path
) -> None:
    old = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="legacy")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.delete_model_version_tag("legacy", old.version, MANIFEST_SHA256_TAG)  # as before #29
    stored = Path(old.source_uri.removeprefix("file://")) / "manifest.json"

    digest = pin_manifest(tracking_uri, "legacy", old.version)

    assert digest == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert client.get_model_version("legacy", old.version).tags[MANIFEST_SHA256_TAG] == digest
    assert verify_bundle(fetch_bundle(tracking_uri, "legacy", old.version, tmp_path / "c")).files
    with pytest.raises(RegistryError, match="pinned already"):
        pin_manifest(tracking_uri, "legacy", old.version)
    # A version whose files no longer match its manifest is not pinned.
    broken = register_bundle(bundle_dir, tracking_uri=tracking_uri, model_name="legacy")
    client.delete_model_version_tag("legacy", broken.version, MANIFEST_SHA256_TAG)
    tamper_registered(broken.source_uri)
    with pytest.raises(RegistryError, match=r"checksum mismatch for 'item_embeddings\.npy'"):
        pin_manifest(tracking_uri, "legacy", broken.version)
    assert MANIFEST_SHA256_TAG not in client.get_model_version("legacy", broken.version).tags


def test_promotion_is_gated_by_relative_margin_and_force_overrides(
    bundle_dir: Path, tracking_uri: str
) -> None:
    _register(bundle_dir, tracking_uri, "gate", 0.300)
    first = promote(tracking_uri=tracking_uri, model_name="gate")
    assert first.promoted and first.from_version is None and first.to_version == "1"
    assert "no champion yet" in first.reason

    _register(bundle_dir, tracking_uri, "gate", 0.303)  # +1 %: below the 2 % margin (needs 0.306)
    refused = promote(tracking_uri=tracking_uri, model_name="gate", margin=0.02)
    assert not refused.promoted
    assert (refused.from_version, refused.to_version) == ("1", "2")
    assert (refused.from_value, refused.to_value) == (0.300, 0.303)
    assert any("0.3060" in line for line in refused.evidence)
    assert any("+1.00%" in line for line in refused.evidence)
    assert _aliases(tracking_uri, "gate")[CHAMPION] == "1"

    forced = promote(tracking_uri=tracking_uri, model_name="gate", margin=0.02, force=True)
    assert forced.promoted and "forced" in forced.reason
    aliases = _aliases(tracking_uri, "gate")
    assert (aliases[CHAMPION], aliases[PREVIOUS_CHAMPION]) == ("2", "1")

    _register(bundle_dir, tracking_uri, "gate", 0.310)  # +2.3 % over 0.303: passes
    passed = promote(tracking_uri=tracking_uri, model_name="gate", margin=0.02)
    assert passed.promoted and (passed.from_version, passed.to_version) == ("2", "3")

    worse = promote(tracking_uri=tracking_uri, model_name="gate", version="1")
    assert not worse.promoted and worse.reason.startswith("refused")
    assert _aliases(tracking_uri, "gate")[CHAMPION] == "3"


def test_rollback_restores_previous_champion_once(bundle_dir: Path, tracking_uri: str) -> None:
    _register(bundle_dir, tracking_uri, "roll", 0.30)
    assert promote(tracking_uri=tracking_uri, model_name="roll").promoted
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(tracking_uri=tracking_uri, model_name="roll")

    _register(bundle_dir, tracking_uri, "roll", 0.40)
    assert promote(tracking_uri=tracking_uri, model_name="roll").promoted
    decision = rollback(tracking_uri=tracking_uri, model_name="roll")

    assert decision.promoted and (decision.from_version, decision.to_version) == ("2", "1")
    assert (decision.from_value, decision.to_value) == (0.40, 0.30)
    assert _aliases(tracking_uri, "roll") == {CHAMPION: "1", CHALLENGER: "2"}
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(tracking_uri=tracking_uri, model_name="roll")
