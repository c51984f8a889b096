"""sc.pp.normalize_total on dask arrays: autozyme's graph against upstream's,
bit for bit, chunk by chunk, with the same chunking."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

from _data import _assert_same_frame, assert_identical, counts  # noqa: E402


def _scanpy_has_dask_path():
    from autozyme import versions
    from autozyme.patches import normalize_total as patch

    return versions.pick(patch.UPSTREAM).dask


pytestmark = pytest.mark.skipif(
    not _scanpy_has_dask_path(), reason="this scanpy's normalize_total is not served on dask"
)

SYNC = dict(scheduler="sync")


@pytest.fixture(autouse=True)
def _sync_scheduler():
    # _compute_nnz_median computes with the configured scheduler; keep it local.
    with dask.config.set(scheduler="sync"):
        yield


def to_dask(m, rows):
    return da.from_array(m, chunks=(rows, -1), asarray=False)


def make(fmt, dtype, n_cells=230, n_genes=150, rows=64, seed=1, where="X", index_dtype=None, zero_cells=(2, 70)):
    ad = counts(n_cells, n_genes, dtype=dtype, fmt=fmt, seed=seed, index_dtype=index_dtype, zero_cells=zero_cells, zero_genes=[4])
    x = to_dask(ad.X, rows)
    if where == "X":
        ad.X = x
    elif where == "layer":
        ad.layers["counts"] = x
    else:
        ad.obsm["counts"] = x
    return ad


def assert_same_dask(a, b, what="X"):
    assert isinstance(a, da.Array) and isinstance(b, da.Array), what
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert type(a._meta) is type(b._meta) and a._meta.dtype == b._meta.dtype, f"{what}: meta"
    assert a.chunks == b.chunks, f"{what}: chunks"
    ca = dask.compute(*a.to_delayed().ravel(), **SYNC)
    cb = dask.compute(*b.to_delayed().ravel(), **SYNC)
    for i, (p, q) in enumerate(zip(ca, cb)):
        assert_identical(p, q, f"{what} chunk {i}")
    assert_identical(a.compute(**SYNC), b.compute(**SYNC), what)


def upstream_normalize_total(*args, **kwargs):
    import scanpy as sc

    import autozyme

    autozyme.deactivate()
    try:
        return sc.pp.normalize_total(*args, **kwargs)
    finally:
        autozyme.activate("scanpy", prewarm=False)


def counts_of():
    from autozyme import fallback

    return fallback.counts()


def run_both(sc, build, kwargs, where="X"):
    from autozyme import fallback

    fallback.reset_counts()
    a, b = build(), build()
    ra = upstream_normalize_total(a, **kwargs)
    rb = sc.pp.normalize_total(b, **kwargs)
    assert counts_of()["served"].get("normalize_total", 0) == 1, counts_of()
    get = {"X": lambda ad: ad.X, "layer": lambda ad: ad.layers["counts"], "obsm": lambda ad: ad.obsm["counts"]}[where]
    if kwargs.get("inplace") is False:
        assert ra.keys() == rb.keys()
        assert_same_dask(ra["X"], rb["X"], "X")
        assert_same_dask(ra["norm_factor"], rb["norm_factor"], "norm_factor")
        n_blocks = rb["X"].numblocks[0]
    else:
        if kwargs.get("copy"):
            a, b = ra, rb
        else:
            assert ra is None and rb is None
        assert_same_dask(get(a), get(b), where)
        n_blocks = get(b).numblocks[0]
    _assert_same_frame(a.obs, b.obs, "obs")
    # both leaves ran in autozyme's chunk functions, none fell back
    assert counts_of()["served"].get("normalize_total (dask chunk)", 0) >= 2 * n_blocks
    assert not counts_of()["fallbacks"]


KWARGS = [
    {},
    {"target_sum": 1e4},
    {"target_sum": 1},
    {"key_added": "n_counts"},
    {"inplace": False},
    {"inplace": False, "target_sum": 1e6},
    {"copy": True},
]


@pytest.mark.parametrize("fmt", ["csr", "csr_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kwargs", KWARGS, ids=repr)
def test_anndata_matches_upstream(active, fmt, dtype, kwargs):
    run_both(active, lambda: make(fmt, dtype), kwargs)


@pytest.mark.parametrize(
    ("shape", "rows"),
    [((230, 150), 230), ((230, 150), 100), ((97, 31), 13), ((1, 20), 1), ((40, 1), 7)],
    ids=["one-chunk", "uneven-last", "small-chunks", "one-cell", "one-gene"],
)
@pytest.mark.parametrize("target_sum", [None, 100.0])
def test_shapes_and_chunkings(active, shape, rows, target_sum):
    run_both(active, lambda: make("csr", np.float32, *shape, rows=rows, seed=3, zero_cells=()), {"target_sum": target_sum})


@pytest.mark.parametrize("where", ["layer", "obsm"])
def test_layer_and_obsm(active, where):
    kw = {"layer": "counts"} if where == "layer" else {"obsm": "counts"}
    run_both(active, lambda: make("csr_array", np.float32, where=where), kw, where=where)


@pytest.mark.parametrize("target_sum", [None, 10.0])
def test_all_zero_cells_and_chunk(active, target_sum):
    def build():
        ad = counts(60, 20, dtype=np.float32, seed=2, zero_cells=list(range(20, 40)) + [3, 59])
        ad.X = to_dask(ad.X, 20)  # the middle chunk stores nothing
        return ad

    run_both(active, build, {"target_sum": target_sum, "key_added": "n"})


def test_every_cell_empty(active):
    """target_sum=None: the median of no counts is NaN (numpy warns), as upstream."""

    def build():
        ad = counts(30, 10, dtype=np.float32, seed=2, zero_cells=range(30))
        ad.X = to_dask(ad.X, 8)
        return ad

    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        run_both(active, build, {})


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_signed_zeros_negatives_and_explicit_zeros(active, dtype):
    """Stored zeros, -0.0 and negative values (a zero sum: the guard divides by 1)."""
    data = np.array([-0.0, -0.0, 0.0, 3.0, -3.0, 2.5, -1.0, 0.0, 7.0, 1e-30, -1e30, 1e30], dtype)
    indices = np.array([0, 2, 1, 0, 3, 1, 2, 0, 3, 0, 1, 2])
    indptr = np.array([0, 2, 3, 5, 7, 7, 8, 9, 12])

    def build():
        from anndata import AnnData

        m = sp.csr_matrix((data.copy(), indices.copy(), indptr.copy()), shape=(8, 4))
        return AnnData(to_dask(m, 3))

    with np.errstate(over="ignore"):
        run_both(active, build, {"target_sum": 1.0, "key_added": "n"})
        run_both(active, build, {"inplace": False})


@pytest.mark.parametrize("kwargs", [{"exclude_highly_expressed": True}, {}], ids=["exclude", "dense"])
def test_out_of_scope_falls_back(active, monkeypatch, kwargs):
    """exclude_highly_expressed and dense chunks are left to upstream, named."""
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    fmt = "csr" if kwargs else "dense"
    a, b = make(fmt, np.float32), make(fmt, np.float32)
    upstream_normalize_total(a, target_sum=1e4, **kwargs)
    active.pp.normalize_total(b, target_sum=1e4, **kwargs)
    assert_same_dask(a.X, b.X)
    reasons = list(counts_of()["fallbacks"]["normalize_total"])
    assert any(("exclude_highly_expressed" if kwargs else "ndarray chunks") in r for r in reasons), reasons


@pytest.mark.parametrize("cls", [sp.csr_matrix, sp.csr_array], ids=["csr_matrix", "csr_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_chunk_functions_equal_upstreams_leaves(active, cls, dtype):
    """The leaves themselves, on one chunk: the row-sum chunk equals
    fast-array-utils' ``_dask_block`` (including the -0.0 of a row holding only
    -0.0, which scipy's closing ``sum(axis=())`` turns into +0.0 and the dask
    aggregate would hide), the division equals scanpy's ``axis_mul_or_truediv``."""
    from functools import partial
    from operator import truediv

    from fast_array_utils.stats._utils import _dask_block
    from scanpy._utils import axis_mul_or_truediv

    from autozyme.dask import normalize_total as dnt

    data = np.array([-0.0, -0.0, 5.0, 0.0, 1e-3, 3.0, -3.0, 7.0], dtype)
    m = cls((data, np.array([1, 0, 2, 1, 0, 2, 3, 3]), np.array([0, 1, 1, 2, 3, 3, 6, 7, 8])), shape=(8, 4))
    sums = partial(dnt.row_sums_chunk, dtype=np.dtype(dtype))(m, axis=(1,), keepdims=True)
    assert_identical(sums, _dask_block("sum", m, axis=(1,), dtype=np.dtype(dtype), keepdims=True), "row sums")
    assert not np.signbit(sums[0, 0])
    factors = (sums / 7).astype(dtype)
    for f in (factors, factors.astype(np.float64)):
        ours = dnt.divide_rows_chunk(m, f, 0, truediv, out=None, allow_divide_by_zero=False)
        theirs = axis_mul_or_truediv(m, f, 0, truediv, out=None, allow_divide_by_zero=False)
        assert_identical(ours, theirs, "division")
    assert counts_of()["served"]["normalize_total (dask chunk)"] == 3


@pytest.mark.parametrize("fmt", ["csr", "csr_array"])
def test_int64_structure(active, fmt):
    """int64 indices/indptr: scipy's constructor decides the result's index dtype
    (a csr_matrix narrows what fits, a csr_array keeps it) the same way for
    autozyme's shared arrays as for upstream's copies."""
    run_both(active, lambda: make(fmt, np.float32, index_dtype=np.int64), {"key_added": "n"})


@pytest.mark.parametrize("block", [1, 5, 64])
def test_division_in_row_blocks(active, monkeypatch, block):
    """The division runs over row blocks of about _BLOCK stored values (128k in
    use); small blocks here, so that rows longer than a block, empty rows and
    uneven ends are all crossed."""
    from autozyme.dask import normalize_total as dnt

    monkeypatch.setattr(dnt, "_BLOCK", block)
    run_both(active, lambda: make("csr", np.float32, 90, 60, rows=40, zero_cells=(0, 5, 6, 89)), {"key_added": "n"})
    run_both(active, lambda: make("csr_array", np.float64, 90, 60, rows=33, zero_cells=(1,)), {"target_sum": 3.0})


@pytest.mark.parametrize("target_sum", [None, 50.0])
def test_column_chunks(active, target_sum):
    """Chunks that split the genes too: the per-block sums are combined by
    upstream's own aggregate step, the division's factors broadcast over the
    column blocks, as upstream's."""

    def build():
        ad = counts(150, 90, dtype=np.float32, seed=5, zero_cells=[7])
        ad.X = da.from_array(ad.X, chunks=(40, 25), asarray=False)
        return ad

    run_both(active, build, {"target_sum": target_sum, "key_added": "n"})
