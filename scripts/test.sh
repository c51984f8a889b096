#!/usr/bin/env bash
# All the tests: Rust (protocol golden vectors, kernels, daemon over a real
# socket), the Python integration tests against a real daemon with upstream
# scanpy as the oracle, then scanpy's own tests of the patched functions with
# autozyme active. Run scripts/setup.sh first.
#
# Every stage has a time bound, and pytest dumps every thread's stack if a test
# runs past 5 minutes, so a hang fails loudly instead of stalling CI.
set -euo pipefail
cd "$(dirname "$0")/.."
own_runtime=""
if [ -z "${AUTOZYME_RUNTIME_DIR:-}" ]; then
  own_runtime=$(mktemp -d /tmp/azm-test-XXXXXX)
  export AUTOZYME_RUNTIME_DIR="$own_runtime"
fi
# The daemon the last stage starts is stopped when this script ends, and the
# runtime dir made here removed.
trap '.venv/bin/autozyme daemon stop >/dev/null 2>&1 || true; [ -z "$own_runtime" ] || rm -rf "$own_runtime"' EXIT
bounded() { timeout --kill-after=30 "$@"; }
bounded 900 cargo test --workspace --release 2>&1 | tail -n 40
HARDENING="tests/test_faults.py tests/test_bad_input.py tests/test_load.py tests/test_access.py"
bounded 900 .venv/bin/python -m pytest -q tests --ignore=tests/scanpy_upstream -p no:cacheprovider \
    $(printf -- '--ignore=%s ' $HARDENING) -o faulthandler_timeout=300
# Hardening (faults, bad input, load, access), printing what each test tried.
bounded 900 .venv/bin/python -m pytest -q -s $HARDENING -p no:cacheprovider -o faulthandler_timeout=300
bounded 900 .venv/bin/python tests/scanpy_upstream/run_scanpy_tests.py --with-autozyme \
    --functions normalize_total,log1p,scale,highly_variable_genes,rank_genes_groups,leiden -- -q -o faulthandler_timeout=300
# Coverage-guided fuzzing of frames and requests, 20 s a target (prints executions).
bounded 900 bash scripts/fuzz.sh 20
