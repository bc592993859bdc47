#!/usr/bin/env bash
# Copy the monitoring sources into the Helm chart (Helm cannot read files outside the chart directory)
# and re-render the plain manifests in k8s/base from the chart. One source each: edit monitoring/ and
# helm/recserve/, never the copies; tests/helm fails when a copy or k8s/base/recserve.yaml is stale.
# Usage: bash scripts/sync-chart-files.sh   (needs .tools/bin/helm: bash scripts/install-k8s-tools.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=helm/recserve
FILES=$CHART/files

sync_dir() { # sync_dir SRC_DIR DST_DIR GLOB: DST holds exactly the SRC files matching GLOB
  local src=$1 dst=$2 glob=$3
  mkdir -p "$dst"
  find "$dst" -maxdepth 1 -type f -name "$glob" | while read -r f; do
    [ -f "$src/$(basename "$f")" ] || { echo "sync-chart-files: removing stale $f"; rm -f "$f"; }
  done
  if [ -d "$src" ]; then
    find "$src" -maxdepth 1 -type f -name "$glob" | while read -r f; do
      cmp -s "$f" "$dst/$(basename "$f")" || { echo "sync-chart-files: $f -> $dst/"; cp "$f" "$dst/"; }
    done
  fi
}
sync_dir monitoring/prometheus "$FILES/prometheus" rules.yml
sync_dir monitoring/grafana "$FILES/grafana" "*.json"

# k8s/base/recserve.yaml: the chart rendered with k8s/base/values.yaml, for users without Helm.
HELM=${HELM:-.tools/bin/helm}
"$HELM" template recserve "$CHART" --namespace recserve -f k8s/base/values.yaml > k8s/base/recserve.yaml.tmp
mv k8s/base/recserve.yaml.tmp k8s/base/recserve.yaml
echo "sync-chart-files: ok"
