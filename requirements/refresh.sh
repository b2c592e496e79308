#!/usr/bin/env bash
# Refresh requirements/lock.txt deliberately: resolve pyproject.toml's ranges (package + test extra)
# afresh in a throwaway venv and write the exact versions that resolved. Run it, run the suite with
# the new lock (bash .ci/run), and commit both together.
#   bash requirements/refresh.sh            # writes requirements/lock.txt
# The lock is for CPython 3.11 on Linux x86_64 with the CPU build of torch (the tested environment).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
# torch first and held there: otherwise the resolver may swap the CPU build for a CUDA one
echo "torch==${TORCH_VERSION}" > "$(dirname "$venv")/hold.txt"
pip install -q "torch==${TORCH_VERSION}"
pip install -q -c "$(dirname "$venv")/hold.txt" -e ".[test]"
pip check
{
  echo "# Exact versions of the tested environment (CPython $(python -c 'import sys; print(".".join(map(str, sys.version_info[:2])))'), $(uname -s) $(uname -m), CPU torch)."
  echo "# Used as constraints by the README's commands and .ci/run; pyproject.toml keeps the ranges."
  echo "# Refresh deliberately with: bash requirements/refresh.sh  (then run bash .ci/run and commit both)"
  pip freeze --exclude-editable | grep -v '^-e ' | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/' | LC_ALL=C sort -f
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
