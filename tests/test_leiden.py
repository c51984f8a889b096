"""sc.tl.leiden: exact mode gives upstream's labels (igraph flavor), same random_state,
and writes what upstream writes (scanpy 1.12: the partition's modularity too); the
warnings of the version (patches/leiden.py's UPSTREAM record) as upstream gives them."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData


def knn_graph(n, k=10, *, seed=0, n_groups=6, dtype=np.float32, isolated=(), components=1, spread=4.0):
    """A symmetric kNN graph (connectivity-like weights in (0, 1]) on a Gaussian
    mixture; ``components`` disjoint copies side by side; ``isolated`` rows/cols
    emptied."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    blocks = []
    for c in range(components):
        m = n // components
        centers = rng.normal(size=(n_groups, 8)) * spread
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


def upstream_record():
    from autozyme import versions
    from autozyme.patches import leiden

    return versions.pick(leiden.UPSTREAM)


def outcome(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the outcome is what is compared
            res = type(e)
    return res, sorted((x.category.__name__, str(x.message), x.filename, x.lineno) for x in w)


def assert_same_clustering(a, b, key):
    x, y = a.obs[key], b.obs[key]
    assert isinstance(y.dtype, pd.CategoricalDtype)
    pd.testing.assert_series_equal(x, y)
    assert list(x.cat.categories) == list(y.cat.categories)
    assert x.cat.categories.dtype == y.cat.categories.dtype
    assert x.cat.ordered == y.cat.ordered
    assert a.uns[key]["params"] == b.uns[key]["params"]
    if upstream_record().stores_modularity:
        assert list(a.uns[key]) == list(b.uns[key]) == ["params", "modularity"]
        assert type(a.uns[key]["modularity"]) is type(b.uns[key]["modularity"])
        # bit for bit (== would pass NaN == NaN as False, and -0.0 == 0.0)
        assert np.float64(a.uns[key]["modularity"]).tobytes() == np.float64(b.uns[key]["modularity"]).tobytes()
    else:
        assert list(b.uns[key]) == ["params"]
    assert set(a.obs) == set(b.obs) and set(a.uns) == set(b.uns)


def run_both(sc, make, kwargs, *, args=(), key=None, served=True):
    from autozyme import fallback

    fast = sc.tl.leiden
    upstream = fast.__autozyme_upstream__
    a, b = make(), make()
    before = fallback.counts()["served"].get("leiden", 0)
    ra, wa = outcome(upstream, a, *args, **kwargs)
    rb, wb = outcome(fast, b, *args, **kwargs)
    # category and message; and where it points when upstream's names the caller
    # (scanpy's own leiden warnings; not anndata's, which names a line of scanpy's
    # source, nor 1.11.5's fixed stack level when it runs under the wrapper)
    assert [w[:2] for w in wa] == [w[:2] for w in wb]
    for x, y in zip(wa, wb):
        if x[2] == __file__:
            assert x == y
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


OVERLAPPING = knn_graph(3000, k=10, seed=4, n_groups=12, spread=1.5)


def test_identical_labels_seeds_0_1_2(active):
    """On a graph where the seed changes the clustering, each seed's labels (and,
    on 1.12, modularity) are upstream's."""
    labels = []
    for seed in (0, 1, 2):
        _, b = run_both(active, lambda: make_adata(OVERLAPPING.copy()),
                        dict(flavor="igraph", random_state=seed, resolution=0.8))
        labels.append(b.obs["leiden"].to_numpy())
    # the seeds matter on this graph, so the identity is about the random stream
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])


def test_modularity_is_igraphs(active):
    """1.12 stores the partition's modularity: igraph's ``Graph.modularity`` of the
    labels with the call's weights and resolution (1.11.5 stores none)."""
    from scanpy._utils import get_igraph_from_adjacency

    g = get_igraph_from_adjacency(OVERLAPPING, directed=False)
    for kwargs in (dict(), dict(resolution=0.5, random_state=1), dict(use_weights=False, random_state=2),
                   dict(resolution=None, n_iterations=2)):
        _, b = run_both(active, lambda: make_adata(OVERLAPPING.copy()), dict(flavor="igraph", **kwargs))
        if not upstream_record().stores_modularity:
            assert "modularity" not in b.uns["leiden"]
            continue
        q = b.uns["leiden"]["modularity"]
        assert type(q) is float and 0 < q < 1
        res = kwargs.get("resolution", 1)
        expected = g.modularity(labels_of(b).tolist(), weights="weight" if kwargs.get("use_weights", True) else None,
                                resolution=1 if res is None else res)
        assert q == expected


@pytest.mark.parametrize("use_weights", [True, False])
@pytest.mark.parametrize("n_iterations", [-1, 2, 1, 0])
def test_weights_and_iterations(active, use_weights, n_iterations):
    run_both(active, lambda: make_adata(GRAPH.copy()),
             dict(flavor="igraph", use_weights=use_weights, n_iterations=n_iterations, random_state=1))


def test_arguments_as_upstream_binds_them(active):
    """adata by keyword is served; what upstream's signature refuses (a third
    positional argument, resolution twice) gets upstream's TypeError."""
    from autozyme import fallback

    fast, upstream = active.tl.leiden, active.tl.leiden.__autozyme_upstream__
    a, b = make_adata(GRAPH.copy()), make_adata(GRAPH.copy())
    upstream(adata=a, flavor="igraph", random_state=2)
    fast(adata=b, flavor="igraph", random_state=2)
    assert fallback.counts()["served"]["leiden"] == 1
    assert_same_clustering(a, b, "leiden")
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph"), args=(0.5, None), served=False)
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", resolution=1), args=(0.5,),
             served=False)


def test_objective_function_modularity(active):
    """objective_function="modularity" is what upstream's igraph call sets anyway."""
    run_both(active, lambda: make_adata(OVERLAPPING.copy()),
             dict(flavor="igraph", objective_function="modularity", random_state=1))


def test_resolution_positional_and_none(active):
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph"), args=(0.7,))
    run_both(active, lambda: make_adata(GRAPH.copy()), dict(flavor="igraph", resolution=None))


def test_float64_and_csr_array(active):
    g64 = knn_graph(900, seed=5, dtype=np.float64)
    run_both(active, lambda: make_adata(g64.copy()), dict(flavor="igraph", random_state=2))
    run_both(active, lambda: make_adata(sp.csr_array(g64)), dict(flavor="igraph", random_state=2))


def test_csr_array_everywhere(active):
    """scipy sparse arrays (1.12 accepts them everywhere; anndata 0.13 keeps them)
    as obsp, as neighbors' connectivities, as adjacency, with restrict_to."""
    g = knn_graph(1000, seed=17)
    ga = sp.csr_array(g)

    def arrays():
        ad = make_adata(sp.csr_array(g))
        ad.obsp["other"] = sp.csr_array(knn_graph(1000, k=6, seed=18))
        ad.obs["half"] = pd.Categorical(np.where(np.arange(1000) % 3 == 0, "a", "b"))
        return ad

    for kwargs in (dict(), dict(obsp="other", random_state=1), dict(adjacency=ga, random_state=2),
                   dict(restrict_to=("half", ["b"]), random_state=0),
                   dict(restrict_to=("half", ["a", "b"]), adjacency=ga, key_added="r", copy=True)):
        run_both(active, arrays, dict(flavor="igraph", **kwargs))


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


def test_view(active):
    """A view of an AnnData: its graph is the view's, and writing the labels makes
    it an actual AnnData (with anndata's warning), as upstream does."""
    keep = np.arange(GRAPH.shape[0]) % 4 != 1
    run_both(active, lambda: make_adata(GRAPH.copy())[keep], dict(flavor="igraph", random_state=1))
    run_both(active, lambda: make_adata(GRAPH.copy())[keep], dict(flavor="igraph", copy=True))


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


def test_flavor_none(active, monkeypatch):
    """flavor=None: scanpy 1.12's default, leidenalg with a FutureWarning (exact mode
    hands it to upstream); scanpy 1.11.5 refuses it with a ValueError."""
    from autozyme import AutozymeFallbackError

    make = lambda: make_adata(GRAPH.copy())  # noqa: E731
    if upstream_record().flavor_none_is_leidenalg:
        with pytest.raises(AutozymeFallbackError, match="leidenalg"):
            active.tl.leiden(make(), flavor=None)
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
        run_both(active, make, dict(flavor=None), served=False)
        run_both(active, make, dict(), served=False)
        # upstream's FutureWarning, run under autozyme's wrapper, names the caller
        _, w = outcome(active.tl.leiden, make())
        assert [(x[0], x[2]) for x in w] == [("FutureWarning", __file__)]
    else:
        a, b = run_both(active, make, dict(flavor=None), served=False)
        assert "leiden" not in b.obs


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


@pytest.mark.parametrize("use_weights", [True, False])
@pytest.mark.parametrize("flavor", ["igraph", "leidenalg", None])
def test_parallel_mode_writes_like_upstream(parallel_mode, flavor, use_weights):
    from autozyme import fallback

    sc = parallel_mode
    up = upstream_record()
    if flavor is None and not up.flavor_none_is_leidenalg:
        a, b = run_both(sc, lambda: make_adata(GRAPH.copy()), dict(flavor=None), served=False)
        return
    a = overlapping_graph(1200, seed=21)
    ours, ref = make_adata(a.copy()), make_adata(a.copy())
    kwargs = dict(resolution=0.9, random_state=3, key_added="cl", use_weights=use_weights)
    if flavor is not None:
        kwargs["flavor"] = flavor
    r_ref, w_ref = outcome(sc.tl.leiden.__autozyme_upstream__, ref, **kwargs)
    r_ours, w_ours = outcome(sc.tl.leiden, ours, **kwargs)
    assert r_ours is None and r_ref is None
    assert fallback.counts()["served"]["leiden"] == 1
    # same category, message and place (the caller's line: the same line in
    # ``outcome`` for both; 1.11.5's warn_once at stacklevel=3 names it too)
    assert w_ours == w_ref
    assert all(w[2] == __file__ for w in w_ours)
    if up.leidenalg_warns == "every_call":
        assert [w[0] for w in w_ours] == ([] if flavor == "igraph" else
                                          ["FutureWarning" if flavor is None else "UserWarning"])
    else:
        assert [w[0] for w in w_ours] == ([] if flavor == "igraph" else ["FutureWarning"])
    x, y = ours.obs["cl"], ref.obs["cl"]
    assert x.dtype == y.dtype or isinstance(x.dtype, pd.CategoricalDtype)
    assert x.cat.categories.dtype == y.cat.categories.dtype and not x.cat.ordered
    assert list(x.cat.categories) == [str(i) for i in range(len(x.cat.categories))]
    sizes = x.value_counts(sort=False).reindex(x.cat.categories).to_numpy()
    assert (np.diff(sizes) <= 0).all()  # numbered by size
    assert ours.uns["cl"]["params"] == ref.uns["cl"]["params"]
    assert list(ours.uns["cl"]) == list(ref.uns["cl"])
    if up.stores_modularity:
        # the modularity the flavor reports, of our labels: igraph's partition
        # (weights as the call, its resolution, undirected) or leidenalg's (no
        # weights, resolution 1, directed unless directed=False)
        from scanpy._utils import get_igraph_from_adjacency

        q = ours.uns["cl"]["modularity"]
        assert type(q) is type(ref.uns["cl"]["modularity"]) is float
        labels = labels_of(ours, "cl").tolist()
        if flavor == "igraph":
            g = get_igraph_from_adjacency(a, directed=False)
            assert q == g.modularity(labels, weights="weight" if use_weights else None, resolution=0.9)
        else:
            assert q == get_igraph_from_adjacency(a, directed=True).modularity(labels)
        # upstream's own modularity of upstream's labels, near ours
        assert abs(q - ref.uns["cl"]["modularity"]) < 0.02
    assert_connected(a, labels_of(ours, "cl"))


def test_parallel_mode_restrict_to(parallel_mode):
    """restrict_to: labels renamed as upstream does; on 1.12 the modularity is that
    of the restricted graph (upstream's partition lives on it)."""
    from scanpy._utils import get_igraph_from_adjacency
    from scanpy.tools._utils_clustering import restrict_adjacency

    sc = parallel_mode
    a = overlapping_graph(1500, seed=23)
    ad = make_adata(sp.csr_array(a))
    ad.obs["part"] = pd.Categorical(np.where(np.arange(1500) % 5 == 0, "x", "y"))
    ref = ad.copy()
    sc.tl.leiden(ad, flavor="igraph", restrict_to=("part", ["y"]), random_state=2)
    sc.tl.leiden.__autozyme_upstream__(ref, flavor="igraph", restrict_to=("part", ["y"]), random_state=2)
    x, y = ad.obs["leiden_R"], ref.obs["leiden_R"]
    assert x.dtype == y.dtype or (x.cat.categories.dtype == y.cat.categories.dtype)
    assert (x[ad.obs["part"] == "x"] == "x").all()
    assert x[ad.obs["part"] == "y"].str.startswith("y,").all()
    assert ad.uns["leiden_R"]["params"] == ref.uns["leiden_R"]["params"]
    if upstream_record().stores_modularity:
        sub, keep = restrict_adjacency(ad, "part", restrict_categories=["y"], adjacency=sp.csr_matrix(a))
        labels = x[keep].str.split(",").str[1].astype(int).tolist()
        g = get_igraph_from_adjacency(sub, directed=False)
        assert ad.uns["leiden_R"]["modularity"] == g.modularity(labels, weights="weight", resolution=1)


@pytest.mark.parametrize("flavor", ["leidenalg", None])
def test_parallel_mode_warnings_as_errors(parallel_mode, flavor):
    """scanpy's test config turns warnings into errors: a served leidenalg call then
    raises upstream's warning and leaves the AnnData as upstream does."""
    sc = parallel_mode
    up = upstream_record()
    if flavor is None and not up.flavor_none_is_leidenalg:
        return
    category = UserWarning if (flavor is not None and up.leidenalg_warns == "every_call") else FutureWarning
    # (1.11.5's warn_once adds an "ignore" filter after warning; "error" put in
    # front of it here still applies)
    for fn in (sc.tl.leiden.__autozyme_upstream__, sc.tl.leiden):
        ad = make_adata(GRAPH.copy())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(category, match="igraph"):
                fn(ad, flavor=flavor, random_state=0)
        assert "leiden" not in ad.obs and "leiden" not in ad.uns
    # pytest.warns, as scanpy's test_leiden_basic asserts it
    with pytest.warns(category, match=r"igraph"):
        sc.tl.leiden(make_adata(GRAPH.copy()), flavor=flavor, random_state=0)


@pytest.mark.parametrize("trial", range(12))
def test_modularity_formula_is_igraphs(trial):
    """The parallel mode's modularity (numpy, igraph's order of operations) equals
    igraph's ``Graph.modularity`` bit for bit: directed or not, weighted or not, any
    resolution, on graphs with self-loops, duplicates, explicit zeros, asymmetry."""
    from scanpy._utils import get_igraph_from_adjacency

    from autozyme.patches import leiden

    rng = np.random.default_rng(trial)
    n = int(rng.integers(20, 2500))
    a = sp.random(n, n, density=min(1.0, float(rng.uniform(2, 25)) / n), random_state=trial, format="csr",
                  dtype=np.float32 if trial % 2 else np.float64)
    if trial % 3 == 0:
        a = a.maximum(a.T).tocsr()
    if trial % 4 == 1:
        a = (a + sp.eye(n, dtype=a.dtype)).tocsr()
    if trial % 5 == 2:
        a.data[::9] = 0
    a.sort_indices()
    if trial % 6 == 3:  # every row's first entry stored twice: non-canonical
        lens = np.diff(a.indptr)
        first = a.indptr[:-1][lens > 0]
        pos = np.sort(np.concatenate([np.arange(a.nnz), first]))
        indptr = np.concatenate([[0], np.cumsum(lens + (lens > 0))])
        a = sp.csr_matrix((a.data[pos], a.indices[pos], indptr), shape=a.shape)
    for directed in (False, True):
        g = get_igraph_from_adjacency(a, directed=directed)
        for weighted in (True, False):
            for k in (1, 3, 30, n):
                membership = rng.integers(0, k, n)
                resolution = float(rng.choice([1.0, 0.8, 2.5, 0.1]))
                expected = g.modularity(membership.tolist(), weights="weight" if weighted else None,
                                        resolution=resolution)
                got = leiden._modularity(a, membership, weighted=weighted, resolution=resolution,
                                         directed=directed)
                assert np.float64(got).tobytes() == np.float64(expected).tobytes()


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
    with pytest.warns((UserWarning, FutureWarning), match="leiden"):  # upstream's, for leidenalg
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
