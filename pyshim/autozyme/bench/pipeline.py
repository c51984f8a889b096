"""``autozyme bench --pipeline``: the scanpy tutorial notebook, step by step,
upstream against autozyme, each side in a fresh process (a fresh kernel).

The notebook (``tutorial_steps``): read_h5ad; highly_variable_genes (seurat_v3
on the counts, 7 batches, 2,000 genes); normalize_total; log1p; the full
log data kept as ``.raw`` and the matrix subset to the highly variable genes;
scale (max_value=10); pca; neighbors; leiden (flavor="igraph", n_iterations=2,
as scanpy recommends); umap; rank_genes_groups (wilcoxon on the leiden groups,
on ``.raw``). The autozyme side is the same notebook with
``autozyme.activate("scanpy")`` at the top, as a user would write it.

Before each side, a short priming process runs the same notebook on a tiny
dataset, so that neither side is the first process ever on the machine
(numba's on-disk caches exist for upstream; autozyme's daemon, and its warm
worker, made warm with ``autozyme warm --wait``, are up). Each side then saves
what it computed; the parent compares both sides bit for bit (max ulp per
array) and prints the per-step table and ratios. crest-sc, when an
interpreter that has it is given or found, runs its own API's version of the
notebook for timing only: its results are not upstream's.

The workers run as ``python -m autozyme.bench.pipeline --side ...``. Imports
run one way: cli.py -> this module -> measure.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .measure import (dataset_path, fresh_json, load_anndata, max_ulp, stack_versions, touch_memory,
                      warm_worker_ready)

MODULE = "autozyme.bench.pipeline"
STEPS = ("import", "read", "hvg", "normalize_total", "log1p", "raw_and_subset", "scale", "pca",
         "neighbors", "leiden", "umap", "rank_genes_groups")
PRIMING_SHAPE = (3_000, 2_000)  # cells, genes of the priming notebook's data
CREST_LABEL = "crest-sc (its own BioFrame API; not upstream's results, within a tolerance)"


def n_top_genes(n_genes: int) -> int:
    """2,000 as in the tutorial; a tenth of the genes on small test data."""
    return min(2000, max(50, n_genes // 10))


# --- data -----------------------------------------------------------------------
def h5ad_path(cache: Path, cells: int, genes: int, density: float) -> Path:
    """The bench's generated counts (measure.make_counts: 8 cell clusters,
    lognormal depth) with 7 batches in ``obs["batch"]``, as an h5ad file, cached."""
    path = cache / f"pipeline_{cells}x{genes}_{density:g}.h5ad"
    if not path.exists():
        adata = load_anndata(dataset_path(cache, cells, genes, density))
        adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
        adata.var_names = [f"gene{j}" for j in range(adata.n_vars)]
        tmp = path.with_suffix(".tmp.h5ad")
        adata.write_h5ad(tmp)
        tmp.rename(path)
    return path


# --- the notebook ---------------------------------------------------------------
def tutorial_steps(sc, path: Path, top: int):
    """The tutorial as (step name, function) pairs over one notebook state."""
    nb = {}

    def read():
        nb["adata"] = sc.read_h5ad(path)

    def raw_and_subset():
        adata = nb["adata"]
        adata.raw = adata
        nb["adata"] = adata[:, adata.var["highly_variable"].to_numpy()].copy()

    def a():
        return nb["adata"]

    steps = [
        ("read", read),
        ("hvg", lambda: sc.pp.highly_variable_genes(a(), n_top_genes=top, flavor="seurat_v3",
                                                      batch_key="batch")),
        ("normalize_total", lambda: sc.pp.normalize_total(a())),
        ("log1p", lambda: sc.pp.log1p(a())),
        ("raw_and_subset", raw_and_subset),
        ("scale", lambda: sc.pp.scale(a(), max_value=10)),
        ("pca", lambda: sc.tl.pca(a())),
        ("neighbors", lambda: sc.pp.neighbors(a())),
        ("leiden", lambda: sc.tl.leiden(a(), flavor="igraph", n_iterations=2, directed=False)),
        ("umap", lambda: sc.tl.umap(a())),
        ("rank_genes_groups", lambda: sc.tl.rank_genes_groups(a(), "leiden", method="wilcoxon")),
    ]
    return nb, steps


def _digest(x) -> np.ndarray:
    """sha256 of a matrix's values (and structure, if sparse): large results are
    compared by digest rather than saved."""
    import scipy.sparse as sp

    h = hashlib.sha256()
    if sp.issparse(x):
        for part in (x.data, x.indices, x.indptr):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(str(x.dtype).encode())
    else:
        h.update(np.ascontiguousarray(x).tobytes())
        h.update(f"{x.dtype}{x.shape}".encode())
    return np.frombuffer(h.digest(), np.uint8)


def results(adata) -> dict:
    """What the notebook computed, by step, for the comparison of both sides."""
    out = {}
    for col in ("highly_variable", "highly_variable_rank", "means", "variances", "variances_norm",
                "highly_variable_nbatches"):
        out[f"hvg/{col}"] = adata.raw.var[col].to_numpy() if col in adata.raw.var else adata.var[col].to_numpy()
    out["log1p/raw_X_sha256"] = _digest(adata.raw.X)
    out["scale/X_sha256"] = _digest(adata.X)
    out["scale/mean"] = adata.var["mean"].to_numpy()
    out["scale/std"] = adata.var["std"].to_numpy()
    out["pca/X_pca"] = adata.obsm["X_pca"]
    out["pca/PCs"] = adata.varm["PCs"]
    out["pca/variance_ratio"] = adata.uns["pca"]["variance_ratio"]
    for key in ("connectivities", "distances"):
        g = adata.obsp[key]
        for part in ("data", "indices", "indptr"):
            out[f"neighbors/{key}_{part}"] = getattr(g, part)
    out["leiden/labels"] = adata.obs["leiden"].astype(str).to_numpy().astype("U")
    out["umap/X_umap"] = adata.obsm["X_umap"]
    rgg = adata.uns["rank_genes_groups"]
    for field in ("names", "scores", "pvals", "logfoldchanges"):
        rec = rgg[field]
        out[f"rank_genes_groups/{field}"] = np.stack([np.asarray(rec[g]) for g in rec.dtype.names])
    # Text as fixed-width unicode: np.load refuses object arrays (pickles).
    return {k: v.astype(str) if v.dtype == object else v for k, v in out.items()}


def worker(side: str, data: Path, save: Path | None, pause: float) -> dict:
    """One fresh process: the notebook on ``data``, each step timed."""
    times = {}
    t = time.perf_counter()
    import scanpy as sc

    if side == "autozyme":
        import autozyme

        autozyme.activate("scanpy")
    times["import"] = time.perf_counter() - t
    genes = _n_genes(data)
    nb, steps = tutorial_steps(sc, data, n_top_genes(genes))
    for name, fn in steps:
        time.sleep(pause)  # between notebook cells (not timed)
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
    report = {"side": side, "times": times, "clusters": int(nb["adata"].obs["leiden"].nunique())}
    if side == "autozyme":
        from autozyme import fallback

        report["calls"] = fallback.counts()
    if save is not None:
        np.savez(save, **results(nb["adata"]))
    return report


def _n_genes(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].attrs["shape"][1])


def crest_worker(data: Path, pause: float) -> dict:
    """crest-sc's own API on the same notebook (timings only)."""
    times = {}
    t = time.perf_counter()
    import crest

    times["import"] = time.perf_counter() - t
    bf = {}

    def read():
        bf["x"] = crest.read_h5ad(data)

    top = n_top_genes(_n_genes(data))
    steps = [
        ("read", read),
        ("hvg", lambda: crest.pp.highly_variable_genes(bf["x"], n_top_genes=top, flavor="seurat_v3",
                                                         batch_key="batch")),
        ("normalize_total", lambda: crest.pp.normalize_total(bf["x"], target_sum=1e4)),  # it has no median target
        ("log1p", lambda: crest.pp.log1p(bf["x"])),
        ("scale", lambda: crest.pp.scale(bf["x"], max_value=10)),
        ("pca", lambda: crest.tl.pca(bf["x"], n_comps=50, use_highly_variable=True)),
        ("neighbors", lambda: crest.pp.neighbors(bf["x"], n_neighbors=15)),
        ("leiden", lambda: crest.tl.leiden(bf["x"], n_iterations=2)),
        ("umap", lambda: crest.tl.umap(bf["x"])),
        ("rank_genes_groups", lambda: crest.tl.rank_genes_groups(bf["x"], "leiden", method="wilcoxon")),
    ]
    for name, fn in steps:
        time.sleep(pause)
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
    return {"side": "crest", "times": times}


# --- parent ---------------------------------------------------------------------
def _side(side: str, data: Path, save: Path | None, pause: float, python: str | None = None) -> dict:
    argv = ["--side", side, "--data", str(data), "--pause", str(pause)]
    if save is not None:
        argv += ["--save", str(save)]
    if python is None:
        return fresh_json(MODULE, *argv, what=f"{side} notebook")
    proc = subprocess.run([python, "-m", MODULE, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} notebook failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def crest_python(explicit: str | None) -> str | None:
    """An interpreter that has crest-sc: the one given, else this one if it has it."""
    for py in ([explicit] if explicit else [sys.executable]):
        probe = subprocess.run([py, "-c", "import importlib.metadata as m, crest; print(m.version('crest-sc'))"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return py
    return None


def compare(up: Path, az: Path) -> dict:
    """Per step: whether both sides computed the same, and the largest ulp
    difference over its float arrays (None: shapes, dtypes or values of
    non-float arrays differ)."""
    with np.load(up) as a, np.load(az) as b:
        steps: dict = {}
        for key in sorted(set(a.files) | set(b.files)):
            step = key.split("/")[0]
            if key not in a.files or key not in b.files:
                u = None
            elif a[key].dtype.kind == "f":
                u = max_ulp(a[key], b[key])
            else:
                u = 0 if a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]) else None
            prev = steps.get(step, 0)
            steps[step] = None if u is None or prev is None else max(prev, u)
    return steps


def run(args) -> int:
    cache = Path(args.cache).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells, genes = args.pipeline_cells, args.pipeline_genes
    data = h5ad_path(cache, cells, genes, args.density)
    tiny = None if args.no_prime else \
        h5ad_path(cache, min(cells, PRIMING_SHAPE[0]), min(genes, PRIMING_SHAPE[1]), args.density)
    touch_memory(12 * data.stat().st_size)
    primed = "no priming process" if args.no_prime else \
        f"after a priming process on {min(cells, PRIMING_SHAPE[0])} x {min(genes, PRIMING_SHAPE[1])}"
    print(f"\nautozyme bench --pipeline: the tutorial notebook on {cells} x {genes} counts "
          f"(7 batches), each side in a fresh process {primed}; {os.cpu_count()} cores; "
          f"{args.pause:g} s between cells (not timed); {stack_versions()}\n", flush=True)
    sides = {}
    for side in ("upstream", "autozyme"):
        if tiny is not None:
            _side(side, tiny, None, 0.0)
        if side == "autozyme":
            warm = warm_worker_ready()
        sides[side] = _side(side, data, out / f"pipeline_{side}.npz", args.pause)
        print(f"{side}: {sum(sides[side]['times'].values()):.1f} s", flush=True)
    equal = compare(out / "pipeline_upstream.npz", out / "pipeline_autozyme.npz")
    crest_py = None if args.no_crest else crest_python(args.crest_python)
    if crest_py:
        if tiny is not None:
            _side("crest", tiny, None, 0.0, python=crest_py)  # its priming run
        sides["crest"] = _side("crest", data, None, args.pause, python=crest_py)
        print(f"crest-sc: {sum(sides['crest']['times'].values()):.1f} s\n", flush=True)
    report = {"cells": cells, "genes": genes, "density": args.density, "stack": stack_versions(),
              "pause": args.pause, "primed": not args.no_prime, "warm_worker": warm, "sides": sides,
              "equal_max_ulp": equal, "crest_python": crest_py}
    print(format_table(report))
    (out / "pipeline.json").write_text(json.dumps(report, indent=1))
    bad = [step for step, u in equal.items() if u != 0]
    if bad:
        print(f"NOT EQUAL to upstream: {', '.join(bad)}")
        return 1
    return 0


def format_table(report: dict) -> str:
    sides = report["sides"]
    up, az = sides["upstream"]["times"], sides["autozyme"]["times"]
    cr = sides.get("crest", {}).get("times")
    head = f"{'step':<20}{'upstream':>11}{'autozyme':>11}{'ratio':>8}"
    if cr is not None:
        head += f"{'crest-sc*':>12}"
    head += "   autozyme = upstream"
    lines = [head]
    equal = report["equal_max_ulp"]
    for step in STEPS:
        ratio = up[step] / az[step] if az.get(step) else float("nan")
        line = f"{step:<20}{up[step]:>10.2f}s{az[step]:>10.2f}s{ratio:>7.2f}x"
        if cr is not None:
            line += f"{cr[step]:>11.2f}s" if step in cr else f"{'(lazy)':>12}"
        key = {"raw_and_subset": None, "import": None, "read": None}.get(step, step)
        if key in equal:
            u = equal[key]
            line += "   " + ("bit-identical" if u == 0 else "DIFFERS" if u is None else f"max {u} ulp")
        lines.append(line)
    tu, ta = sum(up.values()), sum(az.values())
    total = f"{'total':<20}{tu:>10.2f}s{ta:>10.2f}s{tu / ta:>7.2f}x"
    if cr is not None:
        total += f"{sum(cr.values()):>11.2f}s"
    lines.append(total)
    calls = sides["autozyme"].get("calls", {})
    lines.append(f"\nautozyme served: {calls.get('served', {})}; fell back: {calls.get('fallbacks', {})}")
    lines.append(f"warm worker: {report['warm_worker']}; leiden clusters: upstream "
                 f"{sides['upstream']['clusters']}, autozyme {sides['autozyme']['clusters']}")
    if cr is not None:
        lines.append(f"* {CREST_LABEL}; steps marked (lazy) are folded into later ones.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    p.add_argument("--side", choices=("upstream", "autozyme", "crest"), required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--save", type=Path, default=None)
    p.add_argument("--pause", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.side == "crest":
        report = crest_worker(a.data, a.pause)
    else:
        report = worker(a.side, a.data, a.save, a.pause)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
