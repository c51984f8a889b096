"""sc.tl.rank_genes_groups(method="wilcoxon"): autozyme against upstream scanpy, bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _data import assert_identical, counts

SIZES9 = [0.36, 0.2, 0.14, 0.1, 0.07, 0.05, 0.04, 0.025, 0.015]


def make(n_cells=300, n_genes=60, *, dtype=np.float32, fmt="csr", seed=0, probs=SIZES9,
         zero_genes=(3, 17), zero_cells=(), base=None, with_raw=False, layer=False):
    """Log-normalised counts (ties from small counts, all-zero genes), groups of
    very different sizes, each with at least two cells."""
    ad = counts(n_cells, n_genes, seed=seed, dtype=np.float64, zero_genes=zero_genes,
                zero_cells=zero_cells, density=0.2)
    x = ad.X.tocsr()
    sums = np.asarray(x.sum(axis=1)).ravel()
    sums[sums == 0] = 1
    x = sp.diags(1e3 / sums) @ x
    x.data = np.log1p(x.data) if base is None else np.log1p(x.data) / np.log(base)
    x = x.astype(dtype).tocsr()
    x.sort_indices()
    rng = np.random.default_rng(seed + 1)
    grp = rng.choice(len(probs), n_cells, p=np.asarray(probs) / np.sum(probs))
    for g in range(len(probs)):  # at least two cells per group
        grp[2 * g: 2 * g + 2] = g
    ad.obs["grp"] = pd.Categorical([f"g{k}" for k in grp], categories=[f"g{k}" for k in range(len(probs))])
    ad.obs["other"] = pd.Categorical([f"o{k % 3}" for k in rng.integers(0, 7, n_cells)])
    if base is not None:
        ad.uns["log1p"] = {"base": base}
    if with_raw:
        ad.X = x.copy()
        ad.raw = ad
        ad.X = x * 0.5  # something else in X
    else:
        ad.X = x
    if layer:
        ad.layers["lay"] = ad.X.copy()
        ad.X = ad.X * 2.0
    if fmt == "dense":
        ad.X = ad.X.toarray()
        for k in list(ad.layers):
            if sp.issparse(ad.layers[k]):  # anndata 0.13 lists X as layers[None]
                ad.layers[k] = ad.layers[k].toarray()
    if fmt == "csc":
        ad.X = ad.X.tocsc()
    if fmt in ("csr_array", "csc_array"):
        ad.X = getattr(sp, fmt)(ad.X.asformat(fmt[:3]))
    return ad


def upstream_record():
    """The patch's own record of upstream's behaviour on the installed scanpy."""
    from autozyme import versions
    from autozyme.patches import rank_genes_groups as patch

    return versions.pick(patch.UPSTREAM)


def outcome(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            res = type(e)
    return res, sorted(str(x.message) for x in w)


def assert_same_result(ua, ub):
    assert list(ua) == list(ub)  # the same keys, written in the same order
    assert ua["params"] == ub["params"]
    for field in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj"):
        if field not in ua:
            continue
        ra, rb = ua[field], ub[field]
        assert type(ra) is type(rb) and ra.dtype == rb.dtype, field
        for name in ra.dtype.names:
            assert_identical(np.ascontiguousarray(ra[name]), np.ascontiguousarray(rb[name]), f"{field}[{name}]")
    for field in ("pts", "pts_rest"):
        if field not in ua:
            continue
        fa, fb = ua[field], ub[field]
        assert list(fa.columns) == list(fb.columns) and fa.index.equals(fb.index), field
        assert_identical(np.ascontiguousarray(fa.to_numpy()), np.ascontiguousarray(fb.to_numpy()), field)


def run_both(sc, make_data, *args, key="rank_genes_groups", reruns=1, **kwargs):
    from autozyme import fallback

    fast = sc.tl.rank_genes_groups
    upstream = fast.__autozyme_upstream__
    a, b = make_data(), make_data()
    for _ in range(reruns):
        ra, wa = outcome(upstream, a, *args, **kwargs)
        rb, wb = outcome(fast, b, *args, **kwargs)
        assert wa == wb
        if isinstance(ra, type):
            assert ra is rb
            return a, b
        if kwargs.get("copy"):
            a, b = ra, rb
        assert_same_result(a.uns[key], b.uns[key])
    assert fallback.counts()["served"].get("rank_genes_groups", 0) >= 1, fallback.counts()
    return a, b


@pytest.mark.parametrize(("fmt", "dtype"), [("csr", np.float32), ("csr", np.float64),
                                           ("dense", np.float32), ("dense", np.float64),
                                           ("csc", np.float32)])
@pytest.mark.parametrize("reference", ["rest", "g2"])
def test_basic(active, dtype, fmt, reference):
    run_both(active, lambda: make(dtype=dtype, fmt=fmt), "grp", method="wilcoxon",
             reference=reference, pts=True, tie_correct=True)


@pytest.mark.parametrize(("tie_correct", "corr_method", "rankby_abs"), [
    (False, "benjamini-hochberg", False), (True, "benjamini-hochberg", True),
    (False, "bonferroni", True), (True, "bonferroni", False)])
def test_options(active, tie_correct, corr_method, rankby_abs):
    run_both(active, lambda: make(seed=3), "grp", method="wilcoxon", tie_correct=tie_correct,
             corr_method=corr_method, rankby_abs=rankby_abs, n_genes=13, pts=True)


def test_groups_subset_keys_and_reruns(active):
    a, b = run_both(active, lambda: make(seed=4), "grp", method="wilcoxon", groups=["g1", "g5", "g8"],
                    key_added="sub", key="sub", reruns=2)
    run_both(active, lambda: make(seed=4), "grp", method="wilcoxon", groups=["g1", "g5"],
             reference="g8", pts=True)
    run_both(active, lambda: make(seed=4), "other", method="wilcoxon", pts=True, n_genes=5)


def test_raw_layer_mask_base(active):
    run_both(active, lambda: make(seed=5, with_raw=True), "grp", method="wilcoxon", pts=True)
    run_both(active, lambda: make(seed=5, with_raw=True), "grp", method="wilcoxon", use_raw=False)
    run_both(active, lambda: make(seed=5, layer=True), "grp", method="wilcoxon", layer="lay",
             use_raw=False, pts=True)
    mask = np.arange(60) % 3 != 0
    run_both(active, lambda: make(seed=5), "grp", method="wilcoxon", mask_var=mask, pts=True)
    run_both(active, lambda: make(seed=5, base=2), "grp", method="wilcoxon", tie_correct=True)
    run_both(active, lambda: make(seed=5, fmt="dense", base=10), "grp", method="wilcoxon",
             mask_var=mask, reference="g0")


def test_copy_and_larger(active):
    run_both(active, lambda: make(1500, 40, seed=6, dtype=np.float64), "grp", method="wilcoxon",
             pts=True, tie_correct=True, copy=True)


def test_cache_reused_across_groupings(active):
    from autozyme.patches import rank_genes_groups as patch

    # A shape no other test uses: the first call finds no cached structure of its
    # shape, so the daemon copies the matrix and hashes the copy; the calls on
    # `ad2` hash it where it lies. Both must give the same key.
    ad = make(317, 53, seed=7)
    active.tl.rank_genes_groups(ad, "grp", method="wilcoxon")
    active.tl.rank_genes_groups(ad, "other", method="wilcoxon", reference="o1", tie_correct=True)
    assert patch.last.cache_hit
    ad2 = ad.copy()
    active.tl.rank_genes_groups(ad2, "grp", method="wilcoxon", groups=["g0", "g3"])
    assert patch.last.cache_hit  # same content, another object
    ad2.X.data[5] += 1.0  # a changed matrix must not hit
    active.tl.rank_genes_groups(ad2, "grp", method="wilcoxon")
    assert not patch.last.cache_hit
    st = active and __import__("autozyme").status()
    assert st["daemon"]["cache_hits"] >= 2 and st["daemon"]["cache"]


def test_errors_and_out_of_scope(active):
    from autozyme import fallback

    def single():
        ad = make(seed=8)
        cats = list(ad.obs["grp"].cat.categories) + ["lonely"]
        ad.obs["grp"] = ad.obs["grp"].cat.set_categories(cats)
        ad.obs.iloc[0, ad.obs.columns.get_loc("grp")] = "lonely"
        return ad

    run_both(active, single, "grp", method="wilcoxon")  # upstream's ValueError
    run_both(active, lambda: make(seed=8), "grp", method="wilcoxon", reference="nope")
    run_both(active, lambda: make(seed=8), "grp", method="wilcoxon", corr_method="holm")
    fallback.set_strict_scope(False)
    try:
        run_both(active, lambda: make(seed=8), "grp", method="t-test")
    except AssertionError:
        pass  # served count: t-test is out of scope, falls back
    finally:
        fallback.set_strict_scope(True)
    assert any("method" in r for r in fallback.counts()["fallbacks"].get("rank_genes_groups", {}))


def test_negative_values_and_all_zero(active):
    def neg():
        ad = make(seed=9, fmt="dense", dtype=np.float64)
        ad.X[:, 5] -= 0.75
        ad.X[:, 7] = 0.0
        ad.X[::4, 9] = -ad.X[::4, 9]
        return ad

    run_both(active, neg, "grp", method="wilcoxon", pts=True, tie_correct=True)
    run_both(active, neg, "grp", method="wilcoxon", reference="g0", tie_correct=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_numba_thread_count_is_followed(active, threads):
    """1.11.5's sparse means add per-thread partials, so the daemon follows the
    client's numba thread count (float64 data: sums that depend on the order);
    1.12's aggregate sums do not depend on it."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        run_both(active, lambda: make(800, 30, seed=10, dtype=np.float64), "grp", method="wilcoxon",
                 pts=True)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_integer_counts(active, fmt):
    def ints():
        ad = counts(400, 25, seed=11, dtype=np.int64, fmt=fmt, zero_genes=(2,))
        ad.obs["grp"] = pd.Categorical(["a", "b", "b", "c"] * 100)
        return ad

    run_both(active, ints, "grp", method="wilcoxon", pts=True, tie_correct=True)
    run_both(active, ints, "grp", method="wilcoxon", reference="c")


@pytest.mark.parametrize("fmt", ["csr_array", "csc_array"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reference", ["rest", "g4"])
def test_sparse_arrays(active, fmt, dtype, reference):
    """Served on 1.12; on 1.11.5 upstream raises NotImplementedError, and so does the call."""
    from autozyme import fallback

    data = lambda: make(250, 45, seed=12, dtype=dtype, fmt=fmt)  # noqa: E731
    kwargs = dict(method="wilcoxon", reference=reference, pts=True, tie_correct=True)
    if upstream_record().sparse_arrays:
        run_both(active, data, "grp", **kwargs)
        return
    fast = active.tl.rank_genes_groups
    ra, _ = outcome(fast.__autozyme_upstream__, data(), "grp", **kwargs)
    rb, _ = outcome(fast, data(), "grp", **kwargs)
    assert ra is rb is NotImplementedError
    assert not fallback.counts()["served"].get("rank_genes_groups")


@pytest.mark.parametrize("fmt", ["csr", "dense", "csc"])
def test_odd_groups(active, fmt):
    """A one-cell group outside the selection, a rest of one cell, cells of no
    category (NaN), all-zero cells, a single selected group, very unequal sizes."""
    def lonely():
        ad = make(400, 40, seed=13, fmt=fmt, dtype=np.float64, zero_cells=(0, 7, 8, 399),
                  probs=[0.6, 0.25, 0.1, 0.03, 0.02])
        cats = list(ad.obs["grp"].cat.categories) + ["one"]
        col = ad.obs["grp"].cat.set_categories(cats).to_numpy().copy()
        col[5] = "one"
        col[[20, 21, 22, 23]] = np.nan
        ad.obs["grp"] = pd.Categorical(col, categories=cats)
        return ad

    everyone_but_one = ["g0", "g1", "g2", "g3", "g4"]
    run_both(active, lonely, "grp", method="wilcoxon", groups=everyone_but_one, pts=True, tie_correct=True)
    run_both(active, lonely, "grp", method="wilcoxon", groups=["g0", "g2", "g4"], pts=True)
    run_both(active, lonely, "grp", method="wilcoxon", groups=["g3"], pts=True)
    run_both(active, lonely, "grp", method="wilcoxon", groups=["g4", "g0"], reference="g0", pts=True)
    run_both(active, lonely, "grp", method="wilcoxon", groups=["g3", "g1", "g4"], reference="g4",
             tie_correct=True, n_genes=7)


def test_mask_var_by_name_and_n_genes(active):
    def masked():
        ad = make(300, 50, seed=14, fmt="csc", dtype=np.float64)
        ad.var["hv"] = np.arange(50) % 4 != 1
        return ad

    run_both(active, masked, "grp", method="wilcoxon", mask_var="hv", pts=True, n_genes=10,
             rankby_abs=True, key_added="masked", key="masked")


def test_one_gene_dense(active):
    """1.12's aggregate adds row by row whatever the shape (served); 1.11.5's numpy
    mean of one column is pairwise (falls back, out of scope)."""
    from autozyme import fallback

    def one():
        ad = make(200, 30, seed=15, fmt="dense", dtype=np.float64)
        return ad[:, [4]].copy()

    if upstream_record().aggregate_stats:
        run_both(active, one, "grp", method="wilcoxon", pts=True)
        return
    fallback.set_strict_scope(False)
    try:
        a, b = one(), one()
        active.tl.rank_genes_groups.__autozyme_upstream__(a, "grp", method="wilcoxon")
        active.tl.rank_genes_groups(b, "grp", method="wilcoxon")
        assert_same_result(a.uns["rank_genes_groups"], b.uns["rank_genes_groups"])
        assert any("fewer than two genes" in r for r in fallback.counts()["fallbacks"]["rank_genes_groups"])
    finally:
        fallback.set_strict_scope(True)


@pytest.mark.parametrize("n_jobs", [1, 2, -1])
def test_numba_threads_restored_and_n_jobs(active, n_jobs):
    """1.12.2 on: upstream limits numba to settings.n_jobs during the statistics
    and restores numba's thread count afterwards; the same holds with autozyme,
    and results do not depend on it."""
    import numba

    before_jobs = active.settings.n_jobs
    before_threads = numba.get_num_threads()
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    active.settings.n_jobs = n_jobs
    try:
        run_both(active, lambda: make(500, 30, seed=16, dtype=np.float64), "grp", method="wilcoxon",
                 pts=True)
        assert numba.get_num_threads() == threads
    finally:
        active.settings.n_jobs = before_jobs
        numba.set_num_threads(before_threads)


def test_copies_and_views_are_independent(active):
    """The patch never writes the user's matrix; with the matrix already in shared
    memory (as after another patch adopted it), a copy made before or after the
    call keeps its own data, and a view gives upstream's result."""
    from autozyme import shm

    fast = active.tl.rank_genes_groups
    upstream = fast.__autozyme_upstream__
    a = make(300, 40, seed=17)
    a.X.data[::11] = 0.0  # explicit zeros: upstream's eliminate_zeros rewrites X in place
    for attr in ("data", "indices", "indptr"):
        setattr(a.X, attr, shm.placed(getattr(a.X, attr)))
    b = a.copy()
    snapshot = b.X.copy()
    ref = a.copy()
    fast(a, "grp", method="wilcoxon", pts=True)
    upstream(ref, "grp", method="wilcoxon", pts=True)
    assert_same_result(ref.uns["rank_genes_groups"], a.uns["rank_genes_groups"])
    assert "eliminate_zeros" not in vars(a.X)  # the call's own check is gone
    assert "rank_genes_groups" not in b.uns
    assert_identical(b.X, snapshot, "copy's X")
    c = a.copy()
    fast(c, "grp", method="wilcoxon", reference="g1")
    assert_identical(a.X, ref.X, "original's X after a call on its copy")

    keep = np.arange(300) % 5 != 0
    run_both(active, lambda: make(300, 40, seed=17)[keep], "grp", method="wilcoxon", pts=True)
    run_both(active, lambda: make(300, 40, seed=17, fmt="dense")[:, 5:], "grp", method="wilcoxon",
             reference="g0")


@pytest.mark.parametrize("stored", ["no zeros", "explicit zeros", "entries past indptr[-1]"])
def test_matrix_after_the_call_is_upstreams(active, stored):
    """Upstream's eliminate_zeros leaves the ranked matrix without stored zeros and
    without entries past its last row; the call skips that rewrite only where it
    would change nothing."""
    import scipy.sparse as sp

    fast = active.tl.rank_genes_groups
    upstream = fast.__autozyme_upstream__

    def data():
        ad = make(200, 30, seed=23)
        if stored == "explicit zeros":
            ad.X.data[::7] = 0.0
        elif stored == "entries past indptr[-1]":
            x = ad.X
            ad.X = sp.csr_matrix((np.append(x.data, [5.0, 6.0]).astype(x.dtype),
                                  np.append(x.indices, [0, 1]).astype(x.indices.dtype), x.indptr),
                                 shape=x.shape)
        return ad

    a, b = data(), data()
    upstream(a, "grp", method="wilcoxon", pts=True)
    fast(b, "grp", method="wilcoxon", pts=True)
    assert_same_result(a.uns["rank_genes_groups"], b.uns["rank_genes_groups"])
    for attr in ("data", "indices", "indptr"):
        assert_identical(getattr(a.X, attr), getattr(b.X, attr), attr)
    assert "eliminate_zeros" not in vars(b.X)
