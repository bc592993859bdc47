#!/usr/bin/env bash
# Set up (idempotent), then lint, type-check and run the whole test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# pytest exits 5 when no test ran: that fails this script like any other non-zero exit.
.venv/bin/python -m pytest -q "$@"
