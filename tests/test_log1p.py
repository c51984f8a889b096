"""sc.pp.log1p: autozyme against upstream scanpy, bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from _data import assert_identical, assert_same_anndata, counts


def outcome(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            res = type(e)
    return res, sorted(str(x.message) for x in w)


def run_both(sc, make, kwargs, reruns=1):
    fast = sc.pp.log1p
    upstream = fast.__autozyme_upstream__
    a, b = make(), make()
    ra = [outcome(upstream, a, **kwargs) for _ in range(reruns)]
    rb = [outcome(fast, b, **kwargs) for _ in range(reruns)]
    for (xa, wa), (xb, wb) in zip(ra, rb):
        assert wa == wb
        if isinstance(xa, type):
            assert xa is xb
        elif xa is None:
            assert xb is None
        else:
            assert_same_anndata(xa, xb)
    assert_same_anndata(a, b)
    assert a.uns.get("log1p") == b.uns.get("log1p")


def served():
    from autozyme import fallback

    return fallback.counts()["served"].get("log1p", 0)


def upstream_takes(fmt: str) -> bool:
    """Whether this scanpy's log1p computes on ``fmt`` (1.11.5 raises TypeError for sparse arrays)."""
    from autozyme import versions
    from autozyme.patches import log1p as patch

    return not fmt.endswith("_array") or versions.pick(patch.UPSTREAM).sparse_arrays


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "csr_array", "csc_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kwargs", [{}, {"base": 2}, {"base": 10.0}, {"copy": True}, {"base": np.e, "copy": True}], ids=repr)
def test_matches_upstream(active, fmt, dtype, kwargs):
    run_both(active, lambda: counts(230, 150, dtype=dtype, fmt=fmt, seed=1, zero_cells=[2], zero_genes=[4]), kwargs)
    # Where upstream raises, the call is delegated and the user gets its error.
    assert served() >= 1 if upstream_takes(fmt) else served() == 0


@pytest.mark.parametrize("fmt", ["csr", "dense", "csr_array"])
def test_copy_stays_independent(active, fmt):
    """anndata 0.13 copy-on-write: after ``b = a.copy()``, log1p on ``a`` (and on
    a copy of it) never changes ``b``; a view's log1p leaves its parent alone."""
    if not upstream_takes(fmt):
        pytest.skip(f"this scanpy's log1p raises TypeError for {fmt}")
    sc = active
    a = counts(160, 70, fmt=fmt, seed=9, zero_cells=[1])
    pristine = a.copy()
    b = a.copy()
    sc.pp.log1p(a)
    assert_same_anndata(b, pristine)
    c = a.copy()
    c_before = c.copy()
    sc.pp.log1p(a, base=2)  # warns (already logarithmized), like upstream
    assert_same_anndata(c, c_before)
    sc.pp.log1p(b)
    sc.pp.log1p(c)
    ref = pristine.copy()
    up = sc.pp.log1p.__autozyme_upstream__
    up(ref)
    up(ref, base=2)
    assert_same_anndata(a, ref)
    parent = pristine.copy()
    view = parent[5:100]
    sc.pp.log1p(view)
    assert not view.is_view
    assert_same_anndata(parent, pristine)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_large_enough_for_parallel_blocks(active, fmt):
    """Several MiB of values: the work is split over threads, the bits are not."""
    run_both(active, lambda: counts(3000, 1200, density=0.2, fmt=fmt, seed=2), {})
    run_both(active, lambda: counts(3000, 1200, density=0.2, dtype=np.float64, fmt=fmt, seed=3), {"base": 2})


def test_rerun_warns_like_upstream(active):
    run_both(active, lambda: counts(100, 50, seed=4), {}, reruns=3)


def test_layer_obsm_and_view(active):
    def make():
        ad = counts(200, 100, seed=5)
        ad.layers["counts"] = ad.X.copy()
        ad.obsm["X_dense"] = np.abs(np.random.default_rng(0).normal(size=(200, 7))).astype(np.float32)
        return ad

    run_both(active, make, {"layer": "counts"})
    run_both(active, make, {"obsm": "X_dense", "base": 3})
    run_both(active, lambda: make()[20:120], {})
    run_both(active, make, {"layer": "missing"})
    run_both(active, make, {"layer": "counts", "obsm": "X_dense"})


@pytest.mark.parametrize("kind", ["ndarray", "csr", "csc", "csr_array", "csc_array"])
@pytest.mark.parametrize("copy", [False, True])
def test_array_input(active, kind, copy):
    # On a scanpy whose log1p takes no sparse arrays (1.11.5), both raise upstream's TypeError.
    sc = active
    rng = np.random.default_rng(6)
    base = rng.poisson(2, (300, 4000)).astype(np.float32)
    make = {"ndarray": lambda: base.copy(), "csr": lambda: sp.csr_matrix(base), "csc": lambda: sp.csc_matrix(base),
            "csr_array": lambda: sp.csr_array(base), "csc_array": lambda: sp.csc_array(base)}[kind]
    a, b = make(), make()
    ra, _ = outcome(sc.pp.log1p.__autozyme_upstream__, a, copy=copy)
    rb, _ = outcome(sc.pp.log1p, b, copy=copy)
    assert_identical(ra, rb)
    assert_identical(a, b)


def test_nan_and_inf_outcomes(active):
    """sklearn's check_array rejects non-finite sparse values; dense passes them."""
    def make_sparse():
        ad = counts(50, 40, seed=7)
        ad.X.data[3] = np.nan
        return ad

    def make_dense():
        ad = counts(50, 40, seed=7, fmt="dense")
        ad.X[1, 1] = np.inf
        ad.X[2, 2] = -2.0
        return ad

    run_both(active, make_sparse, {})
    run_both(active, make_dense, {})


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1_000_003, 3_000_017])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_parallel_ufunc_equals_one_call(n, dtype):
    from autozyme.patches.log1p import _elementwise

    x = np.random.default_rng(n).lognormal(0, 3, n).astype(dtype)
    x[::7] = np.random.default_rng(1).integers(0, 50, x[::7].size)
    want = np.log1p(x)
    _elementwise(x, np.log1p)
    assert_identical(want, x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_non_finite_in_a_late_block_gives_upstreams_outcome(active, bad):
    """Large enough for the parallel finiteness check to use several blocks; the
    bad value sits in the last one. 3e38 is finite (only the sum overflows)."""
    def make():
        ad = counts(3000, 1200, density=0.2, seed=14)
        ad.X.data[-5] = bad
        return ad

    run_both(active, make, {})


def test_one_thread_or_small_data_is_upstreams_own_call(active, monkeypatch):
    """Where threads cannot help (one thread, or under two blocks of values),
    each pass is upstream's own whole-array call; with two threads a large matrix is split.
    Either way the result is upstream's and the call counts as served."""
    from autozyme.patches.log1p import threads_help

    big = counts(3000, 1200, density=0.2, seed=21)
    small = counts(200, 100, seed=21)
    monkeypatch.setenv("AUTOZYME_THREADS", "2")
    assert threads_help(big.X) and threads_help(big.X.toarray())
    assert not threads_help(small.X) and not threads_help(small.X.toarray())
    assert not threads_help(big.X.toarray()[:, ::2])  # neither C nor F contiguous
    monkeypatch.setenv("AUTOZYME_THREADS", "1")
    assert not threads_help(big.X) and not threads_help(big.X.toarray())
    before = served()
    run_both(active, lambda: counts(3000, 1200, density=0.2, seed=22), {})
    run_both(active, lambda: counts(3000, 1200, density=0.2, seed=22, fmt="dense"), {"copy": True})
    assert served() > before
