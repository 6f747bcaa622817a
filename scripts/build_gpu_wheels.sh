#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh, built here (network and .venv) for a GPU machine that has torch >= 2.11
# but no megatron-core: megatron-core 0.19.2, this package, and transformers 5.12.1 + tokenizers 0.22.2 (our
# pinned reference, installed there only when its own transformers has no FlexOlmo). Everything else the model
# path imports (numpy, packaging, safetensors, psutil, xxhash, pyyaml, einops, ...) is on that machine already.
# Total must stay within the 64 MiB a device run may carry (about 17 MiB).
#
#   bash scripts/build_gpu_wheels.sh [DIR]        # default DIR: wheels/ (git-ignored; carry it to the device)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/wheels}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
LIMIT_MIB=64

rm -rf "$OUT"
mkdir -p "$OUT"
# The GPU machine: x86-64, CPython 3.12, manylinux.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT" megatron-core==0.19.2 transformers==5.12.1 tokenizers==0.22.2
# This package, built from a copy of the tree (a build in place would write build/ and *.egg-info here).
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=wheels --exclude=.whl --exclude=.gl --exclude='flexolmo-demo*' -cf - . \
    | tar -C "$SRC" -xf -
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$SRC"

ls -l "$OUT"
total=$(du -sk "$OUT" | cut -f1)
echo "wheels: $((total / 1024)) MiB in $OUT (limit $LIMIT_MIB MiB)"
if (( total > LIMIT_MIB * 1024 )); then
    echo "error: the wheels exceed $LIMIT_MIB MiB" >&2
    exit 1
fi
