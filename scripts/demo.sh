#!/usr/bin/env bash
# The main job: set up, then run upstream scanpy and autozyme side by side on a
# generated count matrix and print equivalence and speed ratios (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/autozyme bench --cells "${CELLS:-20000}" --genes "${GENES:-20000}" --repeat 1 "$@"
