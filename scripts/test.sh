#!/usr/bin/env bash
# Set up .venv/ if needed, lint with ruff, check the import layers, then run the test suite (slow tests too unless FAST=1).
#   bash scripts/test.sh            # everything CI runs
#   FAST=1 bash scripts/test.sh     # skip tests marked slow
#   bash scripts/test.sh tests/test_grpo.py -k advantages   # extra pytest arguments
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_venv.sh"
cd "$root"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# Lint first (settings in pyproject.toml): seconds, and a failure names file:line.
"$root/.venv/bin/python" -m ruff check "$root"
# The import layers of src/ (contract in pyproject.toml): a model module importing the CLI fails here.
"$root/.venv/bin/lint-imports" --no-cache --no-logo
marker=()
if [ "${FAST:-0}" = "1" ]; then marker=(-m "not slow"); fi
exec "$root/.venv/bin/python" -m pytest -q --durations=15 "${marker[@]}" "$@"
