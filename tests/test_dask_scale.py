"""sc.pp.scale on dask arrays: autozyme's graph against upstream's own dask
computation with the same chunking, bit for bit (X's chunks, dtype and meta,
var's mean and std, warnings), CSR (csr_matrix, csr_array) and dense row chunks,
with and without centring and clipping."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

da = pytest.importorskip("dask.array")
from importlib.metadata import version  # noqa: E402

if tuple(int(p) for p in version("scanpy").split(".")[:2]) < (1, 12):
    pytest.skip("dask paths are served on scanpy >= 1.12 only", allow_module_level=True)

import dask  # noqa: E402

CALL = "scale"
FORMATS = ["csr", "csr_array", "dense"]


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


def matrix(n_cells, n_genes, *, dtype=np.float32, seed=0, density=0.3, zero_cells=(),
           zero_genes=(), index_dtype=np.int32):
    """CSR with fractional values of both signs (every sum depends on its order),
    a few values whose f32 squares round, and -0.0 entries."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float64,
                  random_state=rng, data_rvs=lambda k: rng.normal(1.0, 3.0, k))
    x.data[rng.random(x.data.size) < 0.05] *= 4099.7
    x.data[rng.random(x.data.size) < 0.03] = -0.0
    x = x.tolil()
    for r in zero_cells:
        x[r, :] = 0
    for c in zero_genes:
        x[:, c] = 0
    x = x.tocsr()
    x.data = x.data.astype(dtype) if np.issubdtype(dtype, np.floating) else np.round(x.data).astype(dtype)
    x.indices, x.indptr = x.indices.astype(index_dtype), x.indptr.astype(index_dtype)
    return x


def to_dask(x, fmt, rows):
    x = {"csr": lambda: x, "csr_array": lambda: sp.csr_array(x), "dense": lambda: x.toarray()}[fmt]()
    return da.from_array(x, chunks=(rows, x.shape[1]), asarray=False)


def upstream_scale(*args, **kwargs):
    import scanpy as sc

    import autozyme

    autozyme.deactivate()
    try:
        return sc.pp.scale(*args, **kwargs)
    finally:
        autozyme.activate("scanpy", prewarm=False)


def counts():
    from autozyme import fallback

    c = fallback.counts()
    return c["served"].get(CALL, 0), c["served"].get(f"{CALL} (dask chunk)", 0)


def assert_same_dask(a, b, what="X"):
    assert type(a) is type(b), what
    assert a.dtype == b.dtype, what
    assert type(a._meta) is type(b._meta) and a._meta.dtype == b._meta.dtype, what
    assert a.chunks == b.chunks, what
    ra, rb = dask.compute(a, b)
    assert_same_value(ra, rb, what)


def assert_same_value(ra, rb, what):
    assert type(ra) is type(rb), what
    if sp.issparse(ra):
        assert ra.shape == rb.shape, what
        for k in ("data", "indices", "indptr"):
            va, vb = getattr(ra, k), getattr(rb, k)
            assert va.dtype == vb.dtype, (what, k)
            assert va.tobytes() == vb.tobytes(), (what, k)
    else:
        assert ra.dtype == rb.dtype and ra.shape == rb.shape, what
        assert np.ascontiguousarray(ra).tobytes() == np.ascontiguousarray(rb).tobytes(), what


def run_both(sc, build, kwargs, where="X", chunks_served=True):
    import anndata as ad

    a, b = ad.AnnData(build()), ad.AnnData(build())
    if where != "X":
        for x in (a, b):
            m = x.X
            x.X = None
            getattr(x, {"layer": "layers", "obsm": "obsm"}[where])["m"] = m
        kwargs = dict(kwargs, **{where: "m"})
    with warnings.catch_warnings(record=True) as wa:
        warnings.simplefilter("always")
        ra = upstream_scale(a, **kwargs)
    before = counts()
    with warnings.catch_warnings(record=True) as wb:
        warnings.simplefilter("always")
        rb = sc.pp.scale(b, **kwargs)
    assert counts()[0] == before[0] + 1
    if kwargs.get("copy"):
        a, b = ra, rb
    else:
        assert ra is None and rb is None
    # mean and std: computed by the call, as pandas computes upstream's
    assert list(a.var.columns) == list(b.var.columns)
    for c in a.var.columns:
        assert a.var[c].dtype == b.var[c].dtype
        assert a.var[c].to_numpy().tobytes() == b.var[c].to_numpy().tobytes(), c
    # (upstream's warning names functools' dispatch frame; autozyme's, as for
    # in-memory data, the caller's line: see test_scale)
    assert [(w.category, str(w.message)) for w in wa] == [(w.category, str(w.message)) for w in wb]
    get = {"X": lambda x: x.X, "layer": lambda x: x.layers["m"], "obsm": lambda x: x.obsm["m"]}[where]
    assert_same_dask(get(a), get(b))
    if chunks_served:
        assert counts()[1] >= before[1] + get(b).numblocks[0]
    return b


CASES = [
    {"zero_center": False},
    {"zero_center": False, "max_value": 2.5},
    {"zero_center": True},
    {"zero_center": True, "max_value": 1.5},
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kwargs", CASES, ids=repr)
def test_anndata_matches_upstream(active, fmt, dtype, kwargs):
    run_both(active, lambda: to_dask(matrix(230, 40, dtype=dtype, seed=1, zero_cells=[3, 100],
                                            zero_genes=[5]), fmt, 64), kwargs)


@pytest.mark.parametrize(
    ("shape", "rows"),
    [((230, 40), 230), ((230, 40), 100), ((300, 17), 17), ((97, 31), 13), ((1, 20), 1), ((50, 3), 49)],
    ids=["one-chunk", "uneven-last", "tree-of-18", "small-chunks", "one-cell", "one-row-last"],
)
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_shapes_and_chunkings(active, fmt, shape, rows):
    """Many chunks make dask combine the per-chunk sums in a tree (split_every)."""
    run_both(active, lambda: to_dask(matrix(*shape, seed=3), fmt, rows),
             {"zero_center": False, "max_value": 3})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("max_value", [0, 0.0, 1, np.float32(0.75)], ids=repr)
@pytest.mark.parametrize("zero_center", [False, True])
def test_clip_bounds(active, fmt, max_value, zero_center, monkeypatch):
    """A zero bound keeps each value's own signed zero (numba's ``x > a_max``),
    integer and float32 bounds compare as upstream's. An integer 0 with centring
    (numba's lower bound ``-0`` is +0) falls back."""
    if zero_center and max_value == 0 and isinstance(max_value, int):
        from autozyme import fallback

        monkeypatch.setenv("AUTOZYME_STRICT", "0")
        x = to_dask(matrix(80, 12, seed=11), fmt, 30)
        a, b = upstream_scale(x, zero_center=True, max_value=0), active.pp.scale(x, zero_center=True, max_value=0)
        assert_same_dask(a, b)
        assert any("integer max_value 0" in r for r in fallback.counts()["fallbacks"][CALL])
        return
    run_both(active, lambda: to_dask(matrix(80, 12, seed=11), fmt, 30),
             {"zero_center": zero_center, "max_value": max_value})


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_input_and_copy(active, fmt):
    run_both(active, lambda: to_dask(matrix(120, 25, dtype=np.int64, seed=4), fmt, 50),
             {"zero_center": fmt == "dense", "max_value": 10, "copy": True})


@pytest.mark.parametrize("where", ["layer", "obsm"])
def test_layer_and_obsm(active, where):
    run_both(active, lambda: to_dask(matrix(150, 30, seed=5), "csr_array", 40),
             {"zero_center": False, "max_value": 2.0}, where=where)


@pytest.mark.parametrize("fmt", ["csr", "csr_array"])
def test_int64_structure(active, fmt):
    """scipy's constructor decides the result's index dtype (a csr_matrix narrows
    what fits) the same way for autozyme's shared arrays as for upstream's copies."""
    run_both(active, lambda: to_dask(matrix(120, 30, seed=6, index_dtype=np.int64), fmt, 50),
             {"zero_center": False})


def test_all_zero_chunk(active):
    run_both(active, lambda: to_dask(matrix(90, 20, seed=7, zero_cells=range(30, 60)), "csr", 30),
             {"zero_center": True, "max_value": 4.0})


def test_non_canonical_chunk(active):
    """Duplicates and unsorted indices: each stored value is added (and squared)
    on its own, in stored order, as scipy's product with a row of ones adds them;
    densifying adds duplicates in the data's dtype."""

    def build():
        m = sp.csr_matrix(
            (np.array([1.1, 2.7, 3.3, -4.9, 5.5, 0.1, 7.3], np.float32), np.array([3, 1, 1, 0, 2, 2, 2]),
             np.array([0, 3, 5, 5, 7])),
            shape=(4, 4),
        )
        # one chunk holding the matrix as given (from_array would slice a copy)
        return da.from_delayed(dask.delayed(lambda: m)(), shape=m.shape, dtype=m.dtype,
                               meta=sp.csr_matrix((0, 0), dtype=np.float32))

    for kwargs in CASES:
        run_both(active, build, kwargs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kwargs", [{"zero_center": False, "max_value": 2}, {"zero_center": True}], ids=repr)
def test_dask_array_input_stays_lazy(active, fmt, kwargs):
    """``sc.pp.scale(dask_array)`` returns upstream's lazy result (nothing is
    computed by the call; the statistics are reduced when it is)."""
    fast = active.pp.scale
    xa, xb = (to_dask(matrix(140, 30, seed=8), fmt, 40) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ra, rb = upstream_scale(xa, **kwargs), fast(xb, **kwargs)
    before = counts()[1]
    assert_same_dask(ra, rb)
    # one statistics task and one scaling task per chunk
    assert counts()[1] == before + 2 * xb.numblocks[0]


def test_mask_obs_falls_back(active, monkeypatch):
    """upstream writes the masked rows into the dask array: not served."""
    import anndata as ad

    from autozyme import fallback

    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    a, b = (ad.AnnData(to_dask(matrix(60, 10, seed=9), "csr", 20)) for _ in range(2))
    mask = np.arange(60) % 3 != 0
    upstream_scale(a, zero_center=False, mask_obs=mask)
    active.pp.scale(b, zero_center=False, mask_obs=mask)
    assert_same_dask(a.X, b.X)
    assert any("mask_obs" in r for r in fallback.counts()["fallbacks"][CALL])


def test_chunk_without_daemon_runs_upstreams_chunk(active, monkeypatch):
    """A chunk the daemon cannot serve runs upstream's own chunk function."""
    from autozyme import fallback
    from autozyme.dask import scale as dask_scale

    monkeypatch.setenv("AUTOZYME_STRICT", "0")

    def refuse(*a, **k):
        raise fallback.Fallback("test: no daemon")

    monkeypatch.setattr(dask_scale, "_stats_fast", refuse)
    monkeypatch.setattr(dask_scale, "_apply_fast", refuse)
    run_both(active, lambda: to_dask(matrix(100, 20, seed=10), "csr", 30), {"zero_center": True},
             chunks_served=False)
    assert fallback.counts()["fallbacks"][f"{CALL} (dask chunk)"]


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_chunks_through_shared_memory(active, fmt, monkeypatch):
    """Where the kernel refuses the daemon this process's memory, chunks are
    copied into shared memory instead (as for in-memory data)."""
    from autozyme import shm

    monkeypatch.setattr(shm, "_peer_reads_refused", True)
    run_both(active, lambda: to_dask(matrix(100, 20, seed=12), fmt, 30),
             {"zero_center": True, "max_value": 2.0})


def test_f_ordered_chunks_run_upstreams_chunk_functions(active, monkeypatch):
    """F-ordered dense chunks: numpy sums them pairwise and returns F-ordered
    results; each such chunk runs upstream's own chunk function."""
    import anndata as ad

    from autozyme import fallback

    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    m = np.asfortranarray(matrix(90, 12, seed=13).toarray())
    # (from_array would hand out C-ordered copies)
    a, b = (ad.AnnData(da.from_delayed(dask.delayed(lambda: m)(), shape=m.shape, dtype=m.dtype))
            for _ in range(2))
    upstream_scale(a, max_value=2.0)
    active.pp.scale(b, max_value=2.0)
    assert a.var.equals(b.var)
    ra, rb = dask.compute(a.X, b.X)
    assert ra.flags.f_contiguous == rb.flags.f_contiguous
    assert_same_value(ra, rb, "X")
    assert any("C-contiguous" in r for r in fallback.counts()["fallbacks"][f"{CALL} (dask chunk)"])


def _unaligned(a):
    """A copy of ``a`` at an odd address, as Dask unpickles some transfers."""
    buf = np.empty(a.nbytes + 1, np.uint8)[1:]
    out = buf.view(a.dtype).reshape(a.shape)
    out[...] = a
    assert out.__array_interface__["data"][0] % a.dtype.alignment
    return out


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_unaligned_chunks(active, fmt):
    """Chunks at odd addresses (unpickled from a Dask transfer) are realigned
    before the daemon reads them."""
    m = matrix(80, 15, seed=14)

    def chunk(lo, hi):
        c = m[lo:hi]
        if fmt == "dense":
            return _unaligned(c.toarray())
        return sp.csr_matrix((_unaligned(c.data), _unaligned(c.indices), _unaligned(c.indptr)), shape=c.shape)

    def build():
        meta = np.empty((0, 0), np.float32) if fmt == "dense" else sp.csr_matrix((0, 0), dtype=np.float32)
        parts = [da.from_delayed(dask.delayed(chunk)(lo, min(lo + 30, 80)), shape=(min(lo + 30, 80) - lo, 15),
                                 dtype=np.float32, meta=meta) for lo in range(0, 80, 30)]
        return da.concatenate(parts)

    for kwargs in CASES:
        run_both(active, build, kwargs)
