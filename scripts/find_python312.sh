#!/usr/bin/env bash
# Prints the path of a working CPython 3.12 (megatron-core 0.19 and megatron-bridge 0.6 require 3.12).
set -u
candidates=()
[ -n "${PYTHON312:-}" ] && candidates+=("$PYTHON312")
candidates+=(python3.12)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root 2>/dev/null)
  [ -n "$root" ] && candidates+=("$root"/versions/3.12*/bin/python3.12)
fi
candidates+=("$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12)
for c in "${candidates[@]}"; do
  if out=$("$c" -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null) && [ "$out" = True ]; then
    command -v "$c" 2>/dev/null || echo "$c"
    exit 0
  fi
done
echo "error: no working Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2
exit 1
