"""`autozyme bench --pipeline` on a tiny dataset, end to end: both sides run the
tutorial notebook in fresh processes, the report has every step for both, and
autozyme's results equal upstream's (the parent's comparison, bit for bit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from autozyme.bench.pipeline import STEPS


def test_pipeline_bench_tiny(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "autozyme.cli", "bench", "--pipeline",
                           "--pipeline-cells", "3000", "--pipeline-genes", "2000", "--no-prime", "--no-crest",
                           "--pause", "0", "--out", str(out), "--cache", str(cache)],
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "pipeline.json").read_text())
    assert (report["cells"], report["genes"], report["primed"]) == (3000, 2000, False)
    for side in ("upstream", "autozyme"):
        times = report["sides"][side]["times"]
        assert list(times) == list(STEPS) and all(t >= 0 for t in times.values())
    assert "crest" not in report["sides"]
    # Every compared step is bit-identical; the six calls autozyme serves were served.
    assert set(report["equal_max_ulp"]) >= {"hvg", "log1p", "scale", "pca", "neighbors", "leiden", "umap",
                                             "rank_genes_groups"}
    assert all(u == 0 for u in report["equal_max_ulp"].values()), report["equal_max_ulp"]
    served = report["sides"]["autozyme"]["calls"]["served"]
    assert {"highly_variable_genes", "normalize_total", "log1p", "scale"} <= set(served)
    assert report["sides"]["upstream"]["clusters"] == report["sides"]["autozyme"]["clusters"] > 1
    for step in ("hvg", "log1p", "pca", "rank_genes_groups", "total"):
        assert f"\n{step} " in proc.stdout
