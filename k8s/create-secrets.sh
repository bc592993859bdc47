#!/usr/bin/env bash
# Create, once, the credentials the plain manifests (k8s/base) read and the chart would otherwise generate:
#   recserve-api-keys     client-key, operator-key (plaintext, for you) and keys.json (their sha256, mounted
#                         by the serving pods): client = recommend + events, operator = every scope
#   recserve-redis-auth   redis-password (ACL user recserve), admin-password (ACL user admin)
#   recserve-mlflow-auth  username, password (the MLflow admin account), flask-secret-key
# Existing Secrets are left alone (rotating them is docs/security-chart.md's business).
# Usage: k8s/create-secrets.sh [NAMESPACE]          (default recserve; needs kubectl, openssl, sha256sum)
#        k8s/create-secrets.sh --dry-run [NAMESPACE] (print the Secrets as YAML, create nothing)
set -euo pipefail
DRY_RUN=false
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=true; shift; fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,9p' "$0"; exit 0; fi
NS=${1:-recserve}
KUBECTL=${KUBECTL:-kubectl}

secret() { # secret NAME ARGS...: create unless it exists (or print it in --dry-run)
  local name=$1; shift
  if [ "$DRY_RUN" = true ]; then
    echo "---"
    "$KUBECTL" create secret generic "$name" -n "$NS" "$@" --dry-run=client -o yaml
  elif "$KUBECTL" get secret "$name" -n "$NS" >/dev/null 2>&1; then
    echo "create-secrets: $name exists in $NS, left as it is" >&2
  else
    "$KUBECTL" create secret generic "$name" -n "$NS" "$@"
  fi
}
token() { openssl rand -hex "$1"; }   # letters and digits: safe in a redis:// URL and in Feast's string
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

client=$(token 32)
operator=$(token 32)
keys=$(printf '{"keys": [{"name": "client", "sha256": "%s", "scopes": ["recommend", "events"]}, {"name": "operator", "sha256": "%s", "scopes": ["recommend", "events", "admin", "debug"]}]}' \
  "$(sha "$client")" "$(sha "$operator")")
secret recserve-api-keys --from-literal=client-key="$client" --from-literal=operator-key="$operator" \
  --from-literal=keys.json="$keys"
secret recserve-redis-auth --from-literal=redis-password="$(token 24)" --from-literal=admin-password="$(token 24)"
secret recserve-mlflow-auth --from-literal=username=admin --from-literal=password="$(token 24)" \
  --from-literal=flask-secret-key="$(token 32)"
