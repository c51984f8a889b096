#!/usr/bin/env bash
# All the tests: Rust (protocol golden vectors, kernels, daemon over a real socket),
# then, on every stack set up by scripts/setup.sh (scanpy 1.11.5 on Python 3.11,
# scanpy 1.12.4 on Python 3.12; or only the ones named: `bash scripts/test.sh 1.12.4`):
# the Python integration tests against a real daemon with that stack's upstream
# scanpy as the oracle, the hardening tests, and scanpy's own tests of the patched
# functions with autozyme active. Fuzzing of frames and requests last.
#
# Every stage has a time bound, and pytest dumps every thread's stack if a test
# runs past 5 minutes, so a hang fails loudly instead of stalling CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stacks.sh
own_runtime=""
if [ -z "${AUTOZYME_RUNTIME_DIR:-}" ]; then
  own_runtime=$(mktemp -d /tmp/azm-test-XXXXXX)
  export AUTOZYME_RUNTIME_DIR="$own_runtime"
fi
venvs=""
cleanup() {
  # Each stack's last stage starts a daemon of that stack's build: stop it, and
  # remove the runtime dir made here.
  for v in $venvs; do "$v/bin/autozyme" daemon stop >/dev/null 2>&1 || true; done
  [ -z "$own_runtime" ] || rm -rf "$own_runtime"
}
trap cleanup EXIT
bounded() { timeout --kill-after=30 "$@"; }
stage() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

stage "Rust tests"
bounded 900 cargo test --workspace --release 2>&1 | tail -n 40
HARDENING="tests/test_faults.py tests/test_bad_input.py tests/test_load.py tests/test_access.py"
for stack in ${*:-$STACKS}; do
  venv=$(stack_venv "$stack")
  if [ ! -x "$venv/bin/autozyme" ]; then
    echo "test: the scanpy $stack stack is not set up ($venv); run scripts/setup.sh $stack" >&2
    exit 1
  fi
  venvs="$venvs $venv"
  py="$venv/bin/python"
  # The Dask tests (a real LocalCluster each), the warm worker's (a worker's warm-up
  # beside a fresh upstream process), the pipeline benchmark's and the Leiden quality
  # tests (upstream's neighbors over several seeds) run on the main stack of a
  # release; an integration-only stack (the same release on another Python) skips them.
  skip="$HARDENING"
  if [ "$(stack_stages "$stack")" != all ]; then
    skip="$skip $(ls tests/test_dask_*.py) tests/test_warm.py tests/test_bench_pipeline.py tests/test_leiden_quality.py"
  fi
  stage "scanpy $stack ($("$py" --version)): integration tests"
  bounded 900 "$py" -m pytest -q tests --ignore=tests/scanpy_upstream -p no:cacheprovider \
      $(printf -- '--ignore=%s ' $skip) -o faulthandler_timeout=300
  if [ "$(stack_stages "$stack")" != all ]; then
    continue
  fi
  stage "scanpy $stack: hardening (faults, bad input, load, access), printing what each test tried"
  bounded 900 "$py" -m pytest -q -s $HARDENING -p no:cacheprovider -o faulthandler_timeout=300
  stage "scanpy $stack: scanpy's own tests of the patched functions, autozyme active"
  bounded 900 "$py" tests/scanpy_upstream/run_scanpy_tests.py --with-autozyme \
      --functions normalize_total,log1p,scale,highly_variable_genes,rank_genes_groups,leiden -- -q -o faulthandler_timeout=300
  "$venv/bin/autozyme" daemon stop >/dev/null 2>&1 || true
done
stage "fuzzing: frames and requests, 20 s a target (prints executions)"
bounded 900 bash scripts/fuzz.sh 20
