"""sc.pp.log1p on dask arrays: autozyme's graph against upstream's, bit for bit,
chunk by chunk, with the same chunking."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

from _data import assert_identical, counts  # noqa: E402


def _scanpy_has_dask_path():
    from autozyme import versions
    from autozyme.patches import log1p as patch

    return versions.pick(patch.UPSTREAM).dask


pytestmark = pytest.mark.skipif(not _scanpy_has_dask_path(), reason="this scanpy's log1p is not served on dask")

SYNC = dict(scheduler="sync")


def to_dask(m, rows):
    """Row chunks spanning all genes; sparse chunks stay sparse."""
    return da.from_array(m, chunks=(rows, -1), asarray=False)


def make(fmt, dtype, n_cells=230, n_genes=150, rows=64, seed=1, where="X", index_dtype=None):
    ad = counts(n_cells, n_genes, dtype=dtype, fmt=fmt, seed=seed, index_dtype=index_dtype, zero_cells=[2, 70], zero_genes=[4])
    x = to_dask(ad.X, rows)
    if where == "X":
        ad.X = x
    elif where == "layer":
        ad.layers["counts"] = x
    else:
        ad.obsm["counts"] = x
    return ad


def assert_same_dask(a, b, what="X"):
    """Same lazy array (dtype, meta, chunks) and the same computed chunks."""
    assert isinstance(a, da.Array) and isinstance(b, da.Array), what
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert type(a._meta) is type(b._meta) and a._meta.dtype == b._meta.dtype, f"{what}: meta"
    assert a.chunks == b.chunks, f"{what}: chunks"
    ca = dask.compute(*a.to_delayed().ravel(), **SYNC)
    cb = dask.compute(*b.to_delayed().ravel(), **SYNC)
    for i, (p, q) in enumerate(zip(ca, cb)):
        assert_identical(p, q, f"{what} chunk {i}")
    assert_identical(a.compute(**SYNC), b.compute(**SYNC), what)


def upstream_log1p(*args, **kwargs):
    """Upstream with autozyme deactivated (its AnnData path calls the patched
    module-level log1p for the array)."""
    import scanpy as sc

    import autozyme

    autozyme.deactivate()
    try:
        return sc.pp.log1p(*args, **kwargs)
    finally:
        autozyme.activate("scanpy", prewarm=False)


def chunk_served():
    from autozyme import fallback

    return fallback.counts()["served"].get("log1p (dask chunk)", 0)


def run_both(sc, build, kwargs, where="X"):
    fast = sc.pp.log1p
    a, b = build(), build()
    ra = upstream_log1p(a, **kwargs)
    rb = fast(b, **kwargs)
    from autozyme import fallback

    assert fallback.counts()["served"].get("log1p", 0) == 1
    if kwargs.get("copy"):
        a, b = ra, rb
    else:
        assert ra is None and rb is None
    get = {"X": lambda ad: ad.X, "layer": lambda ad: ad.layers["counts"], "obsm": lambda ad: ad.obsm["counts"]}[where]
    assert_same_dask(get(a), get(b), where)
    assert a.uns["log1p"] == b.uns["log1p"]
    assert a.uns.keys() == b.uns.keys()
    assert chunk_served() >= get(b).numblocks[0]


@pytest.mark.parametrize("fmt", ["csr", "csr_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kwargs", [{}, {"base": 2}, {"base": 10.0}, {"base": np.float32(3)}, {"copy": True}, {"base": np.e, "copy": True}], ids=repr)
def test_anndata_matches_upstream(active, fmt, dtype, kwargs):
    run_both(active, lambda: make(fmt, dtype), kwargs)


@pytest.mark.parametrize(
    ("shape", "rows"),
    [((230, 150), 230), ((230, 150), 100), ((97, 31), 13), ((1, 20), 1), ((40, 1), 7)],
    ids=["one-chunk", "uneven-last", "small-chunks", "one-cell", "one-gene"],
)
def test_shapes_and_chunkings(active, shape, rows):
    run_both(active, lambda: make("csr", np.float32, *shape, rows=rows, seed=3), {"base": 2})


@pytest.mark.parametrize("where", ["layer", "obsm"])
def test_layer_and_obsm(active, where):
    kw = {"layer": "counts"} if where == "layer" else {"obsm": "counts"}
    run_both(active, lambda: make("csr_array", np.float32, where=where), kw, where=where)


def test_all_zero_chunk(active):
    def build():
        ad = counts(60, 20, dtype=np.float32, seed=2, zero_cells=range(20, 40))
        ad.X = to_dask(ad.X, 20)  # the middle chunk has no stored values
        return ad

    run_both(active, build, {})


def test_non_canonical_chunks_dedupe_as_upstream(active):
    """Duplicates are summed by scipy before log1p (in place on the chunk)."""

    def build():
        m = sp.csr_matrix(
            (np.array([1, 2, 3, 4, 5], np.float32), np.array([3, 1, 1, 0, 2]), np.array([0, 3, 5, 5])),
            shape=(3, 4),
        )
        return m

    fast, upstream = active.pp.log1p, upstream_log1p
    # one chunk holding the matrix as given (from_array would slice a copy)
    a = da.from_delayed(dask.delayed(build)(), shape=(3, 4), dtype=np.float32, meta=sp.csr_matrix((0, 0), dtype=np.float32))
    b = da.from_delayed(dask.delayed(build)(), shape=(3, 4), dtype=np.float32, meta=sp.csr_matrix((0, 0), dtype=np.float32))
    assert_same_dask(upstream(a, base=2), fast(b, base=2))


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=lambda d: np.dtype(d).name)
def test_dask_array_input(active, copy, dtype):
    """A dask array passed directly: upstream rebinds the float input itself
    (``np.log1p(x, out=x)``) unless ``copy``; autozyme does the same."""
    fast, upstream = active.pp.log1p, upstream_log1p
    xa = to_dask(counts(120, 40, dtype=dtype, seed=4).X, 50)
    xb = to_dask(counts(120, 40, dtype=dtype, seed=4).X, 50)
    ra, rb = upstream(xa, copy=copy, base=2), fast(xb, copy=copy, base=2)
    assert (ra is xa) == (rb is xb)
    assert_same_dask(ra, rb)
    assert_same_dask(xa, xb, "input after the call")


def test_dense_chunks_fall_back(active, monkeypatch):
    """Dense chunks: upstream's chunk work is already minimal; upstream runs."""
    from autozyme import fallback

    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    fast, upstream = active.pp.log1p, upstream_log1p
    a, b = make("dense", np.float32), make("dense", np.float32)
    upstream(a, base=2)
    fast(b, base=2)
    assert_same_dask(a.X, b.X)
    assert any("ndarray chunks" in r for r in fallback.counts()["fallbacks"]["log1p"])


@pytest.mark.parametrize("fmt", ["csr", "csr_array"])
def test_int64_structure(active, fmt):
    """int64 indices/indptr: scipy's constructor decides the result's index dtype
    (a csr_matrix narrows what fits, a csr_array keeps it) the same way for
    autozyme's shared arrays as for upstream's copies."""
    run_both(active, lambda: make(fmt, np.float32, index_dtype=np.int64), {"base": 2})


@pytest.mark.parametrize("cls", [sp.csr_matrix, sp.csr_array], ids=["csr_matrix", "csr_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("base", [2, 10.0, np.float32(3), np.e])
def test_chunk_functions_equal_upstreams_leaves(active, cls, dtype, base):
    """The leaves on one chunk (-0.0, negatives, NaN, an empty row, int64
    structure): equal to ``np.log1p(chunk)`` and ``np.divide(chunk, np.log(base))``,
    and sharing the chunk's structure instead of copying it."""
    from autozyme.dask import log1p as dl

    data = np.array([-0.0, 0.0, 3.0, -0.5, np.nan, 1e30, 7.0, 1e-8], dtype)
    parts = (np.array([1, 1, 2, 0, 2, 3, 3, 3], np.int64), np.array([0, 1, 1, 3, 6, 7, 8], np.int64))

    def chunk():
        return cls((data.copy(), *(p.copy() for p in parts)), shape=(6, 4))

    with np.errstate(invalid="ignore"):
        ours, theirs = dl.log1p_chunk(chunk()), np.log1p(chunk())
        assert_identical(ours, theirs, "log1p")
        log_base = np.log(base)
        c = chunk()
        q = dl.divide_chunk(c, log_base)
        assert_identical(q, np.divide(chunk(), log_base), "divide")
    if c.indices.dtype == q.indices.dtype:  # csr_matrix narrows int64 (new arrays)
        assert np.shares_memory(q.indices, c.indices) and np.shares_memory(q.indptr, c.indptr)


def test_column_chunks(active):
    def build():
        ad = counts(150, 90, dtype=np.float32, seed=5)
        ad.X = da.from_array(ad.X, chunks=(40, 25), asarray=False)
        return ad

    run_both(active, build, {"base": 2})
