"""``autozyme bench`` rows for ``sc.tl.rank_genes_groups(method="wilcoxon")`` (autozyme.bench.rank).

Each side runs in fresh processes on the same log-normalised matrix (the first
``--rgg-cells`` x ``--rgg-genes`` of the benchmark's counts, normalised to 1e4
per cell and log1p'd), grouped into 9 groups of very unequal sizes, with
scanpy's defaults (reference "rest", no ``pts``, no tie correction). Phases:
  first    the first call in the fresh process; autozyme's on a freshly started
           daemon of its own (its own runtime dir, ``--threads`` threads), so
           nothing is cached: the call on new data
  warm     a call on a fresh copy of the data (autozyme: same content, so the
           daemon's cached sorted matrix is reused)
  rerun    the call again on the same object
  regroup  the same object, another ``groupby`` (5 groups), as after re-clustering
If ``illico`` is installed, it runs the same phases with scanpy-matching settings
(no continuity correction, no tie correction, fold changes exponentiated
after averaging, the same thread count as the daemon), and its agreement with
upstream is reported next to autozyme's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import daemon_cli, fmt_t, fresh_json, load_anndata, max_ulp, peak_bytes, reset_peak

MODULE = "autozyme.bench.rank"  # the worker: python -m autozyme.bench.rank MODE DATA OUT PAUSE CELLS GENES THREADS

PHASES = ("first", "warm", "rerun", "regroup")
KWARGS = dict(method="wilcoxon")  # scanpy's defaults otherwise
FIELDS = ("names", "scores", "logfoldchanges", "pvals", "pvals_adj")
PROBS = np.array([0.3, 0.2, 0.14, 0.11, 0.09, 0.07, 0.05, 0.03, 0.01])


def prepare(adata, cells: int, genes: int):
    """Log-normalised float32 data with two groupings."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    x = adata.X[:cells, :genes].tocsr().astype(np.float32)
    sums = np.asarray(x.sum(axis=1)).ravel()
    sums[sums == 0] = 1
    x = (sp.diags((1e4 / sums).astype(np.float32)) @ x).tocsr()
    np.log1p(x.data, out=x.data)
    x.sort_indices()  # illico insists
    out = ad.AnnData(x)
    rng = np.random.default_rng(1)
    n = x.shape[0]
    grp = rng.choice(len(PROBS), n, p=PROBS / PROBS.sum())
    grp[: 2 * len(PROBS)] = np.repeat(np.arange(len(PROBS)), 2)
    out.obs["grp"] = pd.Categorical([f"g{k}" for k in grp])
    out.obs["other"] = pd.Categorical([f"o{k}" for k in rng.integers(0, 5, n)])
    out.uns["log1p"] = {"base": None}
    return out


def _records(res: dict) -> dict:
    arrays = {}
    for field in FIELDS:
        rec = res.get(field)
        if rec is None:
            continue
        arrays[field] = np.stack([np.asarray(rec[name]) for name in rec.dtype.names])
    for field in ("pts", "pts_rest"):
        if field in res:
            arrays[field] = np.asarray(res[field].to_numpy())
    return arrays


def worker(mode: str, data: Path, out: Path, pause: float, cells: int, genes: int, threads: int) -> dict:
    import scanpy as sc

    daemon_pid = None
    if mode == "autozyme":
        import autozyme
        from autozyme.client import get_client

        os.environ.setdefault("AUTOZYME_STRICT", "1")
        autozyme.activate("scanpy")
        daemon_pid = get_client().connection().hello.pid
    base = prepare(load_anndata(data), cells, genes)
    result = {"mode": mode, "call": "rank_genes_groups", "nnz": int(base.X.nnz),
              "cells": base.n_obs, "genes": base.n_vars}
    if daemon_pid:
        result["daemon_threads"] = get_client().connection().hello.threads

    if mode == "illico":
        import illico

        def call(target, groupby):
            return illico.asymptotic_wilcoxon(
                target, is_log1p=True, group_keys=groupby, n_threads=threads,
                use_continuity=False, tie_correct=False, exp_post_agg=True,
                return_as_scanpy=True, corr_method="benjamini-hochberg",
            )
    else:
        def call(target, groupby):
            sc.tl.rank_genes_groups(target, groupby, **KWARGS)
            return target.uns["rank_genes_groups"]

    a, b = base.copy(), base.copy()
    for phase, target, groupby in (("first", a, "grp"), ("warm", b, "grp"),
                                   ("rerun", b, "grp"), ("regroup", b, "other")):
        if phase != "first":
            time.sleep(pause)
        reset_peak("self")
        if daemon_pid:
            reset_peak(daemon_pid)
        t = time.perf_counter()
        res = call(target, groupby)
        result[phase] = time.perf_counter() - t
        result[f"{phase}_client_peak"] = peak_bytes("self")
        result[f"{phase}_daemon_peak"] = peak_bytes(daemon_pid) if daemon_pid else 0
        if phase == "first":
            np.savez(out / f"rank_genes_groups_{mode}.npz", **_records(res))
    if mode == "autozyme":
        from autozyme import fallback

        result["served"] = fallback.counts()["served"].get("rank_genes_groups", 0)
    return result


def _run(mode, data, out, pause, cells, genes, threads, env=None) -> dict:
    argv = (MODULE, mode, str(data), str(out), str(pause), str(cells), str(genes), str(threads))
    what = f"{mode} rank_genes_groups worker"
    if mode != "autozyme":
        return fresh_json(*argv, what=what, env=env)
    # A daemon of its own, started by the worker, stopped afterwards: its first
    # call finds nothing cached, as on data the user's daemon has never seen.
    runtime = tempfile.mkdtemp(prefix="azm-bench-rank-")
    fresh = {**(env or {}), "AUTOZYME_RUNTIME_DIR": runtime, "AUTOZYME_THREADS": str(threads)}
    try:
        return fresh_json(*argv, what=what, env=fresh)
    finally:
        daemon_cli("stop", fresh)
        shutil.rmtree(runtime, ignore_errors=True)


def _median(runs) -> dict:
    runs = list(runs)
    merged = dict(runs[0])
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key in PHASES:
            merged[key] = float(np.median(values))
        elif key.endswith("_peak"):
            merged[key] = max(values)
        elif key == "served":
            merged[key] = min(values)
    merged["runs"] = len(runs)
    merged["all"] = {phase: [r[phase] for r in runs] for phase in PHASES}
    return merged


def run_side(mode: str, data: Path, out: Path, pause: float, cells: int, genes: int, threads: int,
             repeat: int, env: dict | None = None, progress=None) -> dict:
    """``repeat`` fresh processes of one side (upstream, autozyme or illico), merged;
    the first phase's result is left in ``out/rank_genes_groups_<mode>.npz``."""
    runs = []
    for i in range(repeat):
        if progress:
            progress(f"{mode} run {i + 1}/{repeat}")
        runs.append(_run(mode, data, out, pause, cells, genes, threads, env))
    return _median(runs)


def load_result(out: Path, mode: str) -> dict:
    with np.load(out / f"rank_genes_groups_{mode}.npz", allow_pickle=True) as z:
        return dict(z)


def compare(up: dict, other: dict) -> dict:
    """Which fields are bit-identical; max float32 ulp of the fold changes; for
    others, the largest absolute differences."""
    report = {}
    for field in ("names", "scores", "pvals", "pvals_adj", "pts", "pts_rest", "logfoldchanges"):
        if field not in up or field not in other:
            continue
        a, b = np.ascontiguousarray(up[field]), np.ascontiguousarray(other[field])
        if a.shape != b.shape:
            report[field] = "shape differs"
        elif a.dtype.kind == "O" or b.dtype.kind in "OUS":
            report[field] = "identical" if np.array_equal(a.astype(str), b.astype(str)) else (
                f"{np.mean(a.astype(str) == b.astype(str)):.1%} equal")
        elif a.dtype == b.dtype and a.view(np.uint8).tobytes() == b.view(np.uint8).tobytes():
            report[field] = "identical"
        elif field == "logfoldchanges" and a.dtype == b.dtype:
            report[field] = f"max {max_ulp(a, b)} ulp"
        else:
            with np.errstate(all="ignore"):
                report[field] = f"max |diff| {np.nanmax(np.abs(a.astype(float) - b.astype(float))):.3g}"
    return report


def equivalent(cmp: dict, served: int) -> bool:
    """autozyme's claim: every field bit-identical except the fold changes, which
    may differ by a few float32 ulp (see the README), and every call served."""
    exact = bool(cmp) and all(v == "identical" for k, v in cmp.items() if k != "logfoldchanges")
    lfc = cmp.get("logfoldchanges", "")
    lfc_ok = lfc == "identical" or (lfc.startswith("max ") and int(lfc.split()[1]) <= 64)
    return exact and lfc_ok and served == len(PHASES)


def summary(cmp: dict) -> str:
    """One line: "identical", "identical but logfoldchanges max 2 ulp", or the
    fields that differ and how."""
    differ = {k: v for k, v in cmp.items() if v != "identical"}
    if not differ:
        return "identical"
    same = "identical but " if len(differ) < len(cmp) else ""
    return same + ", ".join(f"{k} {v}" for k, v in differ.items())


def measure(data: Path, out: Path, pause: float, cells: int, genes: int, threads: int, repeat: int,
            with_illico: bool) -> dict:
    """Upstream, autozyme and (optionally) illico, all in fresh processes."""
    up = run_side("upstream", data, out, pause, cells, genes, threads, repeat)
    fast = run_side("autozyme", data, out, pause, cells, genes, threads, repeat)
    il = run_side("illico", data, out, pause, cells, genes, threads, repeat) if with_illico else None
    up_res = load_result(out, "upstream")
    az = compare(up_res, load_result(out, "autozyme"))
    il_cmp = compare(up_res, load_result(out, "illico")) if with_illico else None
    return dict(upstream=up, autozyme=fast, illico=il, autozyme_vs_upstream=az, illico_vs_upstream=il_cmp,
                equivalent=equivalent(az, fast.get("served", 0)))


def illico_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("illico") is not None


def run_call(args, data: Path, out: Path, threads: int) -> bool:
    """Prints the rows; returns whether autozyme was bit-identical and served."""
    cells, genes = args.rgg_cells, args.rgg_genes
    res = measure(data, out, args.pause, cells, genes, threads, args.repeat, illico_installed())
    up, fast, il, az = res["upstream"], res["autozyme"], res["illico"], res["autozyme_vs_upstream"]
    print(f"rank_genes_groups wilcoxon  ({cells:,} cells x {genes:,} genes, {up['nnz'] / 1e6:.1f}M non-zeros, "
          f"9 groups, scanpy's defaults; autozyme's first call on a fresh daemon; "
          f"calls served by autozyme: {fast.get('served', 0)} of 4 in every run)")
    print("  autozyme vs upstream: " + ", ".join(f"{k} {v}" for k, v in az.items()))
    if il is not None:
        print(f"  illico ({threads} threads) vs upstream: "
              + ", ".join(f"{k} {v}" for k, v in res["illico_vs_upstream"].items()))
    head = f"  {'phase':<8} {'upstream':>12} {'autozyme':>12} {'speedup':>8}"
    head += f" {'illico':>12} {'az/illico':>9}" if il else ""
    print(head + f"   {'peak client+daemon (az)':>24}")
    for phase in PHASES:
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        line = f"  {phase:<8} {fmt_t(up[phase]):>12} {fmt_t(fast[phase]):>12} {up[phase] / fast[phase]:7.1f}x"
        if il:
            line += f" {fmt_t(il[phase]):>12} {il[phase] / fast[phase]:8.1f}x"
        line += f"   {mib(fast[f'{phase}_client_peak']) + ' + ' + mib(fast[f'{phase}_daemon_peak']):>24}"
        print(line)
    print(flush=True)
    (out / "bench_rank_genes_groups.json").write_text(json.dumps(
        dict(upstream=up, autozyme=fast, illico=il, autozyme_vs_upstream=az), indent=1))
    return res["equivalent"]


if __name__ == "__main__":
    mode, data, out, pause, cells, genes, threads = sys.argv[1:8]
    res = worker(mode, Path(data), Path(out), float(pause), int(cells), int(genes), int(threads))
    print(json.dumps(res))
