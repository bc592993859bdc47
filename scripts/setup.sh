#!/usr/bin/env bash
# Set up a fresh machine for recserve: system packages, local services, the venv and the project.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages: Redis (online store, event log), PostgreSQL (Feast registry in the cluster profile),
# chromium and its driver (the demo page's browser test, tests/integration/test_demo_browser.py).
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Services: start the shared Redis on 6379 and PostgreSQL on 5432 if they are not answering.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "setup: starting redis-server on 127.0.0.1:6379"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "setup: starting PostgreSQL"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "setup: Redis did not start" >&2; exit 1; }

# Python: a venv with torch pinned first (2.13.0 is the CPU build on local disk; anything else downloads GBs).
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.recserve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing recserve and its dependencies into .venv"
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi
# Prometheus and promtool (Debian package; the service is not enabled) for the monitoring tests.
bash scripts/install-prometheus.sh
# Offline Kubernetes tool chain for tests/helm: helm + kubectl (.tools/bin), checkov (own venv), hadolint.
bash scripts/install-k8s-tools.sh
echo "setup: ok ($(.venv/bin/python -c 'import ray, torch, faiss, xgboost, feast, mlflow; print("ray", ray.__version__, "torch", torch.__version__, "feast", feast.__version__, "mlflow", mlflow.__version__)'))"
