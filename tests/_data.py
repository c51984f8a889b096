"""Test data made in the test (nothing large is committed) and exact comparison."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def counts(n_cells, n_genes, *, density=0.07, dtype=np.float32, fmt="csr", seed=0,
           zero_cells=(), zero_genes=(), n_clusters=4, n_batches=3, index_dtype=None):
    """A count matrix with cluster-specific gene programs, batch depth effects,
    ties (small integer counts), and chosen all-zero cells and genes."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, n_clusters, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    depth = rng.lognormal(0, 0.5, n_cells) * (1 + batch * 0.3)
    gene_rate = rng.lognormal(-1, 1.2, n_genes)
    program = rng.lognormal(0, 0.6, (n_clusters, n_genes))
    nnz_per_cell = rng.binomial(n_genes, density, n_cells)
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        g = rng.choice(n_genes, nnz_per_cell[i], replace=False) if n_genes else np.empty(0, int)
        lam = gene_rate[g] * program[cluster[i], g] * depth[i]
        v = rng.poisson(lam) + 1
        rows.append(np.full(len(g), i))
        cols.append(g)
        vals.append(v)
    r = np.concatenate(rows) if rows else np.empty(0, int)
    c = np.concatenate(cols) if cols else np.empty(0, int)
    v = np.concatenate(vals) if vals else np.empty(0)
    keep = ~np.isin(r, list(zero_cells)) & ~np.isin(c, list(zero_genes))
    m = sp.csr_matrix((v[keep].astype(dtype), (r[keep], c[keep])), shape=(n_cells, n_genes))
    m.sum_duplicates()
    m.sort_indices()
    if index_dtype is not None:
        m.indices = m.indices.astype(index_dtype)
        m.indptr = m.indptr.astype(index_dtype)
    if fmt == "dense":
        m = m.toarray()
    elif fmt == "csc":
        m = m.tocsc()
    elif fmt == "csr_array":
        m = sp.csr_array(m)
    elif fmt == "csc_array":
        m = sp.csc_array(m.tocsc())
    elif fmt != "csr":
        raise ValueError(f"unknown format {fmt!r}")
    ad = AnnData(m)
    ad.obs["cluster"] = [f"c{k}" for k in cluster]
    ad.obs["batch"] = [f"b{k}" for k in batch]
    ad.obs_names = [f"cell{i}" for i in range(n_cells)]
    ad.var_names = [f"gene{j}" for j in range(n_genes)]
    return ad


def assert_identical(a, b, what="value"):
    """Same type, format, dtype, shape and bits (NaNs included)."""
    assert type(a) is type(b), f"{what}: {type(a)} vs {type(b)}"
    if sp.issparse(a):
        assert a.format == b.format and a.shape == b.shape, what
        assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
        assert a.indices.dtype == b.indices.dtype and a.indptr.dtype == b.indptr.dtype, what
        assert np.array_equal(a.indptr, b.indptr), f"{what}: indptr"
        assert np.array_equal(a.indices, b.indices), f"{what}: indices"
        assert_identical(np.asarray(a.data), np.asarray(b.data), what + ".data")
        return
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        if a.dtype.hasobject:
            assert repr(a.tolist()) == repr(b.tolist()), what
            return
        assert a.flags.c_contiguous == b.flags.c_contiguous, f"{what}: memory order"
        assert a.flags.f_contiguous == b.flags.f_contiguous, f"{what}: memory order"
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        diff = np.flatnonzero(a.view(np.uint8).reshape(-1) != b.view(np.uint8).reshape(-1)) if a.size else []
        assert len(diff) == 0, f"{what}: differs at {len(diff)} bytes"
        return
    assert a == b, f"{what}: {a!r} vs {b!r}"


def _assert_same_frame(a, b, what):
    """Same columns and dtypes; float columns bit for bit, others equal."""
    assert list(a.columns) == list(b.columns), what
    for col in a.columns:
        ca, cb = a[col], b[col]
        assert ca.dtype == cb.dtype, f"{what}[{col}] dtype"
        if ca.dtype.kind == "f":
            assert_identical(ca.to_numpy(), cb.to_numpy(), f"{what}[{col}]")
        else:
            assert ca.equals(cb), f"{what}[{col}]"


def assert_same_anndata(a: AnnData, b: AnnData):
    assert_identical(a.X, b.X, "X")
    _assert_same_frame(a.obs, b.obs, "obs")
    _assert_same_frame(a.var, b.var, "var")
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        assert_identical(a.layers[k], b.layers[k], f"layers[{k}]")
    assert set(a.obsm) == set(b.obsm)
    for k in a.obsm:
        assert_identical(np.asarray(a.obsm[k]), np.asarray(b.obsm[k]), f"obsm[{k}]")
    assert a.uns.keys() == b.uns.keys()
