"""sc.pp.scale: autozyme against upstream scanpy, bit for bit (X, the var
columns upstream writes, warnings and exceptions)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from _data import assert_identical, assert_same_anndata, counts


def lognorm(n_cells, n_genes, *, fmt="csr", dtype=np.float32, seed=0, **kw):
    """log1p-normalized-looking data (what scale usually gets), in any format."""
    ad = counts(n_cells, n_genes, seed=seed, dtype=np.float64, **kw)
    x = ad.X
    if x.nnz:
        sums = np.asarray(x.sum(axis=1)).ravel()
        x.data = np.log1p(x.data / np.repeat(np.where(sums > 0, sums, 1), np.diff(x.indptr)) * 1e4)
    x = x.astype(dtype)
    if fmt == "dense":
        x = x.toarray()
    elif fmt == "csc":
        x = x.tocsc()
    elif fmt == "csr_array":
        x = sp.csr_array(x)
    elif fmt == "csc_array":
        x = sp.csc_array(x.tocsc())
    ad.X = x
    ad.obs["keep"] = np.arange(n_cells) % 3 != 1
    return ad


def run_both(sc, make, kwargs, *, reruns=1):
    fast = sc.pp.scale
    upstream = fast.__autozyme_upstream__
    a, b = make(), make()
    outs = []
    for adata, fn in ((a, upstream), (b, fast)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                res = [fn(adata, **kwargs) for _ in range(reruns)]
            except Exception as e:  # noqa: BLE001 - the outcome is what is compared
                res = [type(e)]
        outs.append((res, sorted(f"{x.category.__name__}: {x.message}" for x in w)))
    return a, b, outs


def compare(a, b, outs):
    (res_a, warn_a), (res_b, warn_b) = outs
    assert warn_a == warn_b
    assert_same_anndata(a, b)
    assert len(res_a) == len(res_b)
    for ra, rb in zip(res_a, res_b):
        if isinstance(ra, type):
            assert ra is rb, f"upstream raised {ra.__name__}, autozyme {rb}"
        elif ra is None:
            assert rb is None
        else:
            assert_same_anndata(ra, rb)


def served():
    from autozyme import fallback

    return fallback.counts()["served"].get("scale", 0)


def upstream_record():
    from autozyme import versions
    from autozyme.patches import scale as patch

    return versions.pick(patch.UPSTREAM)


def in_scope(fmt, kwargs) -> bool:
    """Whether the fast path serves this format and these arguments (else the
    test relaxes strict mode: upstream serves it)."""
    if fmt.endswith("_array") and not upstream_record().sparse_arrays:
        return False
    return fmt == "dense" or "mask_obs" not in kwargs or not kwargs.get("zero_center", True)


KWARGS = [
    {},
    {"max_value": 8},
    {"max_value": 0.5},
    {"zero_center": False},
    {"zero_center": False, "max_value": 1.5},
    {"mask_obs": "keep"},
    {"mask_obs": "keep", "zero_center": False, "max_value": 2},
    {"copy": True, "max_value": np.float32(3.3)},
]


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "csr_array", "csc_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kwargs", KWARGS, ids=repr)
def test_matches_upstream(active, monkeypatch, fmt, dtype, kwargs):
    if not in_scope(fmt, kwargs):
        monkeypatch.setenv("AUTOZYME_STRICT", "0")  # out of scope: upstream serves it
    make = lambda: lognorm(210, 130, fmt=fmt, dtype=dtype, seed=1, zero_cells=[0, 9], zero_genes=[3, 4])  # noqa: E731
    compare(*run_both(active, make, kwargs))
    if in_scope(fmt, kwargs):
        assert served() == 1


def test_bar_case_is_served(active):
    make = lambda: lognorm(300, 200, seed=2)  # noqa: E731
    compare(*run_both(active, make, {"max_value": 8}))
    assert served() == 1


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_rerun_on_adopted_object(active, fmt):
    """The result (dense, in shared memory) scaled again, in place."""
    make = lambda: lognorm(400, 150, fmt=fmt, seed=3)  # noqa: E731
    compare(*run_both(active, make, {"max_value": 3}, reruns=3))
    compare(*run_both(active, make, {"zero_center": False}, reruns=2))


@pytest.mark.parametrize("shape", [(1, 30), (30, 1), (1, 1), (2, 5), (500, 2), (0, 4)], ids=str)
@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_edge_shapes(active, monkeypatch, shape, fmt):
    if shape[0] == 0:
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
    make = lambda: lognorm(*shape, fmt=fmt, seed=4, density=0.4)  # noqa: E731
    compare(*run_both(active, make, {}))
    compare(*run_both(active, make, {"zero_center": False, "max_value": 1}))


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_all_zero_and_constant_genes(active, fmt):
    def make():
        ad = lognorm(120, 40, fmt=fmt, seed=5, zero_genes=[0, 7, 39])
        x = ad.X
        if fmt == "dense":
            x[:, 5] = 0.1  # constant: variance is a rounding residue, maybe negative
        return ad

    compare(*run_both(active, make, {}))
    compare(*run_both(active, make, {"max_value": 2, "zero_center": False}))


def test_layer_obsm_and_views(active):
    def make():
        ad = lognorm(150, 60, seed=6)
        ad.layers["ln"] = ad.X.copy()
        ad.obsm["dense"] = ad.X.toarray()
        return ad

    compare(*run_both(active, make, {"layer": "ln", "max_value": 4}))
    compare(*run_both(active, make, {"obsm": "dense"}))
    compare(*run_both(active, lambda: make()[10:120], {}))
    compare(*run_both(active, lambda: make()[10:120, 5:50], {"layer": "ln", "zero_center": False}))


def test_mask_array(active):
    mask = np.arange(180) % 4 == 0
    for fmt in ("csr", "dense"):
        make = lambda: lognorm(180, 50, fmt=fmt, seed=7)  # noqa: E731
        compare(*run_both(active, make, {"mask_obs": mask, "zero_center": fmt == "dense"}))
        compare(*run_both(active, make, {"mask_obs": mask, "max_value": 1.0, "zero_center": False}))


def test_unsorted_indices_duplicates_and_int64_indices(active):
    def make():
        ad = lognorm(100, 40, seed=8)
        x = ad.X
        for i in range(x.shape[0]):
            s, e = x.indptr[i], x.indptr[i + 1]
            x.indices[s:e] = x.indices[s:e][::-1].copy()
            x.data[s:e] = x.data[s:e][::-1].copy()
        # a duplicate entry in row 0 (scipy's todense adds them up)
        x = sp.csr_matrix(
            (np.r_[x.data, np.float32(16777216.0), np.float32(1.0)],
             np.r_[x.indices, 2, 2], np.r_[x.indptr[:-1], x.indptr[-1] + 2]), shape=x.shape)
        x.indptr[1:] += 0
        x.indices = x.indices.astype(np.int64)
        x.indptr = x.indptr.astype(np.int64)
        ad.X = x
        return ad

    def make_dup_row0():
        ad = make()
        x = ad.X
        data = np.r_[np.float32(16777216.0), np.float32(1.0), x.data]
        indices = np.r_[np.int64(2), np.int64(2), x.indices]
        indptr = x.indptr.copy()
        indptr[1:] += 2
        ad.X = sp.csr_matrix((data, indices, indptr), shape=x.shape)
        return ad

    compare(*run_both(active, make, {"max_value": 5}))
    compare(*run_both(active, make_dup_row0, {}))
    compare(*run_both(active, make_dup_row0, {"zero_center": False}))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_bad_values(active, monkeypatch, fmt):
    """NaN and infinite values: upstream serves them (its numpy steps warn where
    the daemon's sums cannot tell), with the same outcome."""
    monkeypatch.setenv("AUTOZYME_STRICT", "0")

    def make():
        ad = lognorm(60, 20, fmt=fmt, seed=9)
        x = ad.X
        vals = x.data if fmt != "dense" else x.reshape(-1)
        vals[3] = np.nan
        vals[11] = np.inf
        vals[20] = -np.inf
        return ad

    compare(*run_both(active, make, {}))
    compare(*run_both(active, make, {"max_value": 2}))
    compare(*run_both(active, make, {"zero_center": False, "max_value": 2}))


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_integer_max_value_zero_keeps_upstreams_positive_zeros(active, monkeypatch, fmt):
    """max_value=0 (an int) with centring: upstream's lower bound is the integer -0,
    so clipped values are +0.0, never -0.0 (handed to upstream)."""
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    a, b, outs = run_both(active, lambda: lognorm(60, 20, fmt=fmt, seed=4), {"max_value": 0})
    compare(a, b, outs)
    assert np.array_equal(np.signbit(np.asarray(a.X)), np.signbit(np.asarray(b.X)))


def test_numba_thread_count_sets_the_order(active):
    """Upstream deals CSR rows to numba's threads; the shim asks for the same
    split, whatever numba's thread count is."""
    import numba

    before = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            make = lambda: lognorm(300, 80, seed=10)  # noqa: E731
            compare(*run_both(active, make, {}))
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize(
    "kwargs,exc",
    [({"layer": "missing"}, KeyError), ({"obsm": "missing"}, KeyError),
     ({"mask_obs": "missing"}, ValueError), ({"mask_obs": np.ones(3, bool)}, ValueError),
     ({"bogus": 1}, TypeError)],
    ids=str,
)
def test_errors_match_upstream(active, kwargs, exc):
    sc = active
    ad = lognorm(20, 10)
    with pytest.raises(exc):
        sc.pp.scale.__autozyme_upstream__(ad.copy(), **kwargs)
    with pytest.raises(exc):
        sc.pp.scale(ad, **kwargs)
    assert_same_anndata(ad, lognorm(20, 10))


def run_both_arrays(sc, make, kwargs):
    """The array API: upstream and autozyme on equal inputs; returns the inputs
    afterwards and the results (or exception types)."""
    fast = sc.pp.scale
    upstream = fast.__autozyme_upstream__
    outs = []
    for fn in (upstream, fast):
        x = make()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                res = fn(x, **kwargs)
            except Exception as e:  # noqa: BLE001 - the outcome is what is compared
                res = type(e)
        outs.append((x, res, res is x, sorted(f"{m.category.__name__}: {m.message}" for m in w)))
    (xa, ra, same_a, wa), (xb, rb, same_b, wb) = outs
    assert wa == wb and same_a == same_b
    assert_identical(xa, xb, "input afterwards")
    if isinstance(ra, type):
        assert ra is rb
    else:
        assert_identical(ra, rb, "result")


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "csr_array", "csc_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"copy": True, "max_value": 2}, {"zero_center": False}, {"zero_center": False, "copy": True},
     {"mask_obs": np.arange(90) % 2 == 0, "zero_center": False, "max_value": 1}],
    ids=repr,
)
def test_array_input(active, monkeypatch, fmt, dtype, kwargs):
    if not in_scope(fmt, kwargs):
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
    make = lambda: lognorm(90, 40, fmt=fmt, dtype=dtype, seed=12).X  # noqa: E731
    run_both_arrays(active, make, kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"layer": "x"}, {"obsm": "x"}, {"mask_obs": "keep"}, {"bogus": 1}], ids=repr
)
def test_array_input_errors(active, kwargs):
    run_both_arrays(active, lambda: lognorm(20, 10, fmt="dense").X, kwargs)


def test_shared_dense_matrix_object_is_updated_like_upstream(active):
    """`adata.layers["x"] = adata.X` shares one array: upstream scales it in
    place, visible through both names, and so does autozyme."""
    def make():
        ad = lognorm(100, 30, fmt="dense", seed=13)
        ad.layers["x"] = ad.X
        return ad

    a, b, outs = run_both(active, make, {"max_value": 1})
    compare(a, b, outs)
    assert b.layers["x"] is b.X
    assert served() == 1


def test_daemon_failure_mid_call(active, monkeypatch):
    """A daemon failure while scaling our own copy falls back to upstream (the
    input is intact); while scaling the user's array in shared memory in place,
    it is a clear error, never upstream on partly scaled data."""
    from autozyme.patches import scale as patch
    from autozyme.runtime import DaemonUnavailable

    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    sc = active
    real = patch._apply

    def failing(*args, **kwargs):
        raise DaemonUnavailable("no reply (test)")

    a, b = lognorm(80, 30, fmt="dense", seed=14), lognorm(80, 30, fmt="dense", seed=14)
    monkeypatch.setattr(patch, "_apply", failing)
    sc.pp.scale.__autozyme_upstream__(a)
    sc.pp.scale(b)  # our copy failed: upstream served it
    assert_same_anndata(a, b)

    monkeypatch.setattr(patch, "_apply", real)
    c = lognorm(80, 30, seed=15)
    sc.pp.scale(c)  # CSR: the result is a dense array in shared memory
    from autozyme import shm

    assert shm.is_placed(c.X)
    monkeypatch.setattr(patch, "_apply", failing)
    with pytest.raises(patch.ScaleInterrupted):
        sc.pp.scale(c)


@pytest.mark.parametrize("fmt", ["csr", "dense", "csr_array"])
def test_copy_stays_independent(active, monkeypatch, fmt):
    """anndata 0.13 copy-on-write: after ``b = a.copy()``, scaling ``a`` (again in
    place once its result lies in shared memory, and a copy made after that) never
    changes ``b``; a view's scale leaves its parent alone."""
    if not in_scope(fmt, {}):
        pytest.skip("upstream 1.11.5 has no scale for sparse arrays")
    sc = active
    a = lognorm(160, 60, fmt=fmt, seed=16, zero_genes=[2])
    pristine = a.copy()
    b = a.copy()
    sc.pp.scale(a, max_value=10)
    assert_same_anndata(b, pristine)
    c = a.copy()  # a copy of the adopted, segment-backed result
    c_before = c.copy()
    sc.pp.scale(a)  # in place, in shared memory
    assert_same_anndata(c, c_before)
    sc.pp.scale(c, zero_center=False)
    sc.pp.scale(b, max_value=1)
    ref = pristine.copy()
    up = sc.pp.scale.__autozyme_upstream__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        up(ref, max_value=10)
        up(ref)
    assert_same_anndata(a, ref)
    parent = pristine.copy()
    view = parent[5:100]
    sc.pp.scale(view, max_value=3)
    assert not view.is_view
    assert_same_anndata(parent, pristine)


def test_densify_warning_names_the_callers_line(active):
    """The densifying warning is attributed to the user's line (1.12 skips
    scanpy's frames; autozyme's are skipped too), or by 1.11.5's stacklevel."""
    sc = active
    ad = lognorm(50, 20, seed=17)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sc.pp.scale(ad)
    [m] = [m for m in w if "densifies" in str(m.message)]
    if upstream_record().warn_skips_packages:
        assert m.filename == __file__
