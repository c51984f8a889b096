"""rank_genes_groups(method="wilcoxon") on a dask X: served beyond upstream (which
has no dask path), and identical in every field to upstream's in-memory result on
the computed matrix.

Most tests use Dask's threaded scheduler (the blocks of genes run in this process,
against the test daemon); the last one runs a real ``dask.distributed`` cluster of
two worker processes whose memory limit is below the matrix's size.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_rank_genes_groups import assert_same_result, make, upstream_record

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

pytestmark = pytest.mark.skipif(
    not upstream_record().dask, reason="the dask path serves scanpy 1.12 only"
)


def as_dask(x, rows):
    """Row chunks spanning all genes, as anndata's lazy readers give them."""
    return da.from_array(x, chunks=(rows, -1), asarray=False)


def run_dask(sc, make_data, rows, *args, key="rank_genes_groups", where="X", **kwargs):
    """Upstream in memory on one copy, autozyme on dask on another: equal results."""
    from autozyme import fallback

    upstream = sc.tl.rank_genes_groups.__autozyme_upstream__
    a, b = make_data(), make_data()
    upstream(a, *args, **kwargs)
    if where == "X":
        b.X = as_dask(b.X, rows)
    elif where == "raw":
        raw = b.raw.to_adata()
        raw.X = as_dask(raw.X, rows)
        b.raw = raw
    else:
        b.layers[where] = as_dask(b.layers[where], rows)
    served = fallback.counts()["served"].get("rank_genes_groups", 0)
    with dask.config.set(scheduler="threads"):
        sc.tl.rank_genes_groups(b, *args, **kwargs)
    assert_same_result(a.uns[key], b.uns[key])
    assert fallback.counts()["served"].get("rank_genes_groups", 0) == served + 1, fallback.counts()
    return a, b


@pytest.mark.parametrize(("fmt", "dtype"), [("csr", np.float32), ("csr", np.float64),
                                           ("csr_array", np.float32), ("dense", np.float32),
                                           ("dense", np.float64)])
@pytest.mark.parametrize("reference", ["rest", "g2"])
def test_formats_and_references(active, fmt, dtype, reference):
    run_dask(active, lambda: make(n_cells=400, n_genes=70, dtype=dtype, fmt=fmt), 97, "grp",
             method="wilcoxon", reference=reference, pts=True)


@pytest.mark.parametrize("rows", [1000, 50, 7])  # one chunk; uneven last chunk; many small chunks
def test_chunkings_and_blocks_of_genes(active, rows, monkeypatch):
    from autozyme.dask import rank_genes_groups as dask_path

    # Blocks of 9 genes: several blocks, the last one narrower.
    monkeypatch.setattr(dask_path, "genes_per_block", lambda *_: 9)
    run_dask(active, lambda: make(n_cells=300, n_genes=61, zero_cells=(5, 40)), rows, "grp",
             method="wilcoxon", pts=True)


@pytest.mark.parametrize(("tie_correct", "corr_method", "rankby_abs"), [
    (False, "benjamini-hochberg", True), (True, "bonferroni", False)])
def test_options(active, tie_correct, corr_method, rankby_abs):
    run_dask(active, lambda: make(seed=3), 64, "grp", method="wilcoxon", tie_correct=tie_correct,
             corr_method=corr_method, rankby_abs=rankby_abs, n_genes=13, pts=True)


def test_groups_reference_raw_layer_mask(active):
    run_dask(active, lambda: make(seed=4), 80, "grp", method="wilcoxon", groups=["g1", "g5", "g8"],
             key_added="sub", key="sub")
    run_dask(active, lambda: make(seed=4), 80, "grp", method="wilcoxon", groups=["g1", "g5"],
             reference="g8", pts=True)
    run_dask(active, lambda: make(seed=5, with_raw=True), 80, "grp", method="wilcoxon",
             where="raw", pts=True)
    run_dask(active, lambda: make(seed=6, layer=True), 80, "grp", method="wilcoxon",
             where="lay", layer="lay", use_raw=False)
    mask = np.arange(60) % 3 != 0
    run_dask(active, lambda: make(seed=7), 80, "grp", method="wilcoxon", mask_var=mask, pts=True)


def test_integer_counts_and_explicit_zeros(active):
    def data():
        ad = make(seed=8)
        x = ad.X.copy()
        x.data = np.round(np.expm1(x.data)).astype(np.float32)
        x.data[::5] = 0  # stored zeros: upstream's in-memory call eliminates them
        ad.X = x
        return ad

    # Counts: the non-negative-integer check (upstream's log warning) sees every block.
    run_dask(active, data, 100, "grp", method="wilcoxon", pts=True)


def test_cluster_of_two_worker_processes(active):
    """Two worker processes rank the matrix by blocks of genes (their memory is
    measured against the matrix's size by ``autozyme bench --dask``); every field
    equals upstream's in-memory result."""
    distributed = pytest.importorskip("distributed")
    from autozyme.dask import rank_genes_groups as dask_path

    ad = make(n_cells=3000, n_genes=500, seed=9)
    up = ad.copy()
    sc = active
    sc.tl.rank_genes_groups.__autozyme_upstream__(up, "grp", method="wilcoxon", pts=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert dask_path.n_workers() == 2
        ad.X = as_dask(ad.X, 700)
        # dask.distributed picks P2P rechunking for large matrices, which fails on
        # scipy sparse chunks: the blocks are regrouped by tasks whatever the config.
        with dask.config.set({"array.rechunk.method": "p2p"}):
            sc.tl.rank_genes_groups(ad, "grp", method="wilcoxon", pts=True)
        assert_same_result(up.uns["rank_genes_groups"], ad.uns["rank_genes_groups"])
        # The blocks were ranked in the workers (at least two blocks a worker),
        # each counted there.
        ranked = client.run(lambda: __import__("autozyme").fallback.counts()["served"])
        blocks = [c.get("rank_genes_groups (dask chunk)", 0) for c in ranked.values()]
        assert len(blocks) == 2 and sum(blocks) >= 4, ranked
