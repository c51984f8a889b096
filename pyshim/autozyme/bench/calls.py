"""``autozyme bench`` rows of the preprocessing calls: upstream and autozyme side by side, in fresh processes.

For each call, one worker process per side loads the same generated count
matrix and times three phases:
  first   the first call in the fresh process (upstream pays numba's cache load
          or compilation; autozyme talks to an already running daemon, as with
          the login service or any earlier call)
  warm    a warm call on a fresh copy of the data
  rerun   the call again on the same object (autozyme: buffers already adopted)
Phases are ``--pause`` seconds apart (default 1 s, as notebook cells are; the
same for both sides); autozyme uses such gaps to prepare the next call's output
buffer in the background. ``--pause 0`` runs them back to back. The worker
records peak RSS per phase for the client and the daemon (VmHWM reset through
/proc/<pid>/clear_refs; shared segments count in both). The parent compares the
results (max ulp) and prints ratios and a roofline for memory-bound calls.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import rank
from .measure import fresh_json, fresh_process, fmt_t, load_anndata, lognormalize, max_ulp_all, peak_bytes, reset_peak

MODULE = "autozyme.bench.calls"  # the workers: python -m autozyme.bench.calls --worker|--warmup ...

CALLS = {
    # name: (kwargs, minimal bytes moved per stored value for the roofline)
    "normalize_total": ({"target_sum": 1e4}, "read data twice, write once"),
    "log1p": ({}, "read data once, write once"),
    # scale's input is log1p-normalized data (see `lognormalize`); centring
    # makes the result dense (float64)
    "scale": ({"max_value": 8}, "read the sparse data twice, write the dense result once"),
    "highly_variable_genes": (
        {"flavor": "seurat_v3", "batch_key": "batch", "n_top_genes": 2000},
        "read data and indices twice",
    ),
    # Own rows, phases and data preparation: see rank.py.
    "rank_genes_groups": ({}, None),
}
# The calls this module measures (rank_genes_groups has its own module).
PP_CALLS = ("normalize_total", "log1p", "scale", "highly_variable_genes")
PHASES = ("first", "warm", "rerun")


def result_arrays(call: str, adata) -> dict:
    """What a call computed, for the comparison of both sides: hvg's var columns,
    else X's values and float var columns."""
    import scipy.sparse as sp

    if call == "highly_variable_genes":
        return {f"var_{k}": adata.var[k].to_numpy() for k in adata.var.columns}
    x = adata.X
    out = {"X": np.asarray(x.data) if sp.issparse(x) else np.ascontiguousarray(x).reshape(-1)}
    for col in adata.var.columns:
        if adata.var[col].dtype.kind == "f":
            out[f"var_{col}"] = adata.var[col].to_numpy()
    return out


def moved_bytes(call: str, res: dict) -> int:
    """Minimal bytes read and written, for the roofline."""
    if call == "scale":
        return 16 * res["nnz"] + 8 * res["cells"] * res["genes"]
    return {"normalize_total": 12, "log1p": 8, "highly_variable_genes": 16}[call] * res["nnz"]


# --- worker (one fresh process per side and call) -----------------------------
def worker(mode: str, call: str, data: Path, out: Path, pause: float) -> dict:
    import scanpy as sc

    daemon_pid = None
    if mode == "autozyme":
        import autozyme
        from autozyme.client import get_client

        os.environ.setdefault("AUTOZYME_STRICT", "1")
        autozyme.activate("scanpy")
        daemon_pid = get_client().connection().hello.pid
    fn = getattr(sc.pp, call)
    kwargs = CALLS[call][0]
    base = load_anndata(data)
    if call == "scale":
        base = lognormalize(base)
    result = {"mode": mode, "call": call, "nnz": int(base.X.nnz),
              "cells": base.n_obs, "genes": base.n_vars}
    if daemon_pid:
        result["daemon_threads"] = get_client().connection().hello.threads
    a = base.copy()
    b = base.copy()
    for phase, target in (("first", a), ("warm", b), ("rerun", b)):
        if phase != "first":
            time.sleep(pause)
        reset_peak("self")
        if daemon_pid:
            reset_peak(daemon_pid)
        t = time.perf_counter()
        fn(target, **kwargs)
        result[phase] = time.perf_counter() - t
        result[f"{phase}_client_peak"] = peak_bytes("self")
        result[f"{phase}_daemon_peak"] = peak_bytes(daemon_pid) if daemon_pid else 0
        if phase == "first":
            np.savez(out / f"{call}_{mode}.npz", **result_arrays(call, a))
    if mode == "autozyme":
        from autozyme import fallback

        result["served"] = fallback.counts()["served"].get(call, 0)
    return result


# --- parent ---------------------------------------------------------------------
# --- parent ---------------------------------------------------------------------
def _run_worker(mode: str, call: str, data: Path, out: Path, pause: float, env: dict | None = None) -> dict:
    return fresh_json(MODULE, "--worker", mode, call, str(data), str(out), str(pause),
                      what=f"{mode} {call} worker", env=env)


def run_workers(mode: str, call: str, data: Path, out: Path, pause: float, repeat: int,
                env: dict | None = None, progress=None) -> dict:
    """``repeat`` fresh worker processes of one side, merged (medians)."""
    runs = []
    for i in range(repeat):
        if progress:
            progress(f"{mode} run {i + 1}/{repeat}")
        runs.append(_run_worker(mode, call, data, out, pause, env))
    return _median_of(runs)


def warm_numba_cache(data: Path, calls, env: dict | None = None) -> None:
    """One throwaway upstream process that runs ``calls`` on small data, so
    numba's on-disk cache exists as it does for anyone who has called these
    functions before."""
    fresh_process(MODULE, "--warmup", str(data), ",".join(calls), what="numba warm-up", env=env)


def _warmup(data: Path, calls: list[str]) -> None:
    import scanpy as sc

    base = load_anndata(data)
    for call in calls:
        if call == "rank_genes_groups":
            sc.tl.rank_genes_groups(rank.prepare(base, base.n_obs, base.n_vars), "grp", **rank.KWARGS)
        elif call in CALLS:
            a = lognormalize(base.copy()) if call == "scale" else base.copy()
            getattr(sc.pp, call)(a, **CALLS[call][0])


def _median_of(runs) -> dict:
    """Per phase, the median time over fresh-process runs (this kind of machine
    varies a lot run to run); peaks are the largest seen; counts the smallest."""
    runs = list(runs)
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if not isinstance(value, (int, float)) or key in ("nnz",):
            continue
        values = [r[key] for r in runs]
        if key in PHASES:
            merged[key] = float(np.median(values))
        elif key.endswith("_peak"):
            merged[key] = max(values)
        else:
            merged[key] = min(values)
    merged["runs"] = len(runs)
    merged["all"] = {phase: [r[phase] for r in runs] for phase in PHASES}
    return merged


def measure_call(call: str, data: Path, out: Path, repeat: int, pause: float,
                 up_env: dict | None = None, az_env: dict | None = None, progress=None) -> dict:
    """Both sides of one call (``repeat`` fresh processes each) and their
    comparison: ``{call, upstream, autozyme, max_ulp, served, equivalent}``."""
    up = run_workers("upstream", call, data, out, pause, repeat, up_env, progress)
    fast = run_workers("autozyme", call, data, out, pause, repeat, az_env, progress)
    if progress:
        progress("comparing results")
    files = [out / f"{call}_{side}.npz" for side in ("upstream", "autozyme")]
    with np.load(files[0]) as a, np.load(files[1]) as b:
        ulp = max_ulp_all(a, b)
    for f in files:  # results can be GBs (scale is dense); the verdict is kept
        f.unlink(missing_ok=True)
    served = fast.get("served", 0)
    return dict(call=call, upstream=up, autozyme=fast, max_ulp=ulp, served=served,
                equivalent=ulp == 0 and served == len(PHASES))


def print_call(row: dict, bw: float) -> None:
    """The human-readable rows of one call, as `autozyme bench` prints them."""
    call, up, fast = row["call"], row["upstream"], row["autozyme"]
    print(f"{call}  ({up['nnz'] / 1e6:.1f}M non-zeros; max ulp vs upstream: {row['max_ulp']}; "
          f"calls served by autozyme: {row['served']} of 3 in every run)")
    print(f"  {'phase':<7} {'upstream':>12} {'autozyme':>12} {'speedup':>8}   "
          f"{'peak client (up)':>16} {'peak client+daemon (az)':>24}")
    for phase in PHASES:
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        az_mem = f"{mib(fast[f'{phase}_client_peak'])} + {mib(fast[f'{phase}_daemon_peak'])}"
        print(f"  {phase:<7} {fmt_t(up[phase]):>12} {fmt_t(fast[phase]):>12} "
              f"{up[phase] / fast[phase]:7.1f}x   {mib(up[f'{phase}_client_peak']):>16} {az_mem:>24}")
    moved = moved_bytes(call, up)
    print(f"  roofline: {CALLS[call][1]} = {moved / 1e9:.2f} GB / {bw / 1e9:.1f} GB/s "
          f"= {moved / bw * 1000:.0f} ms on one thread\n", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        res = worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), float(sys.argv[6]))
        print(json.dumps(res))
    elif len(sys.argv) == 4 and sys.argv[1] == "--warmup":
        _warmup(Path(sys.argv[2]), sys.argv[3].split(","))
    else:
        sys.exit("usage: python -m autozyme.bench.calls --worker MODE CALL DATA OUT PAUSE | --warmup DATA CALLS")
