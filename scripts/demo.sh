#!/usr/bin/env bash
# The main job on a fresh machine: set up, generate the default data set (5k users, 2k items, ~300k
# events), train the two-tower and the ranker, evaluate against baselines, register the bundle in the
# local MLflow registry as `challenger` and promote it to `champion` if it beats the current one.
# Usage: bash scripts/demo.sh [extra `recserve demo` flags, e.g. --size tiny --port 8000]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Train, register and promote, then serve: features applied and materialized, one recommendation and one
# event answered, working curl commands printed; Ctrl-C stops it.
.venv/bin/recserve demo "$@"
