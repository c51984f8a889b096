"""``autozyme bench --calls neighbors`` (autozyme.bench.neighbors): sc.pp.neighbors
and sc.tl.umap in fresh processes, where upstream's first call compiles
pynndescent's and umap's numba kernels and autozyme's goes to the warm worker.

The data is what these calls get in a tutorial: a 50-component float32 PCA of
cells in weakly separated clusters. One fresh process per side times:
  neighbors first   the first call in the process
  neighbors warm    the call again, on a fresh copy
  umap first / warm the same for sc.tl.umap on those graphs
Before autozyme's process, ``autozyme warm --wait`` makes sure the worker is
warm: the bench measures a new kernel on a machine where autozyme has run
before (the very first kernel ever waits for the worker's warm-up once).
Both sides' graphs and embeddings are compared bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .measure import fmt_t, fresh_json, warm_worker_ready

MODULE = "autozyme.bench.neighbors"  # the worker: python -m autozyme.bench.neighbors MODE REP OUT
N_PCS = 50
PHASES = ("neighbors_first", "neighbors_warm", "umap_first", "umap_warm")


def rep_path(cache: Path, cells: int) -> Path:
    """A cached PCA-like representation: 12 clusters whose centres are 2 standard
    deviations apart along a few components, float32 as sc.pp.pca returns."""
    path = cache / f"pca_rep_{cells}_{N_PCS}.npy"
    if not path.exists():
        rng = np.random.default_rng(0)
        centres = rng.normal(0, 2.0, size=(12, N_PCS)) * (np.arange(N_PCS) < 10)
        labels = rng.integers(0, 12, size=cells)
        rep = centres[labels] + rng.normal(0, 1.0, size=(cells, N_PCS))
        rep *= np.linspace(3, 0.5, N_PCS)  # decreasing variance, as PCs have
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, rep.astype(np.float32))
    return path


def worker(mode: str, rep: Path, out: Path) -> dict:
    import time

    import anndata as ad
    import scanpy as sc

    if mode == "autozyme":
        import os

        import autozyme

        os.environ.setdefault("AUTOZYME_STRICT", "1")
        autozyme.activate("scanpy")
    x = np.load(rep)
    base = ad.AnnData(obsm={"X_pca": x}, obs={"i": np.arange(x.shape[0]).astype(str)})
    a, b = base.copy(), base.copy()
    result = {"mode": mode, "cells": x.shape[0]}
    for phase, target in zip(PHASES, (a, b, a, b)):
        t = time.perf_counter()
        if phase.startswith("neighbors"):
            sc.pp.neighbors(target, use_rep="X_pca")
        else:
            sc.tl.umap(target)
        result[phase] = time.perf_counter() - t
    g = a.obsp
    np.savez(out / f"neighbors_{mode}.npz", **{
        f"{k}_{part}": getattr(g[k], part) for k in ("distances", "connectivities")
        for part in ("data", "indices", "indptr")}, X_umap=a.obsm["X_umap"])
    result["uns"] = repr(a.uns["neighbors"]) + repr(a.uns["umap"])
    if mode == "autozyme":
        from autozyme import fallback

        served = fallback.counts()["served"]
        result["served"] = served.get("neighbors", 0) + served.get("umap", 0)
    return result


def run(cache: Path, out: Path, cells: int) -> bool:
    """Both sides' rows; True when every result was identical and every autozyme
    call served."""
    out.mkdir(parents=True, exist_ok=True)
    rep = rep_path(cache, cells)
    warm = warm_worker_ready()
    if not warm.endswith(": ok"):
        print(f"neighbors: {warm}")
    up = fresh_json(MODULE, "upstream", str(rep), str(out), what="upstream neighbors worker")
    fast = fresh_json(MODULE, "autozyme", str(rep), str(out), what="autozyme neighbors worker")
    with np.load(out / "neighbors_upstream.npz") as u, np.load(out / "neighbors_autozyme.npz") as z:
        same = all(u[k].dtype == z[k].dtype and np.array_equal(u[k], z[k]) for k in u.files)
    same = same and up["uns"] == fast["uns"]
    print(f"neighbors and umap  ({cells} cells x {N_PCS} float32 PCs, scanpy's defaults; each side a "
          f"fresh process; autozyme's worker warm; results identical: {'yes' if same else 'NO'}; "
          f"calls served by autozyme: {fast.get('served', 0)} of 4)")
    print(f"  {'phase':<16} {'upstream':>12} {'autozyme':>12} {'speedup':>8}")
    for phase in PHASES:
        print(f"  {phase:<16} {fmt_t(up[phase]):>12} {fmt_t(fast[phase]):>12} {up[phase] / fast[phase]:7.1f}x")
    print(f"  autozyme's first neighbors call / upstream's warm call: "
          f"{fast['neighbors_first'] / up['neighbors_warm']:.2f}\n", flush=True)
    (out / "bench_neighbors.json").write_text(json.dumps(
        {"upstream": up, "autozyme": fast, "identical": same}, indent=1))
    return same and fast.get("served", 0) == len(PHASES)


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(json.dumps(worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        sys.exit("usage: python -m autozyme.bench.neighbors MODE REP OUT")
