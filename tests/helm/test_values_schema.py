"""values.schema.json and the template-level checks: wrong values are refused by `helm` itself, before
anything reaches a cluster, with a message that names the key and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.helm import chart

SCHEMA = json.loads((chart.CHART / "values.schema.json").read_text())


def test_schema_is_a_valid_draft7_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize("profile", chart.PROFILES)
def test_defaults_and_profiles_satisfy_the_schema(profile: str) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(chart.profile_values(profile))


def test_schema_types_every_top_level_key_of_values_yaml() -> None:
    values = chart.profile_values("default")
    assert set(values) <= set(SCHEMA["properties"])
    # ...and nothing in the schema is left over from a key that no longer exists.
    assert set(SCHEMA["properties"]) - set(values) <= {"global"}


BAD_VALUES = [
    # (values file, the message helm must print)
    ("redis:\n  enabled: 'yes'\n", "at '/redis/enabled': got string, want boolean"),
    ("replicaCount: 3\n", "additional properties 'replicaCount' not allowed"),
    (
        "serve:\n  deployments:\n    Ranker:\n      max_ongoing_request: 8\n",
        "at '/serve/deployments/Ranker': additional properties 'max_ongoing_request' not allowed",
    ),
    ("serve:\n  port: 80800\n", "at '/serve/port': maximum: got 80,800, want 65,535"),
    ("featureStore:\n  profile: embedded\n", "at '/featureStore/profile': value must be one of"),
    (
        "rayService:\n  upgradeStrategy: Rolling\n",
        "at '/rayService/upgradeStrategy': value must be one of 'NewCluster'",
    ),
    (
        "securityContext:\n  allowPrivilegeEscalation: true\n  capabilities: {drop: [ALL]}\n",
        "at '/securityContext/allowPrivilegeEscalation': value must be false",
    ),
    ("image:\n  digest: latest\n", "at '/image/digest': 'latest' does not match pattern"),
    ("serve:\n  importPath: serve_app.app\n", "at '/serve/importPath'"),
    # The recserve ACL user cannot be the disabled `default` nor the operators' `admin`.
    ("redis:\n  auth:\n    username: default\n", "at '/redis/auth/username'"),
    ("redis:\n  auth:\n    extraCommands: ['@all']\n", "at '/redis/auth/extraCommands/0'"),
    ("auth:\n  rateLimit:\n    burst: -1\n", "at '/auth/rateLimit/burst'"),
    ("mlflow:\n  auth:\n    defaultPermission: ALL\n", "at '/mlflow/auth/defaultPermission'"),
    (
        "rayService:\n  workerGroups:\n    - {name: cpu, replicas: 9, minReplicas: 1, maxReplicas: 4,"
        " resources: {}}\n",
        "rayService.workerGroups[cpu]: replicas (9) must lie between minReplicas (1) and maxReplicas (4)",
    ),
    (
        "rayService:\n  autoscaler:\n    enabled: false\n",
        "minReplicas (1) != maxReplicas (4) but rayService.autoscaler.enabled is false",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_bad_values_are_refused_with_a_readable_message(
    helm: Path, tmp_path: Path, values: str, message: str
) -> None:
    path = tmp_path / "bad-values.yaml"
    path.write_text(values)
    with pytest.raises(chart.HelmError) as refused:
        chart.render([path])
    text = str(refused.value)
    assert message in text
    # Readable: a few lines naming the key, no Go stack trace.
    assert len(text.splitlines()) <= 6
    assert "goroutine" not in text


def test_good_overrides_render(helm: Path, tmp_path: Path) -> None:
    # The refusals above are specific: close variants of the same values are accepted.
    path = tmp_path / "ok-values.yaml"
    path.write_text(
        "redis:\n  enabled: true\nserve:\n  port: 8080\n  deployments:\n    Ranker:\n"
        "      max_ongoing_requests: 8\nimage:\n  digest: sha256:" + "0" * 64 + "\n"
    )
    config = chart.serve_config(chart.render([path]))
    assert config["http_options"]["port"] == 8080
    ranker = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ranker")
    assert ranker["max_ongoing_requests"] == 8
