"""Registry side of the model bundle: checksum it, register it in MLflow, promote, roll back.

A bundle is plain run artifacts under `bundle/` (never an MLflow pyfunc model) registered as one
model version; serving finds it by alias (`champion`, `challenger`) via `serve_app.bundle`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from serve_app.schemas import (
    BUNDLE_FILES,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_SHA256_TAG,
    RETIRED_BUNDLE_FILES,
    BundleManifest,
)

if TYPE_CHECKING:
    from training.online_gate import OnlineEvidence

DEFAULT_MODEL_NAME = "recserve"
DEFAULT_EXPERIMENT = "recserve"
DEFAULT_METRIC = "ndcg@10"
CHAMPION = "champion"
CHALLENGER = "challenger"
# Set on every promotion to the champion it replaced, so a rollback needs no history search.
PREVIOUS_CHAMPION = "previous_champion"
MANIFEST_NAME = "manifest.json"
BUNDLE_ARTIFACT_PATH = "bundle"

# MLflow limits (mlflow.utils.validation); kept here so a long config never fails a registration.
_MAX_PARAM_VALUE = 6000
_MAX_PARAMS_PER_BATCH = 100
_MLFLOW_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class RegistryError(RuntimeError):
    """A registry operation cannot be done (bad bundle, unknown version, nothing to roll back)."""


@dataclass(frozen=True)
class RegisteredBundle:
    """Where a registered bundle lives: model version, the run that logged it, its artifacts."""

    version: str
    run_id: str
    source_uri: str


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of `promote`/`rollback`, with the numbers behind it as printable `evidence` lines
    (offline) and the online A/B comparison it was given, if any."""

    promoted: bool
    action: str  # "promote" or "rollback"
    metric: str
    from_version: str | None  # champion before the decision
    to_version: str | None  # version considered for champion
    from_value: float | None
    to_value: float | None
    reason: str
    evidence: tuple[str, ...]
    online: OnlineEvidence | None = None


# --- bundle files -----------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so large embedding tables never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def finalize_bundle(bundle_dir: str | Path, manifest: BundleManifest) -> BundleManifest:
    """Checksum every file of `bundle_dir` into `manifest.files` and write `manifest.json`.

    Every regular file except the manifest itself is listed, so nothing in the directory goes
    unverified. Sub-directories are refused: the format is flat and the verifier would skip them.
    So is a file the format retired (`user_tower.pt`: the tower ships once, as `user_tower.npz`).
    The manifest is written in the current format version, whatever `manifest` said.
    """
    directory = Path(bundle_dir)
    files: dict[str, str] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name == MANIFEST_NAME:
            continue
        if not entry.is_file():
            raise RegistryError(f"bundle {directory}: '{entry.name}' is not a regular file")
        if entry.name in RETIRED_BUNDLE_FILES:
            raise RegistryError(
                f"bundle {directory}: '{entry.name}' is not part of bundle format "
                f"{BUNDLE_FORMAT_VERSION} (the user tower ships once, as user_tower.npz)"
            )
        files[entry.name] = sha256_file(entry)
    missing = [name for name in BUNDLE_FILES if name not in files]
    if missing:
        raise RegistryError(f"bundle {directory}: missing required files {missing}")
    final = manifest.model_copy(update={"files": files, "format_version": BUNDLE_FORMAT_VERSION})
    write_manifest(directory, final)
    return final


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> Path:
    """Write `manifest.json` as pretty, key-sorted JSON (people read it as well as loaders)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    """Parse `manifest.json` of a bundle directory."""
    return BundleManifest.model_validate_json((Path(bundle_dir) / MANIFEST_NAME).read_text())


def check_bundle(bundle_dir: str | Path) -> BundleManifest:
    """Refuse to register a bundle whose files do not match its manifest (same rules as serving)."""
    directory = Path(bundle_dir)
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as exc:
        raise RegistryError(f"bundle {directory}: unreadable {MANIFEST_NAME}: {exc}") from exc
    if manifest.format_version != BUNDLE_FORMAT_VERSION:
        raise RegistryError(
            f"bundle {directory}: format_version {manifest.format_version}, "
            f"expected {BUNDLE_FORMAT_VERSION}"
        )
    for name in BUNDLE_FILES:
        if name not in manifest.files:
            raise RegistryError(f"bundle {directory}: {MANIFEST_NAME} does not list '{name}'")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise RegistryError(f"bundle {directory}: listed file '{name}' is missing")
        if sha256_file(path) != expected:
            raise RegistryError(f"bundle {directory}: checksum mismatch for '{name}'")
    return manifest


# --- MLflow plumbing --------------------------------------------------------------------------


def default_tracking_uri(data_dir: str | Path) -> str:
    """The embedded registry used when no tracking server is configured: sqlite in data_dir."""
    return f"sqlite:///{Path(data_dir).resolve() / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """`<db dir>/mlartifacts` for a sqlite tracking URI; None (the server decides) otherwise.

    Without an explicit location MLflow writes artifacts relative to the current directory, which
    would scatter bundles wherever the CLI happened to be started.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0]).resolve()
    return (db_path.parent / "mlartifacts").as_uri()


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts: `ndcg@10` -> `ndcg_at_10` (MLflow refuses '@')."""
    return _MLFLOW_KEY_BAD_CHARS.sub("_", name.replace("@", "_at_"))


def _client(tracking_uri: str) -> MlflowClient:
    # Registry and tracking share one store; passing both keeps MLFLOW_REGISTRY_URI out of it.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_missing(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifact_location))


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        client.create_registered_model(model_name)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:_MAX_PARAM_VALUE]


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"registered model '{model_name}' not found") from exc
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


# --- registration -----------------------------------------------------------------------------


def register_bundle(
    bundle_dir: str | Path,
    *,
    tracking_uri: str,
    model_name: str = DEFAULT_MODEL_NAME,
    experiment: str = DEFAULT_EXPERIMENT,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    artifact_location: str | None = None,
) -> RegisteredBundle:
    """Log a finalized bundle as one MLflow run, register a new version, alias it `challenger`.

    The version is created first, pointing at the run's (still empty) `bundle/` artifact folder, so
    its number can be stamped into the manifest that is then logged: the registered artifact knows
    its own version. The sha256 of that manifest is set as the version's `MANIFEST_SHA256_TAG`
    (serving refuses a bundle whose manifest no longer has it). The alias is set last, so no alias
    ever points at a half-logged or untagged version; on
    failure the run is marked FAILED and the version deleted. `metrics`/`params` default to (and
    override) the manifest's; metric names are logged with `mlflow_key`.
    """
    directory = Path(bundle_dir)
    try:
        manifest = check_bundle(directory)
    except RegistryError as exc:
        raise RegistryError(f"refusing to register: {exc}") from exc
    all_metrics = {**manifest.metrics, **(metrics or {})}
    all_params = {**manifest.params, **(params or {})}

    client = _client(tracking_uri)
    location = artifact_location or default_artifact_location(tracking_uri)
    experiment_id = _ensure_experiment(client, experiment, location)
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={
            "recserve.model_name": model_name,
            "recserve.data_snapshot_id": manifest.data_snapshot_id,
            "recserve.bundle_format_version": str(manifest.format_version),
        },
    )
    run_id = run.info.run_id
    source_uri = f"{run.info.artifact_uri.rstrip('/')}/{BUNDLE_ARTIFACT_PATH}"
    version: str | None = None
    try:
        now_ms = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(mlflow_key(k), float(v), now_ms, 0)
                for k, v in sorted(all_metrics.items())
                if math.isfinite(float(v))
            ],
        )
        param_list = [Param(mlflow_key(k), _param_value(v)) for k, v in sorted(all_params.items())]
        for start in range(0, len(param_list), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=param_list[start : start + _MAX_PARAMS_PER_BATCH])

        _ensure_registered_model(client, model_name)
        model_version = client.create_model_version(
            model_name,
            source_uri,
            run_id=run_id,
            tags={"data_snapshot_id": manifest.data_snapshot_id},
            description=f"recserve bundle, data snapshot {manifest.data_snapshot_id}",
        )
        version = str(model_version.version)

        for name in sorted(manifest.files):
            client.log_artifact(run_id, str(directory / name), BUNDLE_ARTIFACT_PATH)
        stamped = manifest.model_copy(update={"model_version": version, "model_name": model_name})
        with tempfile.TemporaryDirectory() as tmp:
            manifest_path = write_manifest(tmp, stamped)
            client.log_artifact(run_id, str(manifest_path), BUNDLE_ARTIFACT_PATH)
            # The digest of the bytes just uploaded, kept in the registry's database rather than
            # the artifact store: rewriting the files and their manifest there together no longer
            # passes serving's check (serve_app.bundle.check_manifest_digest).
            client.set_model_version_tag(
                model_name, version, MANIFEST_SHA256_TAG, sha256_file(manifest_path)
            )

        client.set_registered_model_alias(model_name, CHALLENGER, version)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        if version is not None:
            client.delete_model_version(model_name, version)
        raise
    client.set_terminated(run_id, "FINISHED")
    return RegisteredBundle(version=version, run_id=run_id, source_uri=source_uri)


def pin_manifest(tracking_uri: str, model_name: str, version: str) -> str:
    """Tag a version registered without `MANIFEST_SHA256_TAG` (before recserve recorded it) with the
    sha256 of its stored manifest, after checking every stored file against that manifest; returns
    the digest. Trust on first use: run it only for versions whose artifacts you trust now. A
    version that has the tag keeps it (RegistryError: a pin is never moved)."""
    client = _client(tracking_uri)
    try:
        model_version = client.get_model_version(model_name, version)
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"model '{model_name}' has no version {version}") from exc
        raise
    pinned = model_version.tags.get(MANIFEST_SHA256_TAG)
    if pinned:
        raise RegistryError(
            f"{model_name} v{version} is pinned already ({MANIFEST_SHA256_TAG}={pinned[:12]}...)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        source = client.get_model_version_download_uri(model_name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        check_bundle(local)  # every file as the manifest lists it: what is pinned is whole
        digest = sha256_file(local / MANIFEST_NAME)
    client.set_model_version_tag(model_name, version, MANIFEST_SHA256_TAG, digest)
    return digest


# --- promotion --------------------------------------------------------------------------------


def version_metric(
    tracking_uri: str, model_name: str, version: str, metric: str = DEFAULT_METRIC
) -> float | None:
    """A version's offline metric: its run's logged value, else the manifest's; None if neither."""
    return _version_metric(_client(tracking_uri), tracking_uri, model_name, version, metric)


def _version_metric(
    client: MlflowClient, tracking_uri: str, model_name: str, version: str, metric: str
) -> float | None:
    try:
        model_version = client.get_model_version(model_name, version)
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"model '{model_name}' has no version {version}") from exc
        raise
    if model_version.run_id:
        run_metrics = client.get_run(model_version.run_id).data.metrics
        if mlflow_key(metric) in run_metrics:
            return float(run_metrics[mlflow_key(metric)])
    # Versions registered by hand (no run, or metrics not logged) still carry their manifest.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # Not a `models:/` URI: MLflow would resolve that against its global registry URI.
            source = client.get_model_version_download_uri(model_name, version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/{MANIFEST_NAME}",
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            manifest = BundleManifest.model_validate_json(Path(local).read_text())
        except (MlflowException, OSError, ValueError):
            return None
    value = manifest.metrics.get(metric)
    return None if value is None else float(value)


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4f}"


def promote(
    *,
    tracking_uri: str,
    model_name: str = DEFAULT_MODEL_NAME,
    metric: str = DEFAULT_METRIC,
    margin: float = 0.02,
    force: bool = False,
    version: str | None = None,
    online: OnlineEvidence | None = None,
) -> PromotionDecision:
    """Move `champion` to the challenger (or `version`) if its metric beats the champion's.

    The gate is relative and assumes higher is better: candidate > champion and candidate >=
    champion * (1 + margin). With no champion yet the candidate is promoted; a missing metric on
    either side refuses unless `force`. `online` evidence that applies and did not pass (the
    treatment's CTR is significantly worse) refuses as well, unless `force`. The replaced champion
    is kept as `previous_champion`.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    client = _client(tracking_uri)
    aliases = _aliases(client, model_name)
    candidate = str(version) if version is not None else aliases.get(CHALLENGER)
    if candidate is None:
        raise RegistryError(
            f"model '{model_name}' has no '{CHALLENGER}' alias and no version given"
        )
    champion = aliases.get(CHAMPION)
    to_value = _version_metric(client, tracking_uri, model_name, candidate, metric)
    from_value = (
        None
        if champion is None
        else _version_metric(client, tracking_uri, model_name, champion, metric)
    )

    evidence = [
        f"metric: {metric} (higher is better), margin: {margin:.2%}, force: {force}",
        f"candidate v{candidate}: {metric} = {_fmt(to_value)}",
        f"champion {'none' if champion is None else 'v' + champion}: {metric} = {_fmt(from_value)}",
    ]

    def decide(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promoted=promoted,
            action="promote",
            metric=metric,
            from_version=champion,
            to_version=candidate,
            from_value=from_value,
            to_value=to_value,
            reason=reason,
            evidence=tuple(evidence),
            online=online,
        )

    if champion == candidate:
        return decide(False, f"v{candidate} is already the champion")

    if champion is None:
        passed, why = True, "no champion yet"
    elif to_value is None or from_value is None:
        side = "candidate" if to_value is None else "champion"
        passed, why = False, f"{side} has no '{metric}' to compare"
    else:
        required = from_value * (1 + margin)
        change = (to_value - from_value) / from_value if from_value else math.inf
        evidence.append(f"required: >= {required:.4f} (champion x (1 + margin))")
        evidence.append(f"relative change: {change:+.2%}")
        passed = to_value > from_value and to_value >= required
        why = f"{metric} {to_value:.4f} {'meets' if passed else 'is below'} required {required:.4f}"
    if online is not None and online.applies:
        passed = passed and online.passed
        why = f"{why}; online {online.reason}"

    if not passed and not force:
        return decide(False, f"refused: {why}")

    if champion is not None:
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, champion)
    client.set_registered_model_alias(model_name, CHAMPION, candidate)
    reason = (
        f"promoted v{candidate}: {why}" if passed else f"forced promotion of v{candidate}: {why}"
    )
    evidence.append(f"champion: {'none' if champion is None else 'v' + champion} -> v{candidate}")
    return decide(True, reason)


def rollback(
    *,
    tracking_uri: str,
    model_name: str = DEFAULT_MODEL_NAME,
    metric: str = DEFAULT_METRIC,
    online: OnlineEvidence | None = None,
) -> PromotionDecision:
    """Move `champion` back to `previous_champion` (one level of undo: the alias is then removed).

    The demoted version is tagged `recserve.rolled_back` so it can be told apart in the registry UI.
    `online` is carried as evidence only: a rollback is never gated. Raises RegistryError when no
    previous champion is recorded.
    """
    client = _client(tracking_uri)
    aliases = _aliases(client, model_name)
    previous = aliases.get(PREVIOUS_CHAMPION)
    if previous is None:
        raise RegistryError(
            f"model '{model_name}' has no '{PREVIOUS_CHAMPION}' alias: nothing to roll back to"
        )
    champion = aliases.get(CHAMPION)
    from_value = (
        None
        if champion is None
        else _version_metric(client, tracking_uri, model_name, champion, metric)
    )
    to_value = _version_metric(client, tracking_uri, model_name, previous, metric)
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
    if champion is not None:
        client.set_model_version_tag(model_name, champion, "recserve.rolled_back", "true")
    evidence = (
        f"champion {'none' if champion is None else 'v' + champion}: {metric} = {_fmt(from_value)}",
        f"previous champion v{previous}: {metric} = {_fmt(to_value)}",
        f"champion: {'none' if champion is None else 'v' + champion} -> v{previous}",
    )
    return PromotionDecision(
        promoted=True,
        action="rollback",
        metric=metric,
        from_version=champion,
        to_version=previous,
        from_value=from_value,
        to_value=to_value,
        reason=f"rolled back champion to v{previous}",
        evidence=evidence,
        online=online,
    )
