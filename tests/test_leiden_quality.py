"""sc.tl.leiden parallel mode on a graph with weak structure, as real data can
give: counts of 9 clusters with few, weak markers and 7 batches
(autozyme.bench.leiden.weak_counts), upstream's own normalize_total, log1p, PCA
and neighbors (exact kNN: under 4096 cells). Parallel mode's mean modularity over
seeds 0-7 is at least upstream igraph's mean (within 1e-4), and its agreement
with upstream at least upstream's own seed-to-seed agreement (docs/leiden.md)."""

from __future__ import annotations

import numpy as np
import pytest
from anndata import AnnData


SEEDS = 8


@pytest.fixture(scope="module")
def weak_graph():
    from autozyme.bench.leiden import weak_graph

    # fold 2.9 at 3,000 cells: upstream's seeds agree with ARI about 0.85
    # (resolution 0.8) and 0.3 (resolution 0.5)
    return weak_graph(3000, seed=3, fold=2.9)


@pytest.fixture
def parallel_mode(active):
    import autozyme
    from autozyme import settings

    autozyme.configure(leiden="parallel")
    yield active
    settings.reset()


def _adata(a):
    ad = AnnData(np.zeros((a.shape[0], 1), dtype=np.float32))
    ad.obsp["connectivities"] = a.copy()
    ad.uns["neighbors"] = {"connectivities_key": "connectivities", "params": {}}
    return ad


@pytest.mark.parametrize("resolution", [0.8, 0.5])
def test_weak_structure_modularity_at_least_upstreams(parallel_mode, weak_graph, resolution):
    from sklearn.metrics import adjusted_rand_score

    from autozyme import fallback
    from scanpy._utils import get_igraph_from_adjacency

    sc = parallel_mode
    a = weak_graph
    g = get_igraph_from_adjacency(a, directed=False)
    up, par = [], []
    served = fallback.counts()["served"].get("leiden", 0)
    # Eight seeds: with three, the mean agreements moved by more than the 0.02
    # allowed between machines whose BLAS gives a slightly different graph (scanpy
    # 1.12.4 on a Zen 5 VM: 0.827 against upstream's own 0.849; with eight, 0.844
    # against 0.854).
    for seed in range(SEEDS):
        u, p = _adata(a), _adata(a)
        # scanpy's recommended igraph call: n_iterations=2
        sc.tl.leiden.__autozyme_upstream__(u, flavor="igraph", resolution=resolution, random_state=seed,
                                           n_iterations=2)
        sc.tl.leiden(p, flavor="igraph", resolution=resolution, random_state=seed, n_iterations=2)
        up.append(u.obs["leiden"].astype(int).to_numpy())
        par.append(p.obs["leiden"].astype(int).to_numpy())
    assert fallback.counts()["served"].get("leiden", 0) == served + SEEDS

    def q(labels):
        return g.modularity(labels.tolist(), weights="weight", resolution=resolution)

    q_up = np.mean([q(x) for x in up])
    q_par = np.mean([q(x) for x in par])
    assert q_par >= q_up - 1e-4, (q_par, q_up)
    ari_up = np.mean([adjusted_rand_score(up[i], up[j]) for i in range(SEEDS)
                      for j in range(i + 1, SEEDS)])
    ari_par = np.mean([adjusted_rand_score(x, u) for x in par for u in up])
    assert ari_par >= ari_up - 0.02, (ari_par, ari_up)
