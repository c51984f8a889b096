"""sc.pp.highly_variable_genes (seurat_v3 flavors): autozyme against upstream, bit
for bit, including warnings and exceptions."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from _data import assert_same_anndata, counts

FORMATS = ["csr", "csc", "dense", "csr_array", "csc_array"]


def upstream_record():
    """The patch's own record of what the installed scanpy does."""
    from autozyme import versions
    from autozyme.patches import highly_variable_genes as hvg

    return versions.pick(hvg.UPSTREAM)


def served_format(fmt) -> bool:
    """Whether the fast path serves this input format on the installed scanpy."""
    return not fmt.endswith("_array") or upstream_record().sparse_arrays


def matrix_counts(n_cells, n_genes, *, fmt="csr", **kw):
    """``counts`` in any of FORMATS (scipy sparse arrays included)."""
    import scipy.sparse as sp

    ad = counts(n_cells, n_genes, fmt="csr", **kw)
    x = ad.X
    ad.X = {
        "csr": lambda: x,
        "csc": lambda: x.tocsc(),
        "dense": lambda: x.toarray(),
        "csr_array": lambda: sp.csr_array(x),
        "csc_array": lambda: sp.csc_array(x),
    }[fmt]()
    return ad


def run_both(sc, make, kwargs, *, reruns=1):
    """Upstream and autozyme on equal copies; returns both AnnData and outcomes."""
    fast = sc.pp.highly_variable_genes
    upstream = fast.__autozyme_upstream__
    a, b = make(), make()
    outs = []
    for adata, fn in ((a, upstream), (b, fast)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = []
            for _ in range(reruns):
                try:
                    res.append(fn(adata, **kwargs))
                except Exception as e:  # noqa: BLE001 - the outcome is what is compared
                    res.append((type(e), str(e)))
        outs.append((res, sorted(f"{x.category.__name__}: {x.message}" for x in w)))
    return a, b, outs


def _same_frame(ra, rb):
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
    (res_a, warn_a), (res_b, warn_b) = outs
    assert warn_a == warn_b
    assert len(res_a) == len(res_b)
    for ra, rb in zip(res_a, res_b):
        if isinstance(ra, tuple):
            assert ra == rb, f"upstream raised {ra}, autozyme gave {rb!r}"
        elif isinstance(ra, pd.DataFrame):
            _same_frame(ra, rb)
        else:
            assert ra is None and rb is None
    assert_same_anndata(a, b)
    assert a.uns.get("hvg") == b.uns.get("hvg")


def served():
    from autozyme import fallback

    return fallback.counts()["served"].get("highly_variable_genes", 0)


def with_batches(ad, sizes, seed=0):
    """An obs column "b" with batches of the given sizes, interleaved at random."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"batch{k}" for k in range(len(sizes))], sizes)
    rng.shuffle(labels)
    ad.obs["b"] = pd.Categorical(labels)
    return ad


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
@pytest.mark.parametrize("batched", [False, True], ids=["one_batch", "batches"])
def test_matches_upstream(active, fmt, dtype, flavor, batched, monkeypatch):
    def make():
        ad = matrix_counts(700, 300, dtype=dtype, fmt=fmt, seed=3, zero_genes=[0, 7], zero_cells=[5])
        return with_batches(ad, [400, 200, 100]) if batched else ad

    if not served_format(fmt):
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
    kwargs = dict(flavor=flavor, n_top_genes=60, batch_key="b" if batched else None)
    compare(*run_both(active, make, kwargs, reruns=2))
    assert served() == (2 if served_format(fmt) else 0)


SEVEN = [1400, 600, 300, 160, 90, 60, 40]


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "csr_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("values", ["counts", "scaled"])
def test_seven_batches_of_very_different_sizes(active, fmt, dtype, values, monkeypatch):
    """Seven batches from 1,400 cells down to 40: with scanpy 1.12.2 and later, each
    batch's statistics are Welford's (sc.get.aggregate); a last-bit difference
    there changes the loess fits and the selection (the test below shows these
    data are that sensitive)."""

    def make():
        ad = matrix_counts(sum(SEVEN), 600, dtype=dtype, fmt=fmt, seed=4, density=0.3,
                           zero_genes=[1, 9], zero_cells=[3, 70])
        if values == "scaled":
            ad.X = ad.X * 1.37  # non-integers: no sum is exact, every order shows
        return with_batches(ad, SEVEN, seed=2)

    if not served_format(fmt):
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
    flavor = "seurat_v3" if dtype == np.float32 else "seurat_v3_paper"
    a, b, outs = run_both(active, make, dict(flavor=flavor, batch_key="b", n_top_genes=80))
    if served_format(fmt):
        assert outs[0][0] == [None], outs[0][0]  # upstream completes: results are compared
    compare(a, b, outs)
    assert served() == (1 if served_format(fmt) else 0)


def test_batch_statistics_matter(active, monkeypatch):
    """The other version's batch statistics give another selection on the seven
    batches' data: the oracle tests above can tell them apart."""
    import dataclasses

    from autozyme.patches import highly_variable_genes as hvg

    monkeypatch.setenv("AUTOZYME_HVG_CACHE", "0")
    up = upstream_record()
    other = dataclasses.replace(up, batch_stats="sums" if up.batch_stats == "welford" else "welford")
    make = lambda: with_batches(matrix_counts(sum(SEVEN), 600, seed=4, density=0.3), SEVEN, seed=2)  # noqa: E731
    kwargs = dict(flavor="seurat_v3", batch_key="b", n_top_genes=80, inplace=False)
    right = active.pp.highly_variable_genes(make(), **kwargs)
    monkeypatch.setattr(hvg.versions, "pick", lambda records, version=None: other)
    wrong = active.pp.highly_variable_genes(make(), **kwargs)
    assert not right["variances_norm"].equals(wrong["variances_norm"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_top_genes=25, span=0.5),
        dict(n_top_genes=1000),  # more than there are genes
        dict(subset=True, n_top_genes=40),
        dict(inplace=False, n_top_genes=40),
        dict(inplace=False, subset=True, n_top_genes=40, batch_key="b"),
        dict(inplace=False, batch_key="b", flavor="seurat_v3_paper"),
        dict(check_values=False),
        dict(layer="counts", batch_key="b", n_top_genes=30),
        dict(batch_key="b", n_top_genes=30, subset=True, flavor="seurat_v3_paper"),
        dict(batch_key="b", n_top_genes=30),  # X is not counts: no shortcut for all cells
        dict(batch_key="b", n_top_genes=30, check_values=False),
    ],
    ids=repr,
)
def test_arguments(active, kwargs):
    def make():
        ad = with_batches(counts(380, 260, seed=5, zero_genes=[4]), [250, 130])
        ad.layers["counts"] = ad.X.copy()
        ad.X = ad.X * 0.5  # X itself is not counts: the layer must be used
        return ad

    kwargs = {"flavor": "seurat_v3", **kwargs}
    compare(*run_both(active, make, kwargs))
    assert served() == 1


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_non_integer_warning(active, fmt):
    def make():
        ad = counts(300, 120, seed=7, fmt=fmt, dtype=np.float64)
        ad.X = ad.X * 1.5
        return ad

    a, b, outs = run_both(active, make, dict(flavor="seurat_v3", n_top_genes=30))
    compare(a, b, outs)
    assert any("non-integers were found" in m for m in outs[1][1])
    assert served() == 1


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_negative_values_warn(active, fmt):
    import scipy.sparse as sp

    def make():
        ad = with_batches(counts(500, 90, seed=8, fmt="dense", dtype=np.float64), [300, 200])
        ad.X[3, 4] = -2.0
        ad.X[7, 5] = -0.0
        if fmt == "csr":
            ad.X = sp.csr_matrix(ad.X)
            ad.X.data[ad.X.data == 1.0] = -0.0  # explicit negative zeros
        return ad

    compare(*run_both(active, make, dict(flavor="seurat_v3", n_top_genes=20, batch_key="b")))
    compare(*run_both(active, make, dict(flavor="seurat_v3", n_top_genes=20)))


UPSTREAM_IN_SUBPROCESS = """
import sys, anndata as ad, scanpy as sc
a = ad.read_h5ad(sys.argv[1])
try:
    sc.pp.highly_variable_genes(a, flavor="seurat_v3", batch_key="b", n_top_genes=30)
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(3)
print("completed")
"""


def _few_varying_genes(fmt, case):
    """A batch in which no gene varies (a one-cell batch, or one where every gene is
    constant) or only one gene does."""
    import scipy.sparse as sp

    if case == "one_cell_batch":
        return with_batches(matrix_counts(300, 150, seed=9, fmt=fmt), [1, 60, 239])
    ad = with_batches(counts(200, 80, seed=10, fmt="dense"), [20, 180])
    first = (ad.obs["b"] == "batch0").to_numpy()
    ad.X[first] = 2.0
    if case == "one_varying_gene":
        ad.X[np.flatnonzero(first)[0], 3] = 5.0
    if fmt == "csr":
        ad.X = sp.csr_matrix(ad.X)
    return ad


@pytest.mark.parametrize("fmt", ["csr", "dense"])
@pytest.mark.parametrize("case", ["one_cell_batch", "constant_batch", "one_varying_gene"])
def test_loess_on_too_few_points(active, fmt, case, tmp_path):
    """loess on fewer points than one span's worth: scikit-misc crashes the process
    (SIGSEGV), and upstream with it, so we raise a ValueError instead. scanpy
    1.12.1 and later skip loess for a batch in which no gene varies: served as
    upstream computes it (a one-cell batch also warns, from aggregate and numpy)."""
    import subprocess
    import sys

    skips = upstream_record().loess_skips_no_variance and case != "one_varying_gene"
    if skips:
        make = lambda: _few_varying_genes(fmt, case)  # noqa: E731
        a, b, outs = run_both(active, make, dict(flavor="seurat_v3", batch_key="b", n_top_genes=30))
        compare(a, b, outs)
        # The one-cell case's 60-cell batch is too small for a stable loess fit:
        # upstream's error then, after its warnings, each given once.
        assert served() == (outs[0][0] == [None])
        return
    ad = _few_varying_genes(fmt, case)
    path = tmp_path / "a.h5ad"
    ad.write_h5ad(path)
    before = ad.copy()
    with pytest.raises(ValueError, match="too few for a loess fit"):
        active.pp.highly_variable_genes(ad, flavor="seurat_v3", batch_key="b", n_top_genes=30)
    assert_same_anndata(ad, before)  # nothing written
    if fmt == "csr" and case in ("one_cell_batch", "one_varying_gene"):  # proof enough
        proc = subprocess.run([sys.executable, "-c", UPSTREAM_IN_SUBPROCESS, str(path)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -11, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def test_small_batches_same_loess_error(active):
    """Batches big enough for loess to run but too small for a stable fit: upstream's
    (scikit-misc's) ValueError, same message."""
    make = lambda: with_batches(counts(420, 300, seed=3, zero_genes=[0, 7]), [250, 120, 50])  # noqa: E731
    a, b, outs = run_both(active, make, dict(flavor="seurat_v3", batch_key="b", n_top_genes=60))
    compare(a, b, outs)
    assert isinstance(outs[0][0][0], tuple) and outs[0][0][0][0] is ValueError


def test_two_cell_batches(active):
    make = lambda: with_batches(counts(120, 90, seed=11), [2, 2, 116])  # noqa: E731
    compare(*run_both(active, make, dict(flavor="seurat_v3_paper", batch_key="b", n_top_genes=20)))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("batched", [False, True], ids=["one_batch", "batches"])
def test_integer_counts(active, fmt, dtype, batched):
    """Integer matrices (as scanpy's own tests use): served through an f64 copy,
    whose every operation gives upstream's value."""
    def make():
        ad = matrix_counts(700, 300, fmt=fmt, seed=3, zero_genes=[0, 7], zero_cells=[5])
        ad.X = ad.X.astype(dtype)
        return with_batches(ad, [400, 200, 100]) if batched else ad

    kwargs = dict(flavor="seurat_v3", n_top_genes=60, batch_key="b" if batched else None)
    compare(*run_both(active, make, kwargs))
    assert served() == 1


def test_integer_counts_too_large_fall_back(active, monkeypatch):
    monkeypatch.setenv("AUTOZYME_STRICT", "0")

    def make():
        ad = counts(300, 100, seed=3)
        ad.X = ad.X.astype(np.int32)
        ad.X.data[::7] = 50_000  # squares overflow int32 in numpy, as upstream computes them
        return ad

    compare(*run_both(active, make, dict(flavor="seurat_v3", n_top_genes=20)))
    assert served() == 0


@pytest.mark.parametrize(
    "batch_values",
    ["ints", "single", "strings", "strings_object", "categorical_unused", "categorical_numbers"],
)
def test_batch_column_types(active, batch_values):
    def make():
        ad = counts(600, 200, seed=12)
        rng = np.random.default_rng(1)
        if batch_values == "ints":
            ad.obs["b"] = rng.integers(0, 3, ad.n_obs)
        elif batch_values == "single":
            ad.obs["b"] = "only"
        elif batch_values == "strings":  # pandas 3: a str column
            ad.obs["b"] = rng.choice(["x", "y", "z"], ad.n_obs)
        elif batch_values == "strings_object":
            ad.obs["b"] = np.array(rng.choice(["x", "y", "z"], ad.n_obs), dtype=object)
        elif batch_values == "categorical_unused":
            ad.obs["b"] = pd.Categorical(rng.choice(["x", "y", "z"], ad.n_obs),
                                         categories=["z", "unused", "x", "y"])
        else:
            ad.obs["b"] = pd.Categorical(rng.choice([10.5, 2.0, -1.0], ad.n_obs))
        return ad

    compare(*run_both(active, make, dict(flavor="seurat_v3", batch_key="b", n_top_genes=20)))
    assert served() == 1


def test_int64_indices_and_thread_counts(active):
    import numba

    make = lambda: with_batches(counts(300, 140, seed=13, index_dtype=np.int64), [100, 200])  # noqa: E731
    before = numba.get_num_threads()
    try:
        for t in sorted({1, before}):
            numba.set_num_threads(t)
            compare(*run_both(active, make, dict(flavor="seurat_v3", batch_key="b", n_top_genes=30)))
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("case", ["missing_batch_key", "missing_layer", "nan_values", "bad_flavor_type"])
def test_bad_input_same_outcome(active, case, monkeypatch):
    monkeypatch.setenv("AUTOZYME_STRICT", "1")
    kwargs = dict(flavor="seurat_v3", n_top_genes=20)

    def make():
        ad = counts(150, 80, seed=14, dtype=np.float64)
        if case == "nan_values":
            ad.X.data[3] = np.nan
        return ad

    if case == "missing_batch_key":
        kwargs["batch_key"] = "nope"
    elif case == "missing_layer":
        kwargs["layer"] = "nope"
    elif case == "bad_flavor_type":
        kwargs["flavor"] = ["seurat_v3"]
    compare(*run_both(active, make, kwargs))


def test_out_of_scope_falls_back(active, monkeypatch):
    monkeypatch.setenv("AUTOZYME_STRICT", "0")

    def unsorted_csc():
        ad = counts(200, 100, seed=15, fmt="csc")
        for c in range(ad.X.shape[1]):  # each gene's rows in decreasing order
            lo, hi = ad.X.indptr[c], ad.X.indptr[c + 1]
            ad.X.indices[lo:hi] = ad.X.indices[lo:hi][::-1].copy()
            ad.X.data[lo:hi] = ad.X.data[lo:hi][::-1].copy()
        ad.X.has_sorted_indices = False
        return ad

    compare(*run_both(active, unsorted_csc, dict(flavor="seurat_v3", n_top_genes=20)))
    make = lambda: counts(200, 100, seed=15)  # noqa: E731
    compare(*run_both(active, make, dict(flavor="seurat", n_top_genes=20)))
    fortran = lambda: _with_x(counts(200, 100, seed=15), lambda x: np.asfortranarray(x.toarray()))  # noqa: E731
    compare(*run_both(active, fortran, dict(flavor="seurat_v3", n_top_genes=20)))
    assert served() == 0


def _with_x(ad, f):
    ad.X = f(ad.X)
    return ad


def test_copies_and_views_stay_apart(active):
    """anndata 0.13 copy semantics: the matrix a call places in shared memory (and
    adopts) is the called object's alone; a copy, or the parent of a view, keeps
    its own data and annotations."""
    fast = active.pp.highly_variable_genes
    a = with_batches(counts(700, 300, seed=31), [400, 200, 100])
    b = a.copy()
    before = b.copy()
    fast(a, flavor="seurat_v3", batch_key="b", n_top_genes=40)
    assert "highly_variable" in a.var and "highly_variable" not in b.var
    assert_same_anndata(b, before)
    a.X.data[:25] += 3.0  # a's data, now in shared memory
    assert_same_anndata(b, before)
    fast(b, flavor="seurat_v3", batch_key="b", n_top_genes=40)
    b.X.data[-25:] += 1.0
    assert not np.array_equal(a.X.data[-25:], b.X.data[-25:])

    def view():
        parent = with_batches(counts(700, 300, seed=32), [400, 200, 100])
        return parent[:500]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parent = with_batches(counts(700, 300, seed=32), [400, 200, 100])
        kept = parent.copy()
        v = parent[:500]
        fast(v, flavor="seurat_v3", batch_key="b", n_top_genes=40)
    assert_same_anndata(parent, kept)
    compare(*run_both(active, view, dict(flavor="seurat_v3", batch_key="b", n_top_genes=40)))


def test_one_cell_batch_in_seven(active):
    """A batch of one cell among others (and no loess crash: its variances are 0
    with 1.11.5, so its genes all count as constant... which crashes loess there,
    hence only where loess is skipped); upstream 1.12's NaN variance and warnings."""
    if not upstream_record().loess_skips_no_variance:
        pytest.skip("scanpy 1.11.5 crashes on a batch in which no gene varies")
    sizes = [1400, 600, 300, 1, 90, 60, 40]
    make = lambda: with_batches(matrix_counts(sum(sizes), 600, seed=4, density=0.3), sizes, seed=3)  # noqa: E731
    a, b, outs = run_both(active, make, dict(flavor="seurat_v3_paper", batch_key="b", n_top_genes=80),
                          reruns=2)
    compare(a, b, outs)
    assert any("Group counts matches dof" in m for m in outs[1][1])
    assert served() == 2


# --- kept results: the same data and parameters again -----------------------------
def _count_computations(monkeypatch):
    """A list that grows by one each time a result is computed, not kept."""
    from autozyme.patches import highly_variable_genes as hvg

    computed = []
    real = hvg._rank

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hvg, "_rank", counting)
    return computed


KEEP_KWARGS = dict(flavor="seurat_v3", batch_key="b", n_top_genes=40)


def test_kept_result_on_rerun_and_fresh_copy(active, monkeypatch):
    computed = _count_computations(monkeypatch)
    make = lambda: with_batches(counts(700, 300, seed=21), [400, 200, 100])  # noqa: E731
    a, b, outs = run_both(active, make, KEEP_KWARGS, reruns=3)
    compare(a, b, outs)
    assert outs[1][0] == [None] * 3  # results, not loess errors
    assert len(computed) == 1
    compare(*run_both(active, make, KEEP_KWARGS))  # fresh copies of the same data
    assert len(computed) == 1
    compare(*run_both(active, make, {**KEEP_KWARGS, "n_top_genes": 41}))
    assert len(computed) == 2
    compare(*run_both(active, make, {**KEEP_KWARGS, "span": 0.31}))
    assert len(computed) == 3
    other_batches = lambda: with_batches(make(), [400, 200, 100], seed=1)  # noqa: E731
    compare(*run_both(active, other_batches, KEEP_KWARGS))
    assert len(computed) == 4
    dense = lambda: _densified(make())  # noqa: E731
    compare(*run_both(active, dense, KEEP_KWARGS))
    assert len(computed) == 5


def _densified(ad):
    ad.X = ad.X.toarray()
    return ad


def test_changed_data_computes_again(active, monkeypatch):
    computed = _count_computations(monkeypatch)
    fast = active.pp.highly_variable_genes
    upstream = fast.__autozyme_upstream__
    a, b = (with_batches(counts(700, 300, seed=22), [400, 300]) for _ in range(2))
    upstream(a, **KEEP_KWARGS)
    fast(b, **KEEP_KWARGS)
    for ad in (a, b):
        ad.X.data[:50] += 1.0  # in place: b's arrays are the ones placed in shared memory
    upstream(a, **KEEP_KWARGS)
    fast(b, **KEEP_KWARGS)
    assert len(computed) == 2
    assert_same_anndata(a, b)


def test_kept_result_warns_renames_and_is_a_copy(active, monkeypatch):
    computed = _count_computations(monkeypatch)

    def make(names=None):
        ad = with_batches(counts(700, 300, seed=23, dtype=np.float64), [400, 300])
        ad.X = ad.X * 1.5  # non-integers: upstream warns on every call
        if names:
            ad.var_names = [f"{names}{i}" for i in range(ad.n_vars)]
        return ad

    kwargs = {**KEEP_KWARGS, "inplace": False}
    a, b, outs = run_both(active, make, kwargs, reruns=2)
    compare(a, b, outs)
    assert sum("non-integers were found" in m for m in outs[1][1]) == 2
    outs[1][0][1]["means"] = -1.0  # the user changes a returned frame: not the kept one
    compare(*run_both(active, make, kwargs))
    compare(*run_both(active, lambda: make("gene"), kwargs))  # other names, same data
    compare(*run_both(active, make, {**kwargs, "check_values": False}))  # no warning
    assert len(computed) == 1


def test_keeping_results_can_be_turned_off(active, monkeypatch):
    monkeypatch.setenv("AUTOZYME_HVG_CACHE", "0")
    computed = _count_computations(monkeypatch)
    make = lambda: with_batches(counts(700, 300, seed=24), [400, 300])  # noqa: E731
    compare(*run_both(active, make, KEEP_KWARGS, reruns=2))
    assert len(computed) == 2
