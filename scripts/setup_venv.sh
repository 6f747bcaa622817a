#!/usr/bin/env bash
# Creates (or reuses) .venv with the exact pinned CPU environment and installs this project editable.
# Reuse is keyed on the lock file's content, so a changed lock rebuilds the venv from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements/lock-cpu.txt
stamp=.venv/.flexolmo-lock.sha256
want=$(sha256sum "$lock" | cut -d' ' -f1)
quiet_pip() { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  py=$(bash scripts/find_python312.sh)
  echo "[setup] creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
  # --no-deps: the lock is the complete, resolved set; nothing else may sneak in.
  .venv/bin/python -m pip install -q --no-deps -r "$lock" 2>&1 | quiet_pip
  echo "$want" > "$stamp"
fi
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | quiet_pip
.venv/bin/python - <<'PY'
import importlib.metadata as md
want = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2", "transformers": "5.12.1"}
for name, version in want.items():
    got = md.version(name)
    assert got == version, f"{name} {got} installed, {version} required (CPU shims depend on it)"
try:
    md.version("apex")
    raise SystemExit("the PyPI package 'apex' is installed: it is unrelated and breaks Megatron; remove it")
except md.PackageNotFoundError:
    pass
print("[setup] .venv ready")
PY
