# syntax=docker/dockerfile:1
# The recserve image: the Ray base image of the same Ray version as the `ray` Python dependency, plus the
# project (serve_app, training, feature_repo) without dev extras. One image for the Ray head and workers,
# the MLflow tracking server and the training/materialization CronJobs (helm/recserve).
#   docker build -t recserve/recserve:0.1.0 .
# RAY_VERSION must equal `python -c "import ray; print(ray.__version__)"` in the project's venv
# (tests/helm/test_dockerfile.py checks it; the build checks it again inside the image).

ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311

# --- build: the project wheel only (no tests, no data, no dev extras) ---------------------------------
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS build
WORKDIR /home/ray/build
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 serve_app ./serve_app
COPY --chown=1000:100 training ./training
COPY --chown=1000:100 feature_repo ./feature_repo
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels .

# --- runtime ------------------------------------------------------------------------------------------
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS runtime
ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
# The CPU build of torch: the default wheel pulls several GB of CUDA libraries that no pod here uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BOTO3_VERSION=1.44.5
ARG FLASK_WTF_VERSION=1.3.0

LABEL org.opencontainers.image.title="recserve" \
      org.opencontainers.image.description="Real-time recommendation serving on Ray Serve (KubeRay RayService)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

# The wheel comes in through a bind mount, so no layer keeps a copy of it. boto3 and Flask-WTF are for the
# MLflow server only (nothing in the project imports them): its S3 artifact store, and the CSRF protection
# of its basic-auth app (`mlflow server --app-name basic-auth`, the `mlflow[auth]` extra). ray[serve] is already satisfied by
# the base image at the pinned version; the check after the install fails the build if pip moved it.
RUN --mount=type=bind,from=build,source=/home/ray/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir /tmp/wheels/recserve-*.whl "boto3==${BOTO3_VERSION}" \
    "flask-wtf==${FLASK_WTF_VERSION}" \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')" \
 && python -c "import serve_app, training, feature_repo, boto3, mlflow.server.auth"

# Kubernetes probes (KubeRay injects them into Ray pods; the chart sets them elsewhere) decide health;
# a Docker HEALTHCHECK would only be ignored there.
HEALTHCHECK NONE

WORKDIR /home/ray
# The base image's non-root `ray` user, numerically, so that runAsNonRoot can be verified by the kubelet.
USER 1000:100
