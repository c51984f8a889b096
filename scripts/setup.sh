#!/usr/bin/env bash
# Sets everything up from a fresh clone: a venv with the pinned test environment,
# then `pip install ./pyshim`, which builds the Rust workspace (release) and
# installs the `autozyme` package, the `autozymed` daemon and the `autozyme` command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-test.txt
if [ -f tests/requirements-upstream-tests.txt ]; then
  .venv/bin/python -m pip install --quiet -r tests/requirements-upstream-tests.txt
fi
.venv/bin/python -m pip install --quiet ./pyshim
echo "installed: $(.venv/bin/autozymed --build-id) at $(command -v .venv/bin/autozymed)"
