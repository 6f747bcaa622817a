#!/usr/bin/env bash
# Re-resolves the CPU environment into requirements/lock-cpu.txt in a throwaway venv, in three layers:
#   1. requirements/cpu.in, resolved normally;
#   2. megatron-bridge with --no-deps (its declared closure -- transformer-engine,
#      nvidia-resiliency-ext, flashinfer, ... -- cannot be installed on CPU);
#   3. requirements/bridge.txt (bridge's real needs), resolved normally but constrained by cpu.in so
#      that torch / megatron-core / transformers keep their pins;
#   4. nemo-run, leptonai and torchx with --no-deps, then requirements/nemo_run.txt (their real needs,
#      without ray and without their pins that would downgrade urllib3 / httpx / anyio / cloudpickle).
# The lock is installed with `pip install --no-deps -r`, so bridge's unsatisfiable declared
# requirements never reach a resolver (and `pip check` is expected to list them).
set -euo pipefail
cd "$(dirname "$0")/.."
BRIDGE=megatron-bridge==0.6.2  # keep in step with compat.SUPPORTED_MEGATRON_BRIDGE and setup_venv.sh
NEMO_RUN=(nemo-run==0.11.1 "leptonai<0.47" torchx==0.7.0)  # setup.cfg extra "nemo-run"
py=$(bash scripts/find_python312.sh)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip)
"${pip[@]}" install -q -r requirements/cpu.in
"${pip[@]}" install -q --no-deps "$BRIDGE"
"${pip[@]}" install -q -r requirements/bridge.txt -c requirements/cpu.in
"${pip[@]}" install -q --no-deps "${NEMO_RUN[@]}"
"${pip[@]}" install -q -r requirements/nemo_run.txt -c requirements/cpu.in
{
  echo "# Exact CPU CI environment (Python 3.12, linux x86_64). Regenerate with scripts/relock.sh; install with --no-deps."
  echo "# torch from PyPI is a CUDA build; it runs on CPU. See README \"Installing\" for packages that must never be added."
  echo "# $BRIDGE is listed without its declared dependencies on purpose (see requirements/bridge.txt)."
  echo "# so are nemo-run, leptonai and torchx (see requirements/nemo_run.txt: no ray, no downgrades)."
  "${pip[@]}" freeze --all | grep -v -e '^pip=='
} > requirements/lock-cpu.txt.new
mv requirements/lock-cpu.txt.new requirements/lock-cpu.txt
echo "wrote requirements/lock-cpu.txt"
