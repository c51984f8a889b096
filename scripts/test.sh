#!/usr/bin/env bash
# All the tests: Rust (protocol golden vectors, kernels, daemon over a real
# socket), the Python integration tests against a real daemon with upstream
# scanpy as the oracle, then scanpy's own tests of the patched functions with
# autozyme active. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export AUTOZYME_RUNTIME_DIR="${AUTOZYME_RUNTIME_DIR:-$(mktemp -d /tmp/azm-test-XXXXXX)}"
cargo test --workspace --release 2>&1 | tail -n 40
.venv/bin/python -m pytest -q tests --ignore=tests/scanpy_upstream -p no:cacheprovider
.venv/bin/python tests/scanpy_upstream/run_scanpy_tests.py --with-autozyme --functions normalize_total,log1p -- -q
