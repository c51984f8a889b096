"""Shared measuring for ``autozyme bench``: data, memory, comparison, fresh processes.

The bottom of the benchmark package: the generated count matrices and their
cache, AnnData loading and batch labels, peak resident memory (VmHWM, reset
through /proc/<pid>/clear_refs), the ulp comparison of results, copy bandwidth
for the roofline, the fresh-process runner every side of every call goes
through, and ``autozyme daemon start|stop`` for daemons of their own. It
imports nothing else of the package; the per-call runners (calls.py, rank.py,
leiden.py, on_dask.py), the report and the command line build on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Cells per batch, as fractions: 7 batches of unequal size (for batch_key calls).
BATCH_FRACTIONS = (0.30, 0.22, 0.16, 0.12, 0.10, 0.06, 0.04)


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



# --- memory ---------------------------------------------------------------------
def reset_peak(pid: int | str) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_bytes(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- comparison -----------------------------------------------------------------
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


# --- fresh processes ------------------------------------------------------------
def fresh_process(module: str, *argv: str, what: str, env: dict | None = None) -> str:
    """``python -m module argv...`` in a fresh process with ``env`` added to this
    one's environment; its stdout. Raises RuntimeError("<what> failed: <stderr>")."""
    cmd = [sys.executable, "-m", module, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def fresh_json(module: str, *argv: str, what: str, env: dict | None = None) -> dict:
    """`fresh_process`, whose last line of output is a JSON result."""
    return json.loads(fresh_process(module, *argv, what=what, env=env).strip().splitlines()[-1])


def daemon_cli(action: str, env: dict) -> str | None:
    """``autozyme daemon start|stop`` in a subprocess with ``env`` (its own
    runtime dir and thread count), leaving this process's client alone.
    Returns the error output when it failed."""
    proc = subprocess.run([sys.executable, "-m", "autozyme.cli", "daemon", action], env={**os.environ, **env},
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()




def warm_worker_ready() -> str:
    """``autozyme warm --wait`` (the warm worker of neighbors/umap, compiled, as on
    any machine where autozyme ran before); what happened, for the report."""
    proc = subprocess.run([sys.executable, "-m", "autozyme.cli", "warm", "--wait"],
                          capture_output=True, text=True)
    return "autozyme warm --wait: ok" if proc.returncode == 0 else \
        f"autozyme warm --wait failed: {(proc.stderr or proc.stdout).strip()[-300:]}"


def fmt_t(s: float) -> str:
    return f"{s * 1000:8.1f} ms" if s < 10 else f"{s:8.2f} s "
