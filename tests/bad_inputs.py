"""A corpus of bad and unusual inputs, run through a patched call by one side
(upstream or autozyme) in its own process: malformed CSR can make upstream's
compiled code read out of bounds, so a crash must not take the test run with it.

    python tests/bad_inputs.py <upstream|autozyme> <call> <case index>...

prints one JSON line per case: {"case", "outcome", "path"} where outcome is
"ok <digest of the AnnData's result>" or "raise <exception type>"; a line
"begin <i>" precedes each case so the parent can tell which one crashed.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(__file__))


def _base(dtype=np.float32, n_cells=40, n_genes=30, fmt="csr"):
    from _data import counts

    return counts(n_cells, n_genes, seed=3, dtype=dtype, fmt=fmt, zero_cells=[1], zero_genes=[2])


def _mutate(fn):
    def make():
        ad = _base()
        fn(ad.X)
        return ad
    return make


def _set(x, attr, values):
    setattr(x, attr, values)


def _backed():
    ad = _base()
    d = tempfile.mkdtemp(prefix="azm-bad-")
    atexit.register(shutil.rmtree, d, True)  # the file stays open until the case is done
    path = os.path.join(d, "x.h5ad")
    ad.write_h5ad(path)
    import anndata

    return anndata.read_h5ad(path, backed="r")


def _dask():
    import dask.array as da

    ad = _base(fmt="dense")
    ad.X = da.from_array(ad.X, chunks=(10, 30))
    return ad


def _with(values):
    def make():
        ad = _base()
        ad.X.data[:: max(1, ad.X.nnz // len(values))][: len(values)] = values
        return ad
    return make


def _fortran():
    ad = _base(fmt="dense")
    ad.X = np.asfortranarray(ad.X)
    return ad


def _strided():
    ad = _base(n_genes=60, fmt="dense")
    import anndata

    return anndata.AnnData(ad.X[:, ::2], obs=ad.obs)


CASES = {
    "valid CSR (control)": _base,
    "non-monotone indptr": _mutate(lambda x: x.indptr.__setitem__(5, x.indptr[4] - 3)),
    "indptr past the data": _mutate(lambda x: x.indptr.__setitem__(-1, x.indptr[-1] + 50)),
    "indices out of range": _mutate(lambda x: x.indices.__setitem__(3, x.shape[1] + 7)),
    "negative index": _mutate(lambda x: x.indices.__setitem__(3, -2)),
    "data shorter than indices": _mutate(lambda x: _set(x, "data", x.data[:-5].copy())),
    "unsorted indices": _mutate(lambda x: x.indices.__setitem__(slice(x.indptr[3], x.indptr[4]),
                                                               x.indices[x.indptr[3]:x.indptr[4]][::-1].copy())),
    "duplicate entries": _mutate(lambda x: x.indices.__setitem__(x.indptr[3] + 1, x.indices[x.indptr[3]])),
    "NaN values": _with([np.nan, np.nan]),
    "inf values": _with([np.inf, -np.inf]),
    "negative values": _with([-1.0, -3.0, -0.5]),
    "int64 indices and indptr": lambda: __import__("_data").counts(40, 30, seed=3, index_dtype=np.int64),
    "float64": lambda: _base(np.float64),
    "integer counts": lambda: _base(np.int64),
    "0 cells": lambda: _base(n_cells=0),
    "0 genes": lambda: _base(n_genes=0),
    "1 cell": lambda: _base(n_cells=1),
    "dense Fortran-ordered": _fortran,
    "dense strided view": _strided,
    "AnnData view": lambda: _base()[5:25],
    "backed AnnData": _backed,
    "dask array": _dask,
}

# Malformed structure: upstream's compiled code (scipy's C++ routines, numba)
# reads or writes out of bounds on these, and a corrupted heap can break any
# later case in the same process, so each runs in a process of its own. A clear
# ValueError from autozyme is the right outcome for them, whatever upstream did.
STRUCTURAL = {"non-monotone indptr", "indptr past the data", "data shorter than indices",
              "indices out of range", "negative index"}

CALLS = {
    "normalize_total": lambda sc, ad: sc.pp.normalize_total(ad, target_sum=1e4),
    "normalize_total exclude": lambda sc, ad: sc.pp.normalize_total(ad, exclude_highly_expressed=True),
    "log1p": lambda sc, ad: sc.pp.log1p(ad),
    "scale": lambda sc, ad: sc.pp.scale(ad, max_value=8),
    "scale zero_center=False": lambda sc, ad: sc.pp.scale(ad, zero_center=False),
    "highly_variable_genes": lambda sc, ad: sc.pp.highly_variable_genes(
        ad, flavor="seurat_v3", n_top_genes=10, batch_key="batch"),
    "rank_genes_groups": lambda sc, ad: sc.tl.rank_genes_groups(
        ad, "cluster", method="wilcoxon", pts=True, tie_correct=True),
}
# leiden takes a graph, not a count matrix: its odd graphs and bad arguments are
# tested in tests/test_leiden.py.


def digest(ad) -> str:
    """Bits of the result: X (any format), obs/var columns and uns keys."""
    h = hashlib.sha256()
    x = ad.X
    if hasattr(x, "compute"):
        x = x.compute()
    if sp.issparse(x):
        for a in (x.data, x.indices, x.indptr):
            h.update(np.ascontiguousarray(a).view(np.uint8))
        h.update(f"{x.format}{x.dtype}{x.shape}".encode())
    elif x is not None:
        x = np.asarray(x[:] if hasattr(x, "shape") and not isinstance(x, np.ndarray) else x)
        h.update(np.ascontiguousarray(x).view(np.uint8))
        h.update(f"{x.dtype}{x.shape}".encode())
    for frame in (ad.obs, ad.var):
        for col in frame.columns:
            h.update(f"{col}{frame[col].dtype}".encode())
            h.update(repr(frame[col].tolist()).encode())
    for key in sorted(ad.uns.keys()):
        h.update(key.encode())
        h.update(repr(ad.uns[key]).encode())  # small results, printed in full
    return h.hexdigest()[:16]


def main(side: str, call: str, indices: list[int]) -> None:
    warnings.simplefilter("ignore")
    np.set_printoptions(threshold=sys.maxsize)
    import scanpy as sc

    if side == "autozyme":
        import autozyme
        from autozyme import fallback

        autozyme.activate("scanpy", prewarm=False)
    names = list(CASES)
    for i in indices:
        print(f"begin {i}", flush=True)
        try:
            ad = CASES[names[i]]()
        except Exception as e:  # noqa: BLE001 - the input itself cannot be built
            print(json.dumps(dict(case=names[i], outcome=f"unbuildable {type(e).__name__}")), flush=True)
            continue
        path = ""
        if side == "autozyme":
            fallback.reset_counts()
        try:
            CALLS[call](sc, ad)
            outcome = f"ok {digest(ad)}"
        except Exception as e:  # noqa: BLE001 - the outcome is the exception's type
            outcome = f"raise {type(e).__name__}"
        if side == "autozyme":
            c = fallback.counts()
            reasons = [r for per_call in c["fallbacks"].values() for r in per_call]
            if c["served"]:
                path = "served"
            elif reasons:
                path = f"upstream ({'; '.join(reasons)})"
            else:
                path = "refused by autozyme" if outcome.startswith("raise") else "delegated"
        print(json.dumps(dict(case=names[i], outcome=outcome, path=path)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3:]])
