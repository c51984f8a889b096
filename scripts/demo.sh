#!/usr/bin/env bash
# The main job: set up, then a small benchmark report: upstream scanpy and
# autozyme side by side, in fresh processes, on a generated 10,000 x 10,000
# count matrix (wilcoxon on 3,000 x 2,000; leiden on a 10,000-node graph) at all
# cores, with every run's equivalence check and charts. About 1.5 minutes on a
# 2-core machine, most of it starting Python processes. The full report (tiers
# up to the machine's memory, thread counts 1..cores) is
# `autozyme bench --report DIR`. On the current scanpy (1.12.4) stack by default;
# `STACK=1.11.5 bash scripts/demo.sh` for the other (scripts/stacks.sh lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stacks.sh
STACK=${STACK:-1.12.4}
bash scripts/setup.sh "$STACK"
venv=$(stack_venv "$STACK")
OUT=${OUT:-demo-report}
status=0
"$venv/bin/autozyme" bench --report "$OUT" --tiers "${TIER:-10000x10000}" --threads "$(nproc)" \
    --rgg-cells 3000 --rgg-genes 2000 "$@" || status=$?
echo "report: $OUT/report.md (charts: $OUT/speedup.png, $OUT/threads.png, $OUT/memory.png)"
exit "$status"
