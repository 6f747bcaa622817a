#!/usr/bin/env bash
# Re-resolves requirements/cpu.in into requirements/lock-cpu.txt in a throwaway venv.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/find_python312.sh)
tmp=$(mktemp -d)
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q -r requirements/cpu.in
{ sed -n '1,2p' requirements/lock-cpu.txt; "$tmp/venv/bin/pip" freeze --all | grep -v -e '^pip==' ; } > requirements/lock-cpu.txt.new
mv requirements/lock-cpu.txt.new requirements/lock-cpu.txt
rm -rf "$tmp"
echo "wrote requirements/lock-cpu.txt"
