#!/usr/bin/env bash
# Coverage-guided fuzzing of the daemon's input handling (libFuzzer through
# libfuzzer-sys, instrumented with the same flags cargo-fuzz uses, on the stable
# toolchain, without a sanitizer runtime: the targets check Rust-level safety).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
#
# Starts from the corpus kept in daemon/fuzz/corpus/<target>; new inputs found go
# to a scratch copy (merge them in by hand with -merge=1 when worth keeping).
# A crash, panic or leak of a target fails the script, with the input saved
# under daemon/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../daemon/fuzz"
SECONDS_PER_TARGET=${1:-20}
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# An explicit --target keeps the instrumentation out of build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet --target "$host" --target-dir target
bin=target/$host/release
scratch=$(mktemp -d /tmp/azm-fuzz-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p artifacts
for target in frame request csr_request; do
  mkdir -p "$scratch/$target"
  cp -r corpus/$target/. "$scratch/$target/" 2>/dev/null || true
  log="$scratch/$target.log"
  if ! $bin/$target "$scratch/$target" corpus/$target -max_total_time="$SECONDS_PER_TARGET" \
      -rss_limit_mb=2048 -timeout=10 -artifact_prefix=artifacts/ -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $target FAILED (input saved in daemon/fuzz/artifacts/)"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
  echo "fuzz: $target: $runs executions in ${SECONDS_PER_TARGET}s, $cov, no crash"
done
