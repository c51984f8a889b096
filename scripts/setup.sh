#!/usr/bin/env bash
# Sets everything up from a fresh clone, for every stack in scripts/stacks.sh (or only
# the ones named: `bash scripts/setup.sh 1.12.4`): a venv with the stack's pinned test
# environment, then `pip install ./pyshim`, which builds the Rust workspace (release)
# and installs the `autozyme` package, the `autozymed` daemon and the `autozyme`
# command. The 1.11.5 stack lives in .venv (CPython 3.11), the 1.12.4 stack in
# .venv-1.12.4 (CPython 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stacks.sh
for stack in ${*:-$STACKS}; do
  venv=$(stack_venv "$stack")
  if [ ! -x "$venv/bin/python" ]; then
    py=$(stack_python "$stack") || { echo "setup: no Python for scanpy $stack" >&2; exit 1; }
    "$py" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  for req in $(stack_requirements "$stack"); do
    "$venv/bin/python" -m pip install --quiet -r "$req"
  done
  "$venv/bin/python" -m pip install --quiet ./pyshim
  echo "scanpy $stack stack: $("$venv/bin/python" --version), $("$venv/bin/autozymed" --build-id) in $venv"
done
