"""sc.tl.leiden: exact mode gives upstream's labels (igraph flavor), same random_state."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData


def knn_graph(n, k=10, *, seed=0, n_groups=6, dtype=np.float32, isolated=(), components=1):
    """A symmetric kNN graph (connectivity-like weights in (0, 1]) on a Gaussian
    mixture; ``components`` disjoint copies side by side; ``isolated`` rows/cols
    emptied."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    blocks = []
    for c in range(components):
        m = n // components
        centers = rng.normal(size=(n_groups, 8)) * 4
        x = centers[rng.integers(0, n_groups, m)] + rng.normal(size=(m, 8))
        dist, idx = NearestNeighbors(n_neighbors=min(k, m - 1) + 1).fit(x).kneighbors(x)
        rows = np.repeat(np.arange(m), idx.shape[1] - 1)
        w = np.exp(-dist[:, 1:].ravel() / dist[:, 1:].mean())
        a = sp.csr_matrix((w, (rows, idx[:, 1:].ravel())), shape=(m, m))
        blocks.append(a.maximum(a.T))
    a = sp.block_diag(blocks, format="csr").astype(dtype)
    if isolated:
        keep = np.ones(a.shape[0], dtype=a.dtype)
        keep[list(isolated)] = 0
        d = sp.diags(keep)
        a = (d @ a @ d).tocsr()
        a.eliminate_zeros()
    a.sort_indices()
    return a


def make_adata(a, *, obsp="connectivities"):
    ad = AnnData(np.zeros((a.shape[0], 1), dtype=np.float32))
    ad.obsp[obsp] = a
    if obsp == "connectivities":
        ad.uns["neighbors"] = {"connectivities_key": "connectivities", "params": {}}
    return ad


def outcome(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            res = type(e)
    return res, sorted(str(x.message) for x in w)


def assert_same_clustering(a, b, key):
    x, y = a.obs[key], b.obs[key]
    assert isinstance(y.dtype, pd.CategoricalDtype)
    pd.testing.assert_series_equal(x, y)
    assert list(x.cat.categories) == list(y.cat.categories)
    assert x.cat.categories.dtype == y.cat.categories.dtype
    assert x.cat.ordered == y.cat.ordered
    assert a.uns[key] == b.uns[key]
    assert set(a.obs) == set(b.obs) and set(a.uns) == set(b.uns)


def run_both(sc, make, kwargs, *, args=(), key=None, served=True):
    from autozyme import fallback

    fast = sc.tl.leiden
    upstream = fast.__autozyme_upstream__
    a, b = make(), make()
    before = fallback.counts()["served"].get("leiden", 0)
    ra, wa = outcome(upstream, a, *args, **kwargs)
    rb, wb = outcome(fast, b, *args, **kwargs)
    assert wa == wb
    if isinstance(ra, type):
        assert ra is rb
        return a, b
    if kwargs.get("copy"):
        assert "leiden" not in a.obs and "leiden" not in b.obs
        a, b = ra, rb
    else:
        assert ra is None and rb is None
    key = key or kwargs.get("key_added", "leiden")
    if kwargs.get("restrict_to") is not None and key == "leiden":
        key = "leiden_R"
    assert_same_clustering(a, b, key)
    after = fallback.counts()["served"].get("leiden", 0)
    assert (after - before == 1) == served
    return a, b


GRAPH = knn_graph(1500, seed=3)


@pytest.mark.parametrize("seed", [0, 1, 2, 12345])
@pytest.mark.parametrize("resolution", [0.3, 1.0, 2.5])
def test_identical_labels(active, seed, resolution):
    run_both(active, lambda: make_adata(GRAPH.copy()),
             dict(flavor="igraph", resolution=resolution, random_state=seed))


@pytest.mark.parametrize("use_weights", [True, False])
@pytest.mark.parametrize("n_iterations", [-1, 2, 1, 0])
def test_weights_and_iterations(active, use_weights, n_iterations):
    run_both(active, lambda: make_adata(GRAPH.copy()),
             dict(flavor="igraph", use_weights=use_weights, n_iterations=n_iterations, random_state=1))


def test_resolution_positional_and_none(active):
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph"), args=(0.7,))
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", resolution=None))


def test_float64_and_csr_array(active):
    g64 = knn_graph(900, seed=5, dtype=np.float64)
    run_both(active, lambda: make_adata(g64.copy()), dict(flavor="igraph", random_state=2))
    run_both(active, lambda: make_adata(sp.csr_array(g64)), dict(flavor="igraph", random_state=2))


def test_adjacency_obsp_neighbors_key(active):
    g = knn_graph(800, seed=7)

    def with_keys():
        ad = make_adata(g.copy())
        ad.obsp["other_conn"] = knn_graph(800, k=6, seed=8)
        ad.uns["nbrs"] = {"connectivities_key": "other_conn", "params": {}}
        return ad

    run_both(active, with_keys, dict(flavor="igraph", obsp="other_conn"))
    run_both(active, with_keys, dict(flavor="igraph", neighbors_key="nbrs", random_state=1))
    run_both(active, with_keys, dict(flavor="igraph", adjacency=knn_graph(800, k=4, seed=9)))
    # both obsp and neighbors_key: upstream's ValueError
    a, b = run_both(active, with_keys, dict(flavor="igraph", obsp="other_conn", neighbors_key="nbrs"))
    assert "leiden" not in b.obs


def test_key_added_and_copy(active):
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", key_added="clusters"))
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", copy=True, random_state=2))


def test_restrict_to(active):
    def clustered():
        ad = make_adata(GRAPH.copy())
        sc = active
        sc.tl.leiden.__autozyme_upstream__(ad, flavor="igraph", resolution=0.3, key_added="coarse")
        return ad

    cats = list(clustered().obs["coarse"].cat.categories)
    run_both(active, clustered, dict(flavor="igraph", restrict_to=("coarse", cats[:2])))
    run_both(active, clustered, dict(flavor="igraph", restrict_to=("coarse", cats[1:2]), key_added="sub",
                                     random_state=3))
    # a category that does not exist: upstream's ValueError
    run_both(active, clustered, dict(flavor="igraph", restrict_to=("coarse", ["nope"])))


@pytest.mark.parametrize("case", ["isolated", "components", "tiny", "single", "no_edges", "self_loops",
                                  "explicit_zeros", "duplicates", "unsorted"])
def test_graph_shapes(active, case):
    if case == "isolated":
        g = knn_graph(600, seed=11, isolated=(0, 5, 17, 599))
    elif case == "components":
        g = knn_graph(900, seed=12, components=3)
    elif case == "tiny":
        g = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0.5], [0, 0.5, 0]], dtype=np.float32))
    elif case == "single":
        g = sp.csr_matrix((1, 1), dtype=np.float32)
    elif case == "no_edges":
        g = sp.csr_matrix((5, 5), dtype=np.float32)
    elif case == "self_loops":
        g = (knn_graph(300, seed=13) + sp.eye(300, dtype=np.float32)).tocsr()
    elif case == "explicit_zeros":
        g = knn_graph(300, seed=14)
        g.data[::7] = 0
    elif case == "duplicates":
        g = knn_graph(300, seed=15)
        # row 0..: each row's first entry stored twice
        lens = np.diff(g.indptr)
        dup = g.indptr[:-1][lens > 0]
        pos = np.sort(np.concatenate([np.arange(g.nnz), dup]))
        indptr = np.concatenate([[0], np.cumsum(lens + (lens > 0))])
        g = sp.csr_matrix((g.data[pos], g.indices[pos], indptr), shape=g.shape)
        assert not g.has_canonical_format and g.nnz > 4000
        assert not g.has_canonical_format
    else:
        g = knn_graph(300, seed=16)
        for i in range(0, 300, 3):  # reverse each third row's entries
            s, e = g.indptr[i], g.indptr[i + 1]
            g.indices[s:e] = g.indices[s:e][::-1].copy()
            g.data[s:e] = g.data[s:e][::-1].copy()
        g.has_sorted_indices = False
    for seed in (0, 1):
        run_both(active, lambda: make_adata(g.copy()), dict(flavor="igraph", random_state=seed))


def test_edge_list_path(active, monkeypatch):
    """Graphs too large for the GraphDB reader's 16-bit ids go through the edge list."""
    from autozyme.patches import leiden

    monkeypatch.setattr(leiden, "_GRAPHDB_MAX", 10)
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", random_state=4))


def test_random_state_objects(active):
    """A RandomState (or None: numpy's global one) advances exactly as upstream's."""
    for make_rs in (lambda: np.random.RandomState(7), lambda: None):
        np.random.seed(99)
        rs_a, rs_b = make_rs(), make_rs()
        a, b = make_adata(GRAPH.copy()), make_adata(GRAPH.copy())
        active.tl.leiden.__autozyme_upstream__(a, flavor="igraph", random_state=rs_a)
        after_a = (rs_a or np.random).random_sample(3)
        np.random.seed(99)
        active.tl.leiden(b, flavor="igraph", random_state=rs_b)
        after_b = (rs_b or np.random).random_sample(3)
        assert b.uns["leiden"]["params"]["random_state"] is rs_b
        a.uns["leiden"]["params"]["random_state"] = b.uns["leiden"]["params"]["random_state"] = None
        assert_same_clustering(a, b, "leiden")
        np.testing.assert_array_equal(after_a, after_b)
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", random_state=np.int64(5)))


def test_stream_matches_numpy():
    from autozyme.patches import leiden

    assert leiden._stream_matches_numpy()
    from scanpy._utils.random import _RNGIgraph

    ref, ours = _RNGIgraph(3), leiden._StreamRNG(3, 1)
    # across the first chunk's end (1024 positions), in an irregular pattern
    for i in range(5000):
        if i % 3 == 1 or i % 7 == 0:
            assert ours.random() == ref.random()
        else:
            assert ours.getrandbits(32) == ref.getrandbits(32)


def test_out_of_scope_falls_back(active, monkeypatch):
    from autozyme import AutozymeFallbackError, fallback

    make = lambda: make_adata(GRAPH.copy())  # noqa: E731
    # strict mode (the tests' default): an in-scope-looking call that falls back raises
    for kwargs in (dict(), dict(flavor="leidenalg"), dict(flavor="igraph", beta=0.05),
                   dict(flavor="igraph", adjacency=sp.csc_matrix(GRAPH))):
        with pytest.raises(AutozymeFallbackError):
            active.tl.leiden(make(), **kwargs)
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    fallback.reset_counts()
    run_both(active, make, dict(flavor="igraph", beta=0.05), served=False)
    run_both(active, make, dict(flavor="igraph", objective_function="CPM", resolution=0.05), served=False)
    run_both(active, make, dict(flavor="igraph", adjacency=sp.csc_matrix(GRAPH)), served=False)
    run_both(active, make, dict(flavor="igraph", adjacency=GRAPH.astype(np.int64)), served=False)
    assert sum(fallback.counts()["fallbacks"]["leiden"].values()) == 4


def test_bad_arguments_get_upstreams_errors(active):
    make = lambda: make_adata(GRAPH.copy())  # noqa: E731
    run_both(active, make, dict(flavor="igraph", directed=True), served=False)
    run_both(active, make, dict(flavor="igraph", partition_type=object), served=False)
    run_both(active, make, dict(flavor="nope"), served=False)
    run_both(active, lambda: AnnData(np.zeros((5, 2), dtype=np.float32)), dict(flavor="igraph"), served=False)


# --- parallel mode (opt-in) ----------------------------------------------------------

def overlapping_graph(n=3000, groups=12, seed=0):
    """Overlapping Gaussian clusters: Leiden runs disagree a little between seeds."""
    return knn_graph(n, k=10, seed=seed, n_groups=groups)


@pytest.fixture
def parallel_mode(active):
    import autozyme
    from autozyme import settings

    autozyme.configure(leiden="parallel")
    yield active
    settings.reset()


def igraph_modularity(a, labels, resolution=1.0):
    from scanpy._utils import get_igraph_from_adjacency

    g = get_igraph_from_adjacency(a, directed=False)
    return g.modularity(np.asarray(labels).astype(int).tolist(), weights="weight", resolution=resolution)


def labels_of(ad, key="leiden"):
    return ad.obs[key].astype(int).to_numpy()


def assert_connected(a, labels):
    from scipy.sparse.csgraph import connected_components

    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        sub = a[members][:, members]
        assert connected_components(sub, directed=False)[0] == 1, f"community {c} is not connected"


@pytest.mark.parametrize("flavor", ["igraph", "leidenalg"])
def test_parallel_mode_writes_like_upstream(parallel_mode, flavor):
    from autozyme import fallback

    sc = parallel_mode
    a = overlapping_graph(1200, seed=21)
    ours, ref = make_adata(a.copy()), make_adata(a.copy())
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        sc.tl.leiden(ours, flavor=flavor, resolution=0.9, random_state=3, key_added="cl")
    with warnings.catch_warnings(record=True) as w_ref:
        warnings.simplefilter("always")
        sc.tl.leiden.__autozyme_upstream__(ref, flavor=flavor, resolution=0.9, random_state=3, key_added="cl")
    assert sorted(str(x.message) for x in w_ours) == sorted(str(x.message) for x in w_ref)
    assert fallback.counts()["served"]["leiden"] == 1
    x, y = ours.obs["cl"], ref.obs["cl"]
    assert x.dtype == y.dtype or isinstance(x.dtype, pd.CategoricalDtype)
    assert x.cat.categories.dtype == y.cat.categories.dtype and not x.cat.ordered
    assert list(x.cat.categories) == [str(i) for i in range(len(x.cat.categories))]
    sizes = x.value_counts(sort=False).reindex(x.cat.categories).to_numpy()
    assert (np.diff(sizes) <= 0).all()  # numbered by size
    assert ours.uns["cl"] == ref.uns["cl"]
    assert_connected(a, labels_of(ours, "cl"))


def test_parallel_mode_quality(parallel_mode):
    """Mean modularity at least upstream's (igraph flavor, same seeds), and the
    agreement with upstream close to upstream's own seed-to-seed agreement."""
    from sklearn.metrics import adjusted_rand_score

    sc = parallel_mode
    a = overlapping_graph(3000, groups=12, seed=4)
    up, par = [], []
    for seed in range(4):
        u, p = make_adata(a.copy()), make_adata(a.copy())
        sc.tl.leiden.__autozyme_upstream__(u, flavor="igraph", random_state=seed)
        sc.tl.leiden(p, flavor="igraph", random_state=seed)
        up.append(labels_of(u))
        par.append(labels_of(p))
        assert_connected(a, par[-1])
    q_up = np.mean([igraph_modularity(a, x) for x in up])
    q_par = np.mean([igraph_modularity(a, x) for x in par])
    assert q_par >= q_up
    ari_up = np.mean([adjusted_rand_score(up[i], up[j]) for i in range(4) for j in range(i + 1, 4)])
    ari_par = np.mean([adjusted_rand_score(p, u) for p in par for u in up])
    assert ari_par >= ari_up - 0.05


def test_parallel_mode_deterministic_across_threads(parallel_mode, tmp_path):
    """The same graph and seed in a daemon with one thread: the same labels."""
    import os
    import subprocess
    import sys

    sc = parallel_mode
    a = overlapping_graph(6000, groups=20, seed=5)
    ad = make_adata(a.copy())
    sc.tl.leiden(ad, flavor="igraph", random_state=11)
    sp.save_npz(tmp_path / "g.npz", a)
    script = f"""
import numpy as np, scipy.sparse as sp, anndata, scanpy as sc, autozyme
a = sp.load_npz({str(tmp_path / 'g.npz')!r}).tocsr()
ad = anndata.AnnData(np.zeros((a.shape[0], 1), dtype=np.float32)); ad.obsp["connectivities"] = a
ad.uns["neighbors"] = {{"connectivities_key": "connectivities", "params": {{}}}}
autozyme.activate("scanpy", prewarm=False)
sc.tl.leiden(ad, flavor="igraph", random_state=11)
assert autozyme.status()["daemon"]["threads"] == 1
np.save({str(tmp_path / 'one.npy')!r}, ad.obs["leiden"].astype(int).to_numpy())
from autozyme.client import get_client
get_client().shutdown()
"""
    env = {**os.environ, "AUTOZYME_THREADS": "1", "AUTOZYME_LEIDEN": "parallel",
           "AUTOZYME_RUNTIME_DIR": str(tmp_path / "rt")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), labels_of(ad))
    again = make_adata(a.copy())
    sc.tl.leiden(again, flavor="igraph", random_state=11)
    np.testing.assert_array_equal(labels_of(again), labels_of(ad))


def test_parallel_mode_scope(parallel_mode, monkeypatch):
    from autozyme import AutozymeFallbackError, fallback, settings

    sc = parallel_mode
    a = overlapping_graph(600, seed=6)
    asym = a.copy()
    asym.data[::5] *= 2  # A != Aᵀ
    with pytest.raises(AutozymeFallbackError):  # directed leidenalg on an asymmetric graph
        sc.tl.leiden(make_adata(asym.copy()), flavor="leidenalg")
    with pytest.raises(AutozymeFallbackError):  # random_state that is not an integer
        sc.tl.leiden(make_adata(a.copy()), flavor="igraph", random_state=None)
    fallback.reset_counts()
    sc.tl.leiden(make_adata(asym.copy()), flavor="leidenalg", directed=False)
    sc.tl.leiden(make_adata(asym.copy()), flavor="igraph", use_weights=False, n_iterations=2)
    assert fallback.counts()["served"]["leiden"] == 2
    # the environment variable
    settings.reset()
    monkeypatch.setenv("AUTOZYME_LEIDEN", "parallel")
    assert settings.leiden_mode() == "parallel"
    monkeypatch.setenv("AUTOZYME_LEIDEN", "exact")
    assert settings.leiden_mode() == "exact"
    with pytest.raises(ValueError):
        settings.configure(leiden="fast")
