"""``autozyme bench``: upstream scanpy and autozyme side by side, in fresh processes.

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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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
    # Own rows, phases and data preparation: see bench_rank.py.
    "rank_genes_groups": ({}, None),
}
# Cells per batch, as fractions: 7 batches of unequal size (for batch_key calls).
BATCH_FRACTIONS = (0.30, 0.22, 0.16, 0.12, 0.10, 0.06, 0.04)
PHASES = ("first", "warm", "rerun")


def stack_versions() -> str:
    """The stack a run measured: Python and the versions of scanpy and what it runs on."""
    import importlib.metadata
    import platform

    names = ("scanpy", "anndata", "numpy", "scipy", "pandas", "numba")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}, " + ", ".join(found)


# --- data -----------------------------------------------------------------------
def make_counts(n_cells: int, n_genes: int, density: float, seed: int = 0):
    """A realistic-looking count matrix, vectorized: gene popularity is lognormal,
    cells have lognormal depth, 8 clusters re-weight genes, 4 batches shift depth;
    values are Poisson + 1 (so many ties). Returns CSR (float32)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    depth = rng.lognormal(0, 0.4, n_cells) * (1 + 0.25 * rng.integers(0, 4, n_cells))
    k = np.minimum(rng.poisson(density * n_genes * depth / depth.mean()), n_genes).astype(np.int64)
    popularity = rng.lognormal(0, 1.0, n_genes)
    cdf = np.cumsum(popularity)
    cdf /= cdf[-1]
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), k)
    genes = np.searchsorted(cdf, rng.random(rows.size)).clip(max=n_genes - 1)
    key = rows * n_genes + genes
    del rows, genes
    key.sort()
    keep = np.ones(key.size, dtype=bool)
    keep[1:] = key[1:] != key[:-1]
    key = key[keep]
    del keep
    rows = (key // n_genes).astype(np.int64)
    cols = (key % n_genes).astype(np.int32)
    del key
    cluster = rng.integers(0, 8, n_cells)
    program = rng.lognormal(0, 0.5, (8, n_genes)).astype(np.float32)
    lam = (popularity[cols] / popularity.mean() * 0.5).astype(np.float32)
    lam *= program[cluster[rows], cols]
    lam *= depth[rows].astype(np.float32)
    data = (rng.poisson(lam) + 1).astype(np.float32)
    del lam
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_cells), out=indptr[1:])
    indptr = indptr.astype(np.int32) if indptr[-1] < 2**31 else indptr
    return sp.csr_matrix((data, cols, indptr), shape=(n_cells, n_genes))


def dataset_path(cache: Path, cells: int, genes: int, density: float) -> Path:
    path = cache / f"counts_{cells}x{genes}_{density:g}.npz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        x = make_counts(cells, genes, density)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, data=x.data, indices=x.indices, indptr=x.indptr, shape=np.array(x.shape))
        tmp.rename(path)
        print(f"generated {cells} x {genes} counts, {x.nnz / 1e6:.1f}M non-zeros "
              f"({x.nnz / cells / genes:.1%}) in {time.perf_counter() - t:.1f}s -> {path}", flush=True)
    return path


def load_anndata(path: Path):
    import anndata as ad
    import scipy.sparse as sp

    z = np.load(path)
    x = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    a = ad.AnnData(x)
    a.obs["batch"] = batch_labels(a.n_obs)
    return a


def batch_labels(n_cells: int, seed: int = 0):
    """A categorical batch per cell: ``BATCH_FRACTIONS`` of the cells, shuffled."""
    import pandas as pd

    sizes = np.floor(np.array(BATCH_FRACTIONS) * n_cells).astype(int)
    sizes[0] += n_cells - sizes.sum()
    labels = np.repeat([f"b{k}" for k in range(len(sizes))], sizes)
    np.random.default_rng(seed).shuffle(labels)
    return pd.Categorical(labels)


def lognormalize(adata):
    """Counts per cell scaled to 1e4, then log1p, float32: what scale usually gets."""
    x = adata.X
    sums = np.asarray(x.sum(axis=1)).ravel()
    sums[sums == 0] = 1
    x.data = np.log1p(x.data / np.repeat(sums, np.diff(x.indptr)).astype(np.float32) * 1e4).astype(np.float32)
    return adata


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


# --- memory ---------------------------------------------------------------------
def _reset_peak(pid: int | str) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_bytes(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
        _reset_peak("self")
        if daemon_pid:
            _reset_peak(daemon_pid)
        t = time.perf_counter()
        fn(target, **kwargs)
        result[phase] = time.perf_counter() - t
        result[f"{phase}_client_peak"] = _peak_bytes("self")
        result[f"{phase}_daemon_peak"] = _peak_bytes(daemon_pid) if daemon_pid else 0
        if phase == "first":
            np.savez(out / f"{call}_{mode}.npz", **result_arrays(call, a))
    if mode == "autozyme":
        from autozyme import fallback

        result["served"] = fallback.counts()["served"].get(call, 0)
    return result


# --- parent ---------------------------------------------------------------------
def max_ulp(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 22) -> int | None:
    if a.shape != b.shape or a.dtype != b.dtype:
        return None
    if a.size == 0:
        return 0
    ints = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    va, vb = a.reshape(-1).view(ints), b.reshape(-1).view(ints)
    worst = 0
    # In chunks: the report compares results of several GB, and the int64
    # copies of whole arrays would need four times that.
    for start in range(0, va.size, chunk):
        ia = va[start:start + chunk].astype(np.int64)
        ib = vb[start:start + chunk].astype(np.int64)
        # Map the sign-magnitude float encoding onto a monotone integer line.
        ia = np.where(ia < 0, np.iinfo(ints).min - ia, ia)
        ib = np.where(ib < 0, np.iinfo(ints).min - ib, ib)
        worst = max(worst, int(np.max(np.abs(ia - ib))))
    return worst


def max_ulp_all(a, b) -> int | None:
    """The largest ulp difference over same-named float arrays; non-float arrays
    must be equal (else None, as for differing dtypes or names)."""
    if sorted(a.files) != sorted(b.files):
        return None
    worst = 0
    for k in a.files:
        x, y = a[k], b[k]
        if x.dtype.kind == "f":
            u = max_ulp(x, y)
        else:
            u = 0 if x.dtype == y.dtype and np.array_equal(x, y) else None
        if u is None:
            return None
        worst = max(worst, u)
    return worst


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Single-thread copy bandwidth (bytes/s, read + write counted) on warm pages."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def touch_memory(nbytes: int) -> None:
    """Write ``nbytes`` of fresh memory once, then free it. On virtual machines
    the first touch of guest memory the host has not backed yet costs ~10x a
    normal page fault; whichever side ran first would pay it. Touching it up
    front makes both sides see the machine's steady state."""
    block = np.ones(max(nbytes, 0) // 8)
    del block


def _run_worker(mode: str, call: str, data: Path, out: Path, pause: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "autozyme.bench", "--worker", mode, call, str(data), str(out), str(pause)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {call} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    cmd = [sys.executable, "-m", "autozyme.bench", "--warmup", str(data), ",".join(calls)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"numba warm-up failed:\n{proc.stderr[-3000:]}")


def _warmup(data: Path, calls: list[str]) -> None:
    import scanpy as sc

    base = load_anndata(data)
    for call in calls:
        if call == "rank_genes_groups":
            from .bench_rank import KWARGS, prepare

            sc.tl.rank_genes_groups(prepare(base, base.n_obs, base.n_vars), "grp", **KWARGS)
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


def _fmt_t(s: float) -> str:
    return f"{s * 1000:8.1f} ms" if s < 10 else f"{s:8.2f} s "


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
        print(f"  {phase:<7} {_fmt_t(up[phase]):>12} {_fmt_t(fast[phase]):>12} "
              f"{up[phase] / fast[phase]:7.1f}x   {mib(up[f'{phase}_client_peak']):>16} {az_mem:>24}")
    moved = moved_bytes(call, up)
    print(f"  roofline: {CALLS[call][1]} = {moved / 1e9:.2f} GB / {bw / 1e9:.1f} GB/s "
          f"= {moved / bw * 1000:.0f} ms on one thread\n", flush=True)


def daemon_cli(action: str, env: dict) -> str | None:
    """``autozyme daemon start|stop`` in a subprocess with ``env`` (its own
    runtime dir and thread count), leaving this process's client alone.
    Returns the error output when it failed."""
    proc = subprocess.run([sys.executable, "-m", "autozyme.cli", "daemon", action], env={**os.environ, **env},
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()


def run(args) -> int:
    if args.report:
        from . import bench_report

        return bench_report.run(args)
    if args.dask:
        from . import bench_dask

        return bench_dask.run(args)
    from .client import get_client

    args.repeat = args.repeat or 3
    cache = Path(args.cache).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_path(cache, args.cells, args.genes, args.density)
    calls = [c for c in (args.calls or ",".join(CALLS)).split(",") if c]
    leiden_ok = True
    if "leiden" in calls:  # a graph, not a count matrix: its own rows (bench_leiden.py)
        from . import bench_leiden

        calls.remove("leiden")
        leiden_ok = bench_leiden.run(cache, out, args.leiden_cells, args.leidenalg)
        if not calls:
            return 0 if leiden_ok else 1
    hello = get_client().connection().hello  # a running daemon, as after login
    touch_memory(8 * data.stat().st_size)
    bw = copy_bandwidth()
    print(f"\nautozyme bench: {args.cells} cells x {args.genes} genes, density {args.density:g}; "
          f"daemon pid {hello.pid} with {hello.threads} threads; {os.cpu_count()} cores; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (1 thread); phases {args.pause:g} s apart; "
          f"median of {args.repeat} fresh processes per side; {stack_versions()}\n", flush=True)
    rows = []
    if "rank_genes_groups" in calls:
        from . import bench_rank

        calls.remove("rank_genes_groups")
        if not bench_rank.run_call(args, data, out, hello.threads):
            rows.append(dict(call="rank_genes_groups", upstream={}, autozyme={}, max_ulp=None,
                             served=0, equivalent=False))
            # (rank_genes_groups prints its own rows and is listed here only if it failed)
    # One throwaway upstream run, so numba's on-disk cache exists as it does for
    # anyone who has called these functions before.
    if calls:
        _run_worker("upstream", calls[0], data, out, 0)
    for call in calls:
        # scale gets the genes it usually gets (--scale-genes): its result is dense,
        # and on all genes of a large matrix upstream's would not fit in memory.
        call_data = data
        if call == "scale" and args.scale_genes < args.genes:
            call_data = dataset_path(cache, args.cells, args.scale_genes, args.density)
        row = measure_call(call, call_data, out, args.repeat, args.pause)
        rows.append(row)
        print_call(row, bw)
    (out / "bench.json").write_text(json.dumps(
        [{k: r[k] for k in ("call", "upstream", "autozyme", "max_ulp")} for r in rows], indent=1))
    bad = [r["call"] for r in rows if not r["equivalent"]]
    if bad:
        print(f"NOT EQUIVALENT or not served: {', '.join(bad)}")
        return 1
    return 0 if leiden_ok else 1


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="time upstream scanpy and autozyme side by side",
                       description="Time upstream scanpy and autozyme side by side, in fresh processes. "
                       "With --report DIR: every call on dataset tiers and thread counts, written to "
                       "DIR/report.md (tables, charts) and DIR/report.json.")
    b.add_argument("--cells", type=int, default=100_000)
    b.add_argument("--genes", type=int, default=25_000)
    b.add_argument("--density", type=float, default=0.07)
    b.add_argument("--calls", default=None,
                   help=f"comma-separated, from {', '.join([*CALLS, 'leiden'])} "
                        f"(default: all but leiden; with --report: all)")
    b.add_argument("--leiden-cells", type=int, default=20_000, help="nodes of the kNN graph for leiden")
    b.add_argument("--leidenalg", action="store_true",
                   help="leiden: also upstream's default flavor='leidenalg' (slow) and parallel mode on it")
    b.add_argument("--rgg-cells", type=int, default=20_000,
                   help="rank_genes_groups: cells taken from the dataset (upstream is slow)")
    b.add_argument("--rgg-genes", type=int, default=10_000,
                   help="rank_genes_groups: genes taken from the dataset")
    b.add_argument("--cache", default="~/.cache/autozyme/bench")
    b.add_argument("--out", default="bench-out")
    b.add_argument("--repeat", type=int, default=None,
                   help="fresh-process runs per side (medians; default 3, with --report 1)")
    b.add_argument("--pause", type=float, default=1.0,
                   help="seconds between phases, as between notebook cells (0: back to back)")
    r = b.add_argument_group("report (--report DIR)")
    r.add_argument("--report", metavar="DIR", default=None,
                   help="run every call on dataset tiers at every thread count and write DIR/report.md "
                        "(tables and PNG charts) and DIR/report.json")
    r.add_argument("--tiers", default="small,medium,large",
                   help="comma-separated: small (20,000 x 20,000), medium (100,000 x 25,000), large "
                        "(25,000 genes, cells from MemAvailable: 60%% of it at 80 kB per cell, in steps "
                        "of 10,000, skipped unless above medium), or CELLSxGENES (e.g. 3000x2000)")
    r.add_argument("--threads", default=None,
                   help="thread counts, e.g. 1,2 or 1-4 (default: 1, 2, 4, ... and all cores). Upstream "
                        "gets NUMBA_NUM_THREADS, autozyme a daemon of its own with AUTOZYME_THREADS, per count")
    b.add_argument("--scale-genes", type=int, default=3_000,
                   help="scale: genes of its matrix (the highly variable genes scale usually gets; "
                        "its result is dense)")
    d = b.add_argument_group("dask (--dask)")
    d.add_argument("--dask", action="store_true",
                   help="upstream on Dask against autozyme on Dask, per call, on a zarr store read lazily "
                        "(LocalCluster per side, fresh processes); wilcoxon on Dask against upstream in memory")
    d.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster (1 thread each)")
    d.add_argument("--worker-memory", default="auto",
                   help="memory limit of each worker, as dask.distributed takes it (e.g. 2GiB; auto: "
                        "the machine's memory over the workers)")
    d.add_argument("--dask-chunk-rows", type=int, default=10_000, help="cells per row chunk of the store")
    d.add_argument("--dask-input", choices=("store", "persisted"), default="store",
                   help="store: each call reads the zarr store lazily (as an atlas is read); persisted: "
                        "the store is first read into the workers' memory (not timed), so the timings "
                        "are the calls' own chunk work")
    b.set_defaults(func=run)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        res = worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), float(sys.argv[6]))
        print(json.dumps(res))
    elif len(sys.argv) == 4 and sys.argv[1] == "--warmup":
        _warmup(Path(sys.argv[2]), sys.argv[3].split(","))
    else:
        sys.exit("usage: python -m autozyme.bench --worker MODE CALL DATA OUT PAUSE | --warmup DATA CALLS")
