"""sc.pp.highly_variable_genes (seurat_v3 flavors) on dask arrays: autozyme against
upstream's own dask computation with the same chunking, bit for bit (result
frames, var columns, uns, warnings), CSR (csr_matrix, csr_array) and dense row
blocks, float and integer counts, one batch, 1 and 7 batches of very different
sizes, a batch in which no gene varies."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

da = pytest.importorskip("dask.array")
pytest.importorskip("skmisc")
from importlib.metadata import version  # noqa: E402

if tuple(int(p) for p in version("scanpy").split(".")[:2]) < (1, 12):
    pytest.skip("dask paths are served on scanpy >= 1.12 only", allow_module_level=True)

import dask  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from _data import counts  # noqa: E402

CALL = "highly_variable_genes"
FORMATS = ["csr", "csr_array", "dense"]


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


def make_matrix(n_cells, n_genes, *, dtype=np.float32, values="counts", seed=0, density=0.3,
                **kw):
    """A CSR matrix of counts; ``values="fractional"`` scales every value by a
    non-integer factor, so every sum depends on its order of additions;
    ``"large"`` makes some values exceed 4096 (their f32 squares round)."""
    x = counts(n_cells, n_genes, fmt="csr", dtype=np.float64, seed=seed, density=density,
               **kw).X
    rng = np.random.default_rng(seed + 1)
    if values == "fractional":
        x.data = x.data * rng.uniform(0.3, 3.7, x.data.size)
    elif values == "large":
        x.data = x.data * rng.choice([1, 1, 1, 997], x.data.size)
    x.data = x.data.astype(dtype)
    return x


def to_dask(x, fmt, rows_per_chunk):
    x = {"csr": lambda: x, "csr_array": lambda: sp.csr_array(x), "dense": lambda: x.toarray()}[fmt]()
    return da.from_array(x, chunks=(rows_per_chunk, x.shape[1]), asarray=False)


def make_adata(x, fmt, rows_per_chunk, batch_sizes=None, *, layer=None, seed=0):
    import anndata as ad

    n = x.shape[0]
    adata = ad.AnnData(
        X=to_dask(x, fmt, rows_per_chunk) if layer is None else np.zeros((n, x.shape[1]), np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]),
    )
    if layer is not None:
        adata.layers[layer] = to_dask(x, fmt, rows_per_chunk)
    if batch_sizes is not None:
        assert sum(batch_sizes) == n
        rng = np.random.default_rng(seed)
        labels = np.repeat([f"batch{k}" for k in range(len(batch_sizes))], batch_sizes)
        rng.shuffle(labels)
        adata.obs["b"] = pd.Categorical(labels)
    return adata


def run_both(sc, make, kwargs):
    fast = sc.pp.highly_variable_genes
    upstream = fast.__autozyme_upstream__
    a, b = make(), make()
    outs = []
    for adata, fn in ((a, upstream), (b, fast)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                res = fn(adata, **kwargs)
            except Exception as e:  # noqa: BLE001 - the outcome is what is compared
                res = (type(e), str(e))
        outs.append((res, sorted(f"{x.category.__name__}: {x.message}" for x in w)))
    return a, b, outs


def same_frame(ra, rb):
    assert list(ra.columns) == list(rb.columns)
    assert ra.index.equals(rb.index)
    for col in ra.columns:
        x, y = ra[col].to_numpy(), rb[col].to_numpy()
        assert x.dtype == y.dtype, col
        if x.dtype.kind == "f":
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), col
        else:
            assert np.array_equal(x, y), col


def compare(a, b, outs):
    (ra, warn_a), (rb, warn_b) = outs
    assert warn_a == warn_b
    if isinstance(ra, tuple):
        assert ra == rb, f"upstream raised {ra}, autozyme gave {rb!r}"
    elif isinstance(ra, pd.DataFrame):
        same_frame(ra, rb)
    else:
        assert ra is None and rb is None
    same_frame(a.var, b.var)
    assert a.uns.get("hvg") == b.uns.get("hvg")
    assert a.shape == b.shape
    assert type(a.X) is type(b.X)


def chunk_counts():
    from autozyme import fallback

    c = fallback.counts()
    return c["served"].get(f"{CALL} (dask chunk)", 0), c["served"].get(CALL, 0)


def check(sc, make, kwargs):
    """Both complete (loess fits on few small counts can fail; such data would
    compare nothing), equal, and autozyme served the call and its blocks."""
    a, b, outs = run_both(sc, make, kwargs)
    assert not isinstance(outs[0][0], tuple), outs[0][0]
    compare(a, b, outs)
    chunk_served, served = chunk_counts()
    assert served == 1 and chunk_served > 0
    return a, b, outs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("dtype", "flavor"), [(np.float32, "seurat_v3"),
                                               (np.float64, "seurat_v3_paper")],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("batches", [None, (80, 60, 45, 30, 20, 10, 5)], ids=["no_key", "seven"])
def test_matches_upstream_dask(active, fmt, dtype, flavor, batches):
    x = make_matrix(250, 90, dtype=dtype, values="fractional", zero_cells=(3, 101),
                    zero_genes=(0, 44))
    kwargs = dict(flavor=flavor, n_top_genes=25)
    if batches is not None:
        kwargs["batch_key"] = "b"
    check(active, lambda: make_adata(x, fmt, 60, batches), kwargs)


@pytest.mark.parametrize(("fmt", "values"), [("csr", "counts"), ("csr", "large"),
                                            ("csr_array", "large"), ("dense", "large")])
def test_seven_batches_very_different_sizes(active, fmt, values):
    """7 batches from 130 cells down to 20, over 5 uneven blocks (dask's take then
    regroups each batch's rows across block boundaries)."""
    sizes = (130, 100, 70, 50, 35, 25, 20)
    x = make_matrix(sum(sizes), 200, values=values, seed=3)
    check(active, lambda: make_adata(x, fmt, 111, sizes, seed=4),
          dict(flavor="seurat_v3", n_top_genes=30, batch_key="b"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_blocks_tree_reduction(active, fmt):
    """More blocks than dask's split_every (16): a two-level combine tree."""
    x = make_matrix(400, 40, values="fractional", seed=5)
    check(active, lambda: make_adata(x, fmt, 19, (150, 130, 120), seed=6),
          dict(flavor="seurat_v3_paper", n_top_genes=12, batch_key="b"))


def test_one_batch_key_value(active):
    """A batch_key with one value: upstream still takes aggregate's statistics."""
    x = make_matrix(250, 90, values="fractional", seed=14)
    check(active, lambda: make_adata(x, "csr", 60, (250,)),
          dict(flavor="seurat_v3", n_top_genes=25, batch_key="b"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_block(active, fmt):
    x = make_matrix(120, 50, values="fractional", seed=7)
    check(active, lambda: make_adata(x, fmt, 1000, (60, 40, 20)),
          dict(flavor="seurat_v3", n_top_genes=10, batch_key="b"))


@pytest.mark.parametrize(("fmt", "dtype"), [("csr", np.int32), ("csr_array", np.int64),
                                           ("dense", np.int64)])
def test_integer_counts(active, fmt, dtype):
    x = make_matrix(200, 60, dtype=dtype, values="large", seed=8)
    check(active, lambda: make_adata(x, fmt, 70, (120, 80)),
          dict(flavor="seurat_v3", n_top_genes=15, batch_key="b"))


def test_batch_with_no_varying_gene(active):
    """A batch whose cells are all alike: no gene varies, loess is skipped."""
    x = make_matrix(150, 40, values="counts", seed=9).tolil()
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 100 + ["const"] * 50)
    rng.shuffle(labels)
    for i in np.flatnonzero(labels == "const"):
        x[i, :] = 0
        x[i, 5] = 3
    x = x.tocsr()

    def make():
        adata = make_adata(x, "csr", 40)
        adata.obs["b"] = pd.Categorical(labels)
        return adata

    check(active, make, dict(flavor="seurat_v3", n_top_genes=10, batch_key="b"))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inplace=False),
        dict(inplace=False, batch_key="b"),
        dict(subset=True, batch_key="b"),
        dict(subset=True, inplace=False),
        dict(span=0.5, n_top_genes=7, batch_key="b"),
        dict(n_top_genes=200),
        dict(layer="counts", batch_key="b"),
        dict(check_values=False),
    ],
)
def test_arguments(active, kwargs):
    x = make_matrix(180, 70, values="fractional", seed=10)
    layer = kwargs.get("layer")
    kwargs = dict(dict(flavor="seurat_v3", n_top_genes=20), **kwargs)
    check(active, lambda: make_adata(x, "csr", 50, (100, 50, 30), layer=layer), kwargs)


def test_feature_axis_chunked_is_upstreams_error(active):
    x = make_matrix(60, 30, seed=11)

    def make():
        adata = make_adata(x, "csr", 20)
        adata.X = adata.X.rechunk((20, 10))
        return adata

    a, b, outs = run_both(active, make, dict(flavor="seurat_v3", n_top_genes=5))
    assert isinstance(outs[0][0], tuple) and outs[0][0][0] is ValueError
    compare(a, b, outs)


def test_negative_values_warn(active):
    x = make_matrix(120, 40, values="fractional", seed=12)
    x.data[::97] *= -1
    check(active, lambda: make_adata(x, "csr", 50, (70, 50)),
          dict(flavor="seurat_v3", n_top_genes=10, batch_key="b"))


def test_stays_a_dask_array_and_chunks_served(active):
    x = make_matrix(100, 30, seed=13)
    a, b, _ = check(active, lambda: make_adata(x, "csr", 30, (60, 40)),
                    dict(flavor="seurat_v3", n_top_genes=10, batch_key="b", subset=True))
    assert isinstance(b.X, da.Array)
    assert np.array_equal(a.X.compute().toarray(), b.X.compute().toarray())


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_block_the_daemon_cannot_serve_runs_upstreams_block_code(active, fmt, monkeypatch):
    """The per-block fallback contract: a block whose daemon request fails is
    computed by upstream's own block code in the same task (for the CSR clipped
    sums, which continue from chunk to chunk, by numpy in upstream's order);
    same result."""
    from autozyme import fallback
    from autozyme.dask import highly_variable_genes as m
    from autozyme.runtime import DaemonUnavailable

    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    calls = {"n": 0}
    real_stats, real_clipped, real_chain = m._stats_fast, m._clipped_fast, m._clip_chain_fast

    def flaky(real):
        def fn(*args):
            calls["n"] += 1
            if calls["n"] % 2:
                raise DaemonUnavailable("test: no daemon for this block")
            return real(*args)
        return fn

    monkeypatch.setattr(m, "_stats_fast", flaky(real_stats))
    monkeypatch.setattr(m, "_clipped_fast", flaky(real_clipped))
    monkeypatch.setattr(m, "_clip_chain_fast", flaky(real_chain))
    x = make_matrix(200, 60, values="fractional", seed=15)
    a, b, outs = run_both(active, lambda: make_adata(x, fmt, 45, (90, 60, 50)),
                          dict(flavor="seurat_v3", n_top_genes=15, batch_key="b"))
    assert not isinstance(outs[0][0], tuple), outs[0][0]
    compare(a, b, outs)
    counts = fallback.counts()
    assert counts["served"].get(CALL, 0) == 1
    assert sum(counts["fallbacks"].get(f"{CALL} (dask chunk)", {}).values()) >= 1
