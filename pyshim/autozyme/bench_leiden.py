"""``autozyme bench --calls leiden``: sc.tl.leiden on a kNN graph, in fresh processes.

The graph: a symmetric 12-nearest-neighbour graph (Gaussian kernel weights, the
larger of the two directions) on overlapping Gaussian clusters in 30 dimensions,
like PCA coordinates of cells; cached next to the count matrices.

Rows: upstream ``flavor="igraph"``; exact mode (must give upstream's labels);
parallel mode with a daemon of 1 and of 2 threads (its own Leiden: modularity,
clusters and agreement with upstream are reported, not identity); optionally
upstream's default ``flavor="leidenalg"`` (slow); PIASO's Rust Leiden
(``piaso.tl.leiden(backend="rust")``, the ``piaso-tools`` package) at 1 and 2
threads when it is installed, with upstream igraph's ``n_iterations=2``. Each row
runs seeds 0, 1, 2 in one fresh process; times are the median over the seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def worker(mode: str, graph: Path, out: Path) -> dict:
    import anndata as ad
    import scipy.sparse as sp

    import scanpy as sc

    a = sp.load_npz(graph).tocsr()
    if mode.startswith("piaso"):
        return piaso_worker(mode, a, out)
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
        sc.tl.leiden(adata, flavor=flavor, resolution=RESOLUTION, random_state=seed)
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
        if mode.startswith("parallel-1"):
            from autozyme.client import get_client

            get_client().shutdown()
    return result


def piaso_worker(mode: str, a, out: Path) -> dict:
    """PIASO's Leiden on the same graph: the whole call, labels written to obs."""
    import anndata as ad
    import piaso

    threads = int(mode.split("-")[1])
    times, labels = [], []
    for seed in SEEDS:
        adata = ad.AnnData(np.zeros((a.shape[0], 1), dtype=np.float32))
        adata.obsp["connectivities"] = a.copy()
        t = time.perf_counter()
        piaso.tl.leiden(adata, resolution=RESOLUTION, random_state=seed, n_iterations=2,
                        backend="rust", n_threads=threads)
        times.append(time.perf_counter() - t)
        labels.append(adata.obs["leiden"].astype(int).to_numpy())
    np.save(out / f"leiden_{mode}.npy", np.stack(labels))
    return {"mode": mode, "times": times, "threads": threads}


def piaso_installed() -> bool:
    try:
        import piaso  # noqa: F401
    except ImportError:
        return False
    return True


def _run(mode: str, graph: Path, out: Path, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "autozyme.bench_leiden", mode, str(graph), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"leiden {mode} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cache: Path, out: Path, cells: int, with_leidenalg: bool = False) -> bool:
    """Prints the rows; True when exact mode matched upstream for every seed."""
    import scipy.sparse as sp
    from sklearn.metrics import adjusted_rand_score

    from scanpy._utils import get_igraph_from_adjacency

    graph = graph_path(cache, cells)
    a = sp.load_npz(graph).tocsr()
    g = get_igraph_from_adjacency(a, directed=False)

    def modularity(labels):
        return g.modularity(labels.astype(int).tolist(), weights="weight", resolution=RESOLUTION)

    one_thread = tempfile.mkdtemp(prefix="azm-bench-1t-")
    modes = [("upstream", None), ("exact", None),
             ("parallel-1", {"AUTOZYME_THREADS": "1", "AUTOZYME_RUNTIME_DIR": one_thread}),
             ("parallel-2", None)]
    if with_leidenalg:
        modes += [("leidenalg", None),
                  ("parallel-1-leidenalg", {"AUTOZYME_THREADS": "1", "AUTOZYME_RUNTIME_DIR": one_thread}),
                  ("parallel-leidenalg", None)]
    if piaso_installed():
        modes += [("piaso-1", None), ("piaso-2", None)]
    results = {m: _run(m, graph, out, env) for m, env in modes}
    up = np.load(out / "leiden_upstream.npy")
    up_q = np.mean([modularity(x) for x in up])
    up_ari = np.mean([adjusted_rand_score(up[i], up[j])
                      for i in range(len(SEEDS)) for j in range(i + 1, len(SEEDS))])
    base = float(np.median(results["upstream"]["times"]))
    print(f"leiden  ({cells} cells, {a.nnz / 1e6:.2f}M stored edges, 12 neighbours, resolution "
          f"{RESOLUTION}; seeds {', '.join(map(str, SEEDS))}; median time over the seeds)")
    print(f"  {'row':<22} {'threads':>7} {'time':>11} {'speedup':>8} {'modularity':>11} {'clusters':>9} "
          f"{'ARI to up':>10} {'identical':>10}")
    exact_ok = True
    for mode, _ in modes:
        r = results[mode]
        labels = np.load(out / f"leiden_{mode}.npy")
        t = float(np.median(r["times"]))
        q = np.mean([modularity(x) for x in labels])
        k = "/".join(str(x.max() + 1) for x in labels)
        ari = np.mean([adjusted_rand_score(x, u) for x, u in zip(labels, up)])
        same = sum(np.array_equal(x, u) for x, u in zip(labels, up))
        if mode == "exact":
            exact_ok = same == len(SEEDS) and r.get("served") == len(SEEDS)
        threads = r.get("threads", "-")
        print(f"  {mode:<22} {threads!s:>7} {t * 1000:8.1f} ms {base / t:7.1f}x {q:11.5f} {k:>9} "
              f"{ari:10.4f} {same:>7}/{len(SEEDS)}")
    print(f"  upstream (igraph) seed-to-seed ARI {up_ari:.4f}, mean modularity {up_q:.5f}")
    p1, p2 = (np.load(out / f"leiden_parallel-{t}.npy") for t in (1, 2))
    print(f"  parallel mode, 1 vs 2 threads: {'identical' if np.array_equal(p1, p2) else 'DIFFERENT'} labels\n",
          flush=True)
    (out / "bench_leiden.json").write_text(json.dumps(results, indent=1))
    return exact_ok and np.array_equal(p1, p2)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
