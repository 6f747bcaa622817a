#!/usr/bin/env bash
# One-shot GPU check (issue #16): parity vs transformers at a 7B-shaped layer (fp32, bf16), an anchored Megatron
# DDP step, MoE-layer and full-layer fwd+bwd vs Megatron's stock MoE layer, TFLOP/s vs a bf16 matmul, peak memory;
# one markdown report. About 2-3 minutes on an H100/H200 (limit 8).
#
#   bash scripts/gpu_check.sh [--dry-run] [--out FILE.md] [--wheels DIR]
#
# GPU run: needs torch >= 2.11 with CUDA (the machine's own); installs the wheels of scripts/build_gpu_wheels.sh
# (megatron-core, this package, and transformers only if the machine's has no FlexOlmo) into a venv with
# --system-site-packages, so that the machine's torch is used.  --dry-run: the same code on CPU at tiny shapes in
# the current environment (.venv if present), no install -- the CI rehearsal.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
OUT=gpu_check.md
WHEELS="$REPO/wheels"
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"

if (( DRY )); then
    if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
    elif [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
    else PY=python3; fi
    ARGS=(--dry-run)
else
    BASE="${PYTHON:-python3}"
    "$BASE" - <<'PYEOF'
import sys
import torch
have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if have < (2, 11):
    sys.exit(f"gpu_check: torch >= 2.11 needed, found {torch.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device; on CPU use --dry-run")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name()}")
PYEOF
    shopt -s nullglob
    core=("$WHEELS"/megatron_core-0.19.2-*.whl)
    ours=("$WHEELS"/flexolmo_megatron-*.whl)
    if (( ${#core[@]} != 1 || ${#ours[@]} != 1 )); then
        echo "gpu_check: $WHEELS must hold one megatron_core-0.19.2 and one flexolmo_megatron wheel" \
             "(bash scripts/build_gpu_wheels.sh, then carry wheels/)" >&2
        exit 2
    fi
    VENV="${GPU_CHECK_VENV:-/tmp/flexolmo-gpu-check-venv}"
    rm -rf "$VENV"
    "$BASE" -m venv --system-site-packages "$VENV"
    PY="$VENV/bin/python"
    PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir)
    "${PIP[@]}" "${core[@]}" "${ours[@]}"
    if ! "$PY" -c "from transformers import FlexOlmoForCausalLM" 2>/dev/null; then
        echo "gpu_check: this machine's transformers has no FlexOlmo: installing the carried transformers 5.12.1"
        "${PIP[@]}" "$WHEELS"/transformers-5.12.1-*.whl "$WHEELS"/tokenizers-0.22.2-*.whl
    fi
    ARGS=()
fi

# Run from a folder that holds only a link to benchmarks/: the repository root on sys.path would shadow the
# installed flexolmo_plugin with the source folder, which lacks the conversion/ and recipes/ subpackages.
RUN="$(mktemp -d)"
trap 'rm -rf "$RUN"' EXIT
ln -s "$REPO/benchmarks" "$RUN/benchmarks"
cd "$RUN"
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m benchmarks.gpu_check "${ARGS[@]}" --out "$OUT"
