"""``autozyme bench --calls leiden`` (autozyme.bench.leiden): sc.tl.leiden on kNN graphs, in fresh processes.

Two graphs, cached next to the count matrices:

- the easy one: a symmetric 12-nearest-neighbour graph (Gaussian kernel weights,
  the larger of the two directions) on overlapping Gaussian clusters in 30
  dimensions, like PCA coordinates of cells; well separated (modularity about
  0.96), run with scanpy's default ``n_iterations=-1``;
- the hard one (``weak_counts``): scanpy's own normalize_total, log1p, PCA and
  neighbors of 30,000 simulated cells in 9 clusters with few, weak markers and 7
  batches (modularity about 0.64, igraph's seed-to-seed ARI about 0.63), run with
  ``n_iterations=2`` as scanpy recommends for ``flavor="igraph"``. On such graphs a
  Leiden that stops early loses modularity (docs/leiden.md).

Rows: upstream ``flavor="igraph"``; exact mode (must give upstream's labels);
parallel mode with a daemon of 1 and of 2 threads (its own Leiden: modularity,
clusters and agreement with upstream are reported, not identity); optionally
upstream's default ``flavor="leidenalg"`` (slow); PIASO's Rust Leiden
(``piaso.tl.leiden(backend="rust")``, the ``piaso-tools`` package) at 1 and 2
threads when it is installed, with ``n_iterations=-1`` as in the scanpy calls here (until stable). Each row
runs seeds 0, 1, 2 in one fresh process; times are the median over the seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import daemon_cli, fresh_json

MODULE = "autozyme.bench.leiden"  # the worker: python -m autozyme.bench.leiden MODE GRAPH OUT

SEEDS = (0, 1, 2)
RESOLUTION = 0.8


def graph_path(cache: Path, cells: int) -> Path:
    path = cache / f"leiden_knn_{cells}_12.npz"
    if path.exists():
        return path
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 30)) * 1.2
    x = centers[rng.integers(0, 40, cells)] + rng.normal(size=(cells, 30))
    dist, idx = NearestNeighbors(n_neighbors=12).fit(x).kneighbors(x)
    dist, idx = dist[:, 1:], idx[:, 1:]
    sigma = np.median(dist)
    w = np.exp(-((dist / sigma) ** 2))
    a = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(cells), idx.shape[1]), idx.ravel())),
                      shape=(cells, cells))
    a = a.maximum(a.T).tocsr().astype(np.float32)
    a.sort_indices()
    cache.mkdir(parents=True, exist_ok=True)
    sp.save_npz(path, a)
    return path


def weak_counts(cells: int, *, seed: int = 0, clusters: int = 9, batches: int = 7, genes: int = 2000,
                markers: int = 30, fold: float = 2.5, batch_sd: float = 0.12):
    """Counts (CSR float32) of ``cells`` cells in ``clusters`` clusters that differ
    only in ``markers`` genes each, up by at most ``fold`` (log-uniform between
    its square root and itself), among moderately expressed genes, with a
    log-normal batch effect per gene and batch (sd ``batch_sd``), library sizes
    varying by 35%, and negative-binomial noise (dispersion 0.2). Near fold 2.5
    the clusters are barely resolved in PCA space (fold 3: clear; 2: none).
    Returns (counts, cluster, batch)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(-1.0, 1.3, genes))
    cluster = rng.integers(0, clusters, cells)
    batch = rng.integers(0, batches, cells)
    log_fold = np.zeros((clusters, genes))
    expressed = np.argsort(base)[genes // 2:]
    for c in range(clusters):
        log_fold[c, rng.choice(expressed, markers, replace=False)] = np.log(fold) * rng.uniform(0.5, 1.0, markers)
    batch_effect = rng.normal(0, batch_sd, (batches, genes))
    library = np.exp(rng.normal(0, 0.35, cells))
    mean = base[None, :] * np.exp(log_fold[cluster] + batch_effect[batch]) * library[:, None]
    counts = rng.poisson(rng.gamma(1 / 0.2, mean * 0.2)).astype(np.float32)
    return sp.csr_matrix(counts), cluster, batch


def weak_graph(cells: int, *, seed: int = 0, **kwargs):
    """Upstream scanpy's connectivities of ``weak_counts`` (normalize_total, log1p,
    50 PCs, 15 neighbours; exact kNN under 4096 cells, pynndescent above)."""
    import anndata as ad

    import scanpy as sc

    counts, _, _ = weak_counts(cells, seed=seed, **kwargs)
    adata = ad.AnnData(counts)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=seed)
    sc.pp.neighbors(adata, random_state=seed)
    a = adata.obsp["connectivities"].tocsr().astype(np.float32)
    a.sort_indices()
    return a


def hard_graph_path(cache: Path, cells: int, seed: int = 0) -> Path:
    path = cache / f"leiden_weak_{cells}_{seed}.npz"
    if not path.exists():
        import scipy.sparse as sp

        cache.mkdir(parents=True, exist_ok=True)
        sp.save_npz(path, weak_graph(cells, seed=seed))
    return path


def worker(mode: str, graph: Path, out: Path, n_iterations: int = -1) -> dict:
    import anndata as ad
    import scipy.sparse as sp

    import scanpy as sc

    a = sp.load_npz(graph).tocsr()
    if mode.startswith("piaso"):
        return piaso_worker(mode, a, out, n_iterations)
    flavor = "leidenalg" if mode.endswith("leidenalg") else "igraph"
    if mode != "upstream" and mode != "leidenalg":
        import autozyme

        os.environ.setdefault("AUTOZYME_STRICT", "1")
        autozyme.activate("scanpy", prewarm=False)
        if mode.startswith("parallel"):
            autozyme.configure(leiden="parallel")
    times, labels = [], []
    for seed in SEEDS:
        adata = ad.AnnData(np.zeros((a.shape[0], 1), dtype=np.float32))
        adata.obsp["connectivities"] = a.copy()
        adata.uns["neighbors"] = {"connectivities_key": "connectivities", "params": {}}
        t = time.perf_counter()
        sc.tl.leiden(adata, flavor=flavor, resolution=RESOLUTION, random_state=seed, n_iterations=n_iterations)
        times.append(time.perf_counter() - t)
        labels.append(adata.obs["leiden"].astype(int).to_numpy())
    np.save(out / f"leiden_{mode}.npy", np.stack(labels))
    result = {"mode": mode, "times": times}
    if mode not in ("upstream", "leidenalg"):
        import autozyme
        from autozyme import fallback

        result["served"] = fallback.counts()["served"].get("leiden", 0)
        if mode.startswith("parallel"):  # exact mode runs in the shim, not the daemon
            result["threads"] = autozyme.status()["daemon"]["threads"]
    return result


def piaso_worker(mode: str, a, out: Path, n_iterations: int = -1) -> dict:
    """PIASO's Leiden on the same graph: the whole call, labels written to obs."""
    import anndata as ad
    import piaso

    threads = int(mode.split("-")[1])
    times, labels = [], []
    for seed in SEEDS:
        adata = ad.AnnData(np.zeros((a.shape[0], 1), dtype=np.float32))
        adata.obsp["connectivities"] = a.copy()
        t = time.perf_counter()
        piaso.tl.leiden(adata, resolution=RESOLUTION, random_state=seed, n_iterations=n_iterations,
                        backend="rust", n_threads=threads)
        times.append(time.perf_counter() - t)
        labels.append(adata.obs["leiden"].astype(int).to_numpy())
    np.save(out / f"leiden_{mode}.npy", np.stack(labels))
    return {"mode": mode, "times": times, "threads": threads}


def piaso_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("piaso") is not None


def _run(mode: str, graph: Path, out: Path, env: dict | None = None, n_iterations: int = -1) -> dict:
    return fresh_json(MODULE, mode, str(graph), str(out), str(n_iterations), what=f"leiden {mode} worker", env=env)


def run_mode(mode: str, graph: Path, out: Path, env: dict | None = None, progress=None,
             n_iterations: int = -1) -> dict:
    """One row's fresh process (seeds 0, 1, 2); labels left in ``out/leiden_<mode>.npy``.
    Modes: upstream, exact, parallel-<t>, leidenalg, parallel-<t>-leidenalg, piaso-<t>."""
    if progress:
        progress(f"{mode} ({len(SEEDS)} seeds)")
    return _run(mode, graph, out, env, n_iterations)


def _impl(mode: str) -> str:
    return "leidenalg" if mode == "leidenalg" else mode.split("-")[0]


def evaluate(graph: Path, out: Path, results: dict) -> list[dict]:
    """Rows (one per mode, in ``results``' order) with time, modularity, clusters
    and agreement with upstream igraph (whose labels must be in ``out``).
    Equivalence: exact mode must give upstream's labels for every seed; parallel
    mode (its own Leiden) must give the same labels at every thread count; the
    other rows are references, not claims."""
    import scipy.sparse as sp
    from sklearn.metrics import adjusted_rand_score

    from scanpy._utils import get_igraph_from_adjacency

    a = sp.load_npz(graph).tocsr()
    g = get_igraph_from_adjacency(a, directed=False)

    def modularity(labels):
        return g.modularity(labels.astype(int).tolist(), weights="weight", resolution=RESOLUTION)

    up = np.load(out / "leiden_upstream.npy")
    base = float(np.median(results["upstream"]["times"]))
    parallel = {m: r for m, r in results.items() if _impl(m) == "parallel"}
    rows = []
    for mode, r in results.items():
        labels = np.load(out / f"leiden_{mode}.npy")
        t = float(np.median(r["times"]))
        impl = _impl(mode)
        row = dict(mode=mode, impl=impl, flavor="leidenalg" if mode.endswith("leidenalg") else "igraph",
                   threads=r.get("threads"), time=t, times=r["times"], upstream_time=base, speedup=base / t,
                   modularity=float(np.mean([modularity(x) for x in labels])),
                   per_seed=[float(modularity(x)) for x in labels],
                   clusters="/".join(str(x.max() + 1) for x in labels),
                   ari=float(np.mean([adjusted_rand_score(x, u) for x, u in zip(labels, up)])),
                   # Every pair of a seed here and a seed of upstream's: an own Leiden's
                   # seed i has nothing to do with upstream's seed i, and upstream's own
                   # seed-to-seed ARI is likewise over pairs of different runs.
                   ari_all_pairs=float(np.mean([adjusted_rand_score(x, u) for x in labels for u in up])),
                   identical=int(sum(np.array_equal(x, u) for x, u in zip(labels, up))),
                   seeds=len(SEEDS), served=r.get("served"), nodes=a.shape[0], edges=int(a.nnz))
        row["equivalent"], row["equivalence"] = None, f"reference (ARI {row['ari']:.4f} to upstream)"
        if mode == "upstream":
            row["equivalence"] = "reference"
        elif impl == "exact":
            row["equivalent"] = row["identical"] == len(SEEDS) and r.get("served") == len(SEEDS)
            row["equivalence"] = f"identical labels {row['identical']}/{len(SEEDS)}"
        elif impl == "parallel":
            # Its own Leiden: the claim is the same labels at every thread count.
            same_flavor = sorted((m for m in parallel if m.endswith("leidenalg") == mode.endswith("leidenalg")),
                                 key=lambda m: parallel[m].get("threads") or 0)
            first = same_flavor[0]
            row["equivalence"] = f"own Leiden, ARI {row['ari']:.4f} to upstream"
            if first != mode:
                same = np.array_equal(labels, np.load(out / f"leiden_{first}.npy"))
                row["equivalent"] = same and r.get("served") == len(SEEDS)
                row["equivalence"] += (f"; same labels as at {parallel[first].get('threads')} thread(s)" if same
                                       else f"; labels differ from {parallel[first].get('threads')} thread(s)")
            elif r.get("served") != len(SEEDS):
                row["equivalent"] = False
        rows.append(row)
    return rows


HARD_CELLS = 30_000


def run(cache: Path, out: Path, cells: int, with_leidenalg: bool = False) -> bool:
    """Rows for the easy graph (``cells`` nodes) and the hard one (HARD_CELLS
    cells); True when exact mode matched upstream for every seed and parallel
    mode gave the same labels at 1 thread and at the daemon's count, on both."""
    ok = run_graph(graph_path(cache, cells), out / "leiden-easy", with_leidenalg,
                   f"easy kNN graph, {cells} nodes, 12 neighbours", -1)
    hard = hard_graph_path(cache, HARD_CELLS)
    return run_graph(hard, out / "leiden-hard", with_leidenalg,
                     f"hard graph: {HARD_CELLS} cells, 9 weakly separated clusters, 7 batches, "
                     "scanpy's PCA and 15 neighbours", 2) and ok


def run_graph(graph: Path, out: Path, with_leidenalg: bool, what: str, n_iterations: int) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    one_thread = {"AUTOZYME_THREADS": "1", "AUTOZYME_RUNTIME_DIR": tempfile.mkdtemp(prefix="azm-bench-1t-")}
    modes = [("upstream", None), ("exact", None), ("parallel-1", one_thread), ("parallel-2", None)]
    if with_leidenalg:
        modes += [("leidenalg", None), ("parallel-1-leidenalg", one_thread), ("parallel-leidenalg", None)]
    if piaso_installed():
        modes += [("piaso-1", None), ("piaso-2", None)]
    try:
        results = {m: run_mode(m, graph, out, env, n_iterations=n_iterations) for m, env in modes}
    finally:
        daemon_cli("stop", one_thread)
        shutil.rmtree(one_thread["AUTOZYME_RUNTIME_DIR"], ignore_errors=True)
    rows = evaluate(graph, out, results)
    up = np.load(out / "leiden_upstream.npy")
    up_ari = np.mean([adjusted_rand(up[i], up[j]) for i in range(len(SEEDS)) for j in range(i + 1, len(SEEDS))])
    up_q = rows[0]["modularity"]
    print(f"leiden  ({what}; {rows[0]['edges'] / 1e6:.2f}M stored edges; resolution {RESOLUTION}, "
          f"n_iterations {n_iterations}; seeds {', '.join(map(str, SEEDS))}; median time over the seeds)")
    print(f"  {'row':<22} {'threads':>7} {'time':>11} {'speedup':>8} {'modularity':>11} {'clusters':>9} "
          f"{'ARI to up':>10} {'identical':>10}")
    for r in rows:
        threads = r["threads"] if r["threads"] is not None else "-"
        print(f"  {r['mode']:<22} {threads!s:>7} {r['time'] * 1000:8.1f} ms {r['speedup']:7.1f}x "
              f"{r['modularity']:11.5f} {r['clusters']:>9} {r['ari']:10.4f} {r['identical']:>7}/{len(SEEDS)}")
    print(f"  upstream (igraph) seed-to-seed ARI {up_ari:.4f}, mean modularity {up_q:.5f}")
    for r in rows:
        if r["impl"] == "parallel" and r["flavor"] == "igraph":
            print(f"  {r['mode']}: modularity {r['modularity'] - up_q:+.5f} vs upstream's mean, "
                  f"ARI to upstream over all seed pairs {r['ari_all_pairs']:.4f} (seed i to seed i "
                  f"{r['ari']:.4f}) vs upstream's seed-to-seed {up_ari:.4f}, per seed "
                  + " ".join(f"{q:.5f}" for q in r["per_seed"]))
    p1, p2 = (np.load(out / f"leiden_parallel-{t}.npy") for t in (1, 2))
    print(f"  parallel mode, 1 vs 2 threads: {'identical' if np.array_equal(p1, p2) else 'DIFFERENT'} labels\n",
          flush=True)
    (out / "bench_leiden.json").write_text(json.dumps(results, indent=1))
    exact_ok = next(r for r in rows if r["mode"] == "exact")["equivalent"]
    return exact_ok and np.array_equal(p1, p2)


def adjusted_rand(a, b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:5]))))
