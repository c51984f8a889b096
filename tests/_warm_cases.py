"""The cases tests/test_warm.py compares, and (run as a script) upstream's results
for them in one fresh process: ``python tests/_warm_cases.py OUT.pkl``.

Each case: (name, cells, features, dtype, where the data goes, numba threads,
neighbors arguments, umap arguments or None). Sizes on both sides of scanpy's
switch from exact kNN (sklearn) to pynndescent (8192 cells
for the euclidean metric).
"""

from __future__ import annotations

import pickle
import sys

import numpy as np

CASES = [
    ("small-f32", 1000, 50, np.float32, "X_pca", 1, {}, {"maxiter": 30}),
    ("small-f64-rep-npcs", 1200, 40, np.float64, "X_emb", 1,
     {"use_rep": "X_emb", "n_pcs": 20, "n_neighbors": 10}, None),
    ("small-X-gauss", 400, 30, np.float64, "X", 1, {"method": "gauss", "key_added": "g"}, None),
    ("large-f32", 8500, 50, np.float32, "X_pca", 1, {}, {"maxiter": 20, "init_pos": "random"}),
    ("large-f32-2threads", 8500, 50, np.float32, "X_pca", 2, {"n_neighbors": 12}, {"maxiter": 20}),
    ("large-f32-npcs", 8500, 50, np.float32, "X_pca", 2, {"n_pcs": 30, "random_state": 3}, None),
]


def make_adata(cells, features, dtype, where, seed):
    import anndata as ad

    rng = np.random.default_rng(seed)
    # Disjoint clusters: the graph has several components, so umap's spectral
    # initialisation also places components by the data.
    centers = rng.normal(size=(8, features)) * 6
    x = (centers[rng.integers(0, 8, cells)] + rng.normal(size=(cells, features))).astype(dtype)
    if where == "X":
        return ad.AnnData(x)
    a = ad.AnnData(np.zeros((cells, 60), dtype=np.float32))
    a.obsm[where] = x
    return a


def run_case(sc, case, seed):
    """Run the case with whatever ``sc`` is (upstream, or autozyme active)."""
    import numba

    name, cells, features, dtype, where, threads, nkw, ukw = case
    a = make_adata(cells, features, dtype, where, seed)
    numba.set_num_threads(threads)
    sc.settings.n_jobs = threads
    sc.pp.neighbors(a, **nkw)
    if ukw is not None:
        sc.tl.umap(a, **ukw)
    return {"obsp": {k: a.obsp[k] for k in a.obsp}, "obsm": {k: a.obsm[k] for k in a.obsm},
            "uns": dict(a.uns)}


if __name__ == "__main__":
    import warnings

    import scanpy as sc

    warnings.simplefilter("ignore")
    out = {case[0]: run_case(sc, case, i) for i, case in enumerate(CASES)}
    with open(sys.argv[1], "wb") as f:
        pickle.dump(out, f, protocol=5)
