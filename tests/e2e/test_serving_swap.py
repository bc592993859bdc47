"""Hot swap under load: aliasing a new bundle while requests run; refusing bad bundles.

Against the session's graph (conftest `serving_app`, alias polled every second): a background client sends
a steady stream of requests while the test moves `champion` in the real MLflow registry. Every request
must succeed, the served version must switch within the polling interval (plus the stages' load), and
bundles that fail verification or the serving contract must be refused while the previous one serves,
and so must one whose files and manifest were rewritten together in the artifact store (issue #29).
The alias is moved back at the end: the other serving tests expect the trained bundle.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import httpx
import pytest
from mlflow import MlflowClient

from tests.bundle_factory import make_tiny_bundle, rewrite_consistently
from training.registry import register_bundle

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import ServingApp

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The stages fetch, verify, load and warm the new version after the router sees the alias move.
LOAD_ALLOWANCE_SECONDS = 5.0


@dataclass(frozen=True)
class Sample:
    sent: float
    status: int
    version: str | None


class Load:
    """Requests at a fixed rate from a thread until stopped; every outcome recorded."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.interval = url, 1.0 / rate
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        users = ["u1", "u2", "u3", "stranger"]
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            n = 0
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(
                        "/v1/recommendations", json={"user_id": users[n % len(users)], "k": 10}
                    )
                    version = (
                        response.json().get("model_version")
                        if response.status_code == 200
                        else None
                    )
                    self.samples.append(Sample(sent, response.status_code, version))
                except httpx.HTTPError:
                    self.samples.append(Sample(sent, 0, None))
                n += 1
                time.sleep(max(0.0, self.interval - (time.monotonic() - sent)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def first(self, version: str, after: float) -> Sample | None:
        return next((s for s in self.samples if s.sent >= after and s.version == version), None)


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.1)
    return False


def served(app: ServingApp) -> str | None:
    state = httpx.get(f"{app.url}/readyz", timeout=5.0).json()
    version: str | None = state.get("model_version")
    return version


@pytest.fixture
def registry(serving_app: ServingApp) -> Iterator[MlflowClient]:
    client = MlflowClient(
        tracking_uri=serving_app.bundle.tracking_uri, registry_uri=serving_app.bundle.tracking_uri
    )
    yield client
    client.set_registered_model_alias("recserve", "champion", serving_app.bundle.version)
    assert wait_for(lambda: served(serving_app) == serving_app.bundle.version, 60)


def test_aliasing_a_new_bundle_under_load_switches_without_a_failed_request(
    serving_app: ServingApp, registry: MlflowClient
) -> None:
    bundle = serving_app.bundle
    new = register_bundle(bundle.bundle_dir, tracking_uri=bundle.tracking_uri).version
    assert new != bundle.version
    with Load(serving_app.url, rate=25) as load:
        time.sleep(1.0)
        moved = time.monotonic()
        registry.set_registered_model_alias("recserve", "champion", new)
        assert wait_for(lambda: load.first(new, moved) is not None, 30), "never switched"
        time.sleep(2.0)
    first = load.first(new, moved)
    assert first is not None
    switch = first.sent - moved
    assert switch <= serving_app.poll_seconds + LOAD_ALLOWANCE_SECONDS, switch
    assert [s for s in load.samples if s.status != 200] == []
    assert {s.version for s in load.samples if s.sent < moved} == {bundle.version}
    # Once switched, it stays switched (no request goes back to the old version).
    assert {s.version for s in load.samples if s.sent > first.sent + 0.5} == {new}
    print(f"switched to v{new} {switch:.2f}s after the alias moved; {len(load.samples)} requests")


def _artifact_dir(source_uri: str) -> Path:
    return Path(urlparse(source_uri).path)


def test_bundles_failing_verification_or_the_contract_are_refused_and_the_previous_serves(
    serving_app: ServingApp, registry: MlflowClient, tmp_path: Path
) -> None:
    bundle = serving_app.bundle
    corrupt = register_bundle(bundle.bundle_dir, tracking_uri=bundle.tracking_uri)
    with open(_artifact_dir(corrupt.source_uri) / "ranker.ubj", "ab") as handle:
        handle.write(b"tampered")  # after registration: the manifest's sha256 no longer matches
    make_tiny_bundle(tmp_path / "tiny")
    foreign = register_bundle(tmp_path / "tiny", tracking_uri=bundle.tracking_uri)

    with Load(serving_app.url, rate=20) as load:
        for version, reason in (
            (corrupt.version, "checksum mismatch"),
            (foreign.version, "ranker features"),
        ):
            registry.set_registered_model_alias("recserve", "champion", version)
            assert wait_for(
                lambda v=version: v in httpx.get(f"{serving_app.url}/readyz").json()["refused"], 30
            ), f"v{version} was not refused"
            state = httpx.get(f"{serving_app.url}/readyz").json()
            assert state["ready"] is True and state["model_version"] == bundle.version
            assert reason in state["refused"][version]
    assert [s for s in load.samples if s.status != 200] == []
    assert {s.version for s in load.samples} == {bundle.version}


def test_a_bundle_whose_files_and_manifest_were_both_rewritten_is_refused_and_the_old_answers(
    serving_app: ServingApp, registry: MlflowClient
) -> None:
    """The attack the per-file checksums alone miss: a new popularity list (a loadable bundle that
    pushes chosen items) with its sha256 written into the manifest. The manifest's digest recorded at
    registration (tag recserve.manifest_sha256) no longer matches."""
    bundle = serving_app.bundle
    rewritten = register_bundle(bundle.bundle_dir, tracking_uri=bundle.tracking_uri)
    stored = _artifact_dir(rewritten.source_uri)
    popularity = json.loads((stored / "popularity.json").read_text())
    popularity["global"] = list(reversed(popularity["global"]))
    rewrite_consistently(stored, "popularity.json", json.dumps(popularity).encode())

    with Load(serving_app.url, rate=20) as load:
        registry.set_registered_model_alias("recserve", "champion", rewritten.version)
        assert wait_for(
            lambda: rewritten.version in httpx.get(f"{serving_app.url}/readyz").json()["refused"],
            30,
        ), f"v{rewritten.version} was not refused"
        state = httpx.get(f"{serving_app.url}/readyz").json()
        refused_at = time.monotonic()
        # Requests go on after the refusal, answered by the old version (checked below).
        assert wait_for(lambda: sum(s.sent > refused_at for s in load.samples) >= 10, 10)
    assert state["ready"] is True and state["model_version"] == bundle.version
    reason = state["refused"][rewritten.version]
    assert "manifest.json: sha256" in reason and "recserve.manifest_sha256 tag" in reason, reason
    assert "changed in the artifact store after registration" in reason
    assert load.samples and [s for s in load.samples if s.status != 200] == []
    assert {s.version for s in load.samples} == {bundle.version}
    print(f"v{rewritten.version} refused: {reason}")
