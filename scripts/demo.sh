#!/usr/bin/env bash
# The README's first command: sets up .venv from nothing if needed, then runs the end-to-end demo.
# Extra arguments go to `flexolmo demo` (e.g. --workdir DIR, --size tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/flexolmo demo "$@"
