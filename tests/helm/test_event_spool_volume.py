"""The EventWriter's spool volume (eventSpool values): mounted by every Ray pod at the directory the
serving settings read, an emptyDir by default or a PersistentVolumeClaim, typed by the values schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helm import chart
from tests.helm.test_rayservice import SECRETS, resolved_env, serve_settings_from

MOUNT = "/var/lib/recserve/event-spool"


def ray_pods(docs: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        (where, spec) for where, spec, _ in chart.pod_templates(docs) if where.startswith("ray-")
    ]


def spool_volume(spec: dict[str, Any]) -> dict[str, Any] | None:
    found = [v for v in spec.get("volumes", []) if v["name"] == "event-spool"]
    assert len(found) <= 1
    return found[0] if found else None


def test_every_ray_pod_mounts_an_emptydir_spool_where_the_settings_point(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render_profile("default")
    pods = ray_pods(docs)
    assert len(pods) >= 2  # the head and at least one worker group: the EventWriter may land on any
    for where, spec in pods:
        assert spool_volume(spec) == {"name": "event-spool", "emptyDir": {"sizeLimit": "1Gi"}}, (
            where
        )
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["event-spool"] == MOUNT, where
    assert not [d for d in chart.of_kind(docs, "PersistentVolumeClaim") if "spool" in str(d)]
    head = pods[0][1]["containers"][0]
    settings = serve_settings_from(resolved_env(head, SECRETS), monkeypatch)
    assert settings.event_spool.enabled is True
    assert str(settings.event_spool_dir) == MOUNT
    assert settings.event_spool.max_bytes == 256 * 1024 * 1024
    assert settings.event_spool.retry_after_seconds == 5


def test_the_production_profile_keeps_the_spool_on_a_created_claim(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render_profile("production")
    claim = chart.one(docs, "PersistentVolumeClaim", "recserve-event-spool")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert claim["spec"]["storageClassName"] == "efs-sc"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for where, spec in ray_pods(docs):
        assert spool_volume(spec) == {
            "name": "event-spool",
            "persistentVolumeClaim": {"claimName": "recserve-event-spool"},
        }, where
    head = ray_pods(docs)[0][1]["containers"][0]
    settings = serve_settings_from(resolved_env(head, SECRETS), monkeypatch)
    assert settings.event_spool.max_bytes == 1 << 30  # an int64, not 1.073741824e+09


def test_an_existing_claim_is_mounted_and_none_created(helm: Path) -> None:
    docs = chart.render(
        set_json={"eventSpool.persistence": {"enabled": True, "existingClaim": "spool-nfs"}}
    )
    assert not [
        d for d in chart.of_kind(docs, "PersistentVolumeClaim") if "spool" in d["metadata"]["name"]
    ]
    for where, spec in ray_pods(docs):
        volume = spool_volume(spec)
        assert volume is not None, where
        assert volume["persistentVolumeClaim"] == {"claimName": "spool-nfs"}, where


def test_with_the_spool_disabled_no_volume_and_the_settings_say_so(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render(set_json={"eventSpool.enabled": False})
    for where, spec in ray_pods(docs):
        assert spool_volume(spec) is None, where
        assert "event-spool" not in {m["name"] for m in spec["containers"][0]["volumeMounts"]}
    head = ray_pods(docs)[0][1]["containers"][0]
    env = resolved_env(head, SECRETS)
    assert "RECSERVE_EVENT_SPOOL__DIRECTORY" not in env
    assert serve_settings_from(env, monkeypatch).event_spool.enabled is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eventSpool.maxBytes": "lots"}, "at '/eventSpool/maxBytes': got string, want integer"),
        ({"eventSpool.maxBytes": 1024}, "at '/eventSpool/maxBytes': minimum"),
        ({"eventSpool.mountPath": "spool"}, "at '/eventSpool/mountPath'"),
        ({"eventSpool.persistence.accessModes": ["Shared"]}, "accessModes/0"),
        ({"eventSpool.persistence.sizee": "1Gi"}, "additional properties 'sizee' not allowed"),
    ],
)
def test_the_values_schema_refuses_wrong_spool_values(
    helm: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(chart.HelmError, match=message.replace("(", r"\(").replace("[", r"\[")):
        chart.render(set_json=values)
