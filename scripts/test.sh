#!/usr/bin/env bash
# The README's test command: sets up .venv from nothing if needed, then runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k router).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -ra "$@"
