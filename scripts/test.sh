#!/usr/bin/env bash
# The whole test suite: lint, types, fast unit tests, then fleet tests on real nspawn hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest -m "unit or fleet" --durations=10 "$@"
