"""``autozyme bench --dask`` (autozyme.bench.on_dask): upstream on Dask against autozyme
on Dask, per call, on a store read lazily, each side in a fresh process with its own
``LocalCluster``.

The store (zarr, in the bench cache) holds the counts in row chunks spanning all
genes, and their log-normalised values for rank_genes_groups. Each call is timed
from the call until its result is computed: a lazy result (normalize_total, log1p,
scale) is computed into the workers' memory (``persist``), never gathered in one
process; digests of its chunks' bytes, taken afterwards, show the two sides'
results are identical. hvg returns in-memory columns, compared as they are. Each call runs
three times: "first" (new data for this cluster and daemon) and "rerun" (the
faster of the other two).

Wilcoxon has no dask path upstream, so autozyme on Dask is compared with upstream
in memory (the whole matrix read into one process), and checked field by field
against it. Each worker's peak resident memory is reported beside the matrix's
size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .measure import batch_labels, dataset_path, fresh_json, peak_bytes, reset_peak, stack_versions

MODULE = "autozyme.bench.on_dask"  # each side: python -m autozyme.bench.on_dask --side ... | --in-memory STORE

DASK_CALLS = ("normalize_total", "log1p", "scale", "highly_variable_genes", "rank_genes_groups")
RERUNS = 2  # after the first call on new data; the faster of them is reported
GROUP_SIZES = [0.3, 0.2, 0.14, 0.1, 0.08, 0.07, 0.05, 0.04, 0.02]


# --- the store ---------------------------------------------------------------------
def store_path(cache: Path, cells: int, genes: int, density: float, chunk_rows: int) -> Path:
    """A zarr store of the bench's counts (``X``) and log-normalised values
    (``layers/lognorm``), with ``obs`` batches and groups; made once."""
    path = cache / f"dask_{cells}x{genes}_{density:g}_rows{chunk_rows}.zarr"
    if path.exists():
        return path
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    counts = np.load(dataset_path(cache, cells, genes, density))
    x = sp.csr_matrix((counts["data"], counts["indices"], counts["indptr"]), shape=tuple(counts["shape"]))
    sums = np.asarray(x.sum(axis=1)).ravel()
    sums[sums == 0] = 1
    lognorm = x.copy()
    lognorm.data = np.log1p(x.data / np.repeat(sums, np.diff(x.indptr)).astype(np.float32) * 1e4).astype(np.float32)
    rng = np.random.default_rng(1)
    groups = pd.Categorical([f"t{k}" for k in rng.choice(len(GROUP_SIZES), cells, p=GROUP_SIZES)])
    obs = pd.DataFrame({"batch": batch_labels(cells), "cell_type": groups},
                       index=pd.Index([f"c{i}" for i in range(cells)]))
    a = ad.AnnData(X=x, obs=obs, layers={"lognorm": lognorm})
    tmp = path.with_suffix(".tmp.zarr")
    a.write_zarr(tmp, chunks=(chunk_rows, genes))
    tmp.rename(path)
    return path


def open_lazy(path: Path, chunk_rows: int, layer: str | None = None):
    """An AnnData whose X is read lazily from the store: a dask array of CSR row chunks."""
    import anndata as ad
    import zarr
    from anndata.experimental import read_elem_lazy

    g = zarr.open(str(path), mode="r")
    elem = g["X"] if layer is None else g["layers"][layer]
    x = read_elem_lazy(elem, chunks=(chunk_rows, -1))
    return ad.AnnData(X=x, obs=ad.io.read_elem(g["obs"]), var=ad.io.read_elem(g["var"]))


def open_in_memory(path: Path, layer: str | None = None):
    """The whole store in this process, ``layer`` (if given) as X."""
    import anndata as ad

    a = ad.read_zarr(path)
    x = a.X if layer is None else a.layers[layer]
    return ad.AnnData(X=x, obs=a.obs, var=a.var)


# --- one side, in a fresh process ----------------------------------------------------
def chunk_digest(block) -> str:
    """The bytes of one result chunk (values and, for CSR, its structure)."""
    import scipy.sparse as sp

    h = hashlib.blake2b(digest_size=16)
    if sp.issparse(block):
        block = block.tocsr() if block.format != "csr" else block
        for a in (block.data, block.indices, block.indptr):
            h.update(str(a.dtype).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(type(block).__name__.encode())
    else:
        a = np.ascontiguousarray(np.asarray(block))
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def digest_of(x) -> list[str]:
    import dask

    return list(dask.compute(*[dask.delayed(chunk_digest)(b) for b in x.to_delayed().ravel()]))


def _worker_peaks(client) -> list[int]:
    return sorted(client.run(lambda: peak_bytes(os.getpid())).values())


def _reset_worker_peaks(client) -> None:
    client.run(lambda: reset_peak(os.getpid()))


def _open(path: Path, chunk_rows: int, persisted: bool, layer: str | None = None):
    """The store's X, lazily read; ``persisted``: read into the workers' memory
    first (not timed), so that the call's own chunk work is what is measured."""
    a = open_lazy(path, chunk_rows, layer=layer)
    if persisted:
        from distributed import wait

        a.X = a.X.persist()
        wait(a.X)
    return a


def _timed_call(call: str, path: Path, chunk_rows: int, persisted: bool) -> tuple[float, dict]:
    """One call on freshly opened data, until its result is computed."""
    import scanpy as sc

    if call == "rank_genes_groups":
        a = _open(path, chunk_rows, persisted, layer="lognorm")
        t = time.perf_counter()
        sc.tl.rank_genes_groups(a, "cell_type", method="wilcoxon", pts=True)
        dt = time.perf_counter() - t
        return dt, {"result": _rgg_digest(a.uns["rank_genes_groups"])}
    a = _open(path, chunk_rows, persisted)
    t = time.perf_counter()
    if call == "normalize_total":
        sc.pp.normalize_total(a)
    elif call == "log1p":
        sc.pp.log1p(a)
    elif call == "scale":
        sc.pp.scale(a, zero_center=False)
    elif call == "highly_variable_genes":
        sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=2000, batch_key="batch")
        dt = time.perf_counter() - t
        cols = ["highly_variable", "highly_variable_rank", "means", "variances", "variances_norm"]
        return dt, {"result": hashlib.blake2b(
            a.var[cols].to_csv().encode(), digest_size=16).hexdigest()}
    # The lazy result is computed into the workers' memory (timed); its chunks'
    # digests are taken afterwards (not timed: hashing would dilute the calls' time).
    from distributed import wait

    result = a.X.persist()
    wait(result)
    dt = time.perf_counter() - t
    digests = digest_of(result)
    return dt, {"result": hashlib.blake2b("".join(digests).encode(), digest_size=16).hexdigest()}


def _rgg_digest(r: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in ("names", "scores", "pvals", "pvals_adj", "logfoldchanges"):
        # Records of names are objects: their text, not their addresses; float
        # reprs round-trip, so equal text is equal bits.
        h.update(repr(r[k].tolist()).encode())
    for k in ("pts", "pts_rest"):
        if k in r:
            h.update(np.ascontiguousarray(r[k].to_numpy()).tobytes())
    return h.hexdigest()


def side(mode: str, path: Path, calls: list[str], workers: int, memory: str, chunk_rows: int,
         persisted: bool) -> dict:
    """Run in a fresh process: a LocalCluster, then each call three times on lazy data."""
    import warnings

    from distributed import Client, LocalCluster

    warnings.simplefilter("ignore")
    out = {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      memory_limit=memory, dashboard_address=None) as cluster, Client(cluster) as client:
        if mode == "autozyme":
            import autozyme

            autozyme.activate("scanpy")
            _activate_workers(client)
        # Both sides' workers have scanpy imported before anything is timed (the
        # autozyme plugin imports it when it activates a worker).
        client.run(lambda: __import__("scanpy"))
        limit = next(iter(client.scheduler_info(n_workers=-1)["workers"].values()))["memory_limit"]
        for call in calls:
            if call == "rank_genes_groups" and mode == "upstream":
                continue  # no dask path upstream: compared with upstream in memory instead
            runs = []
            for _ in range(1 + RERUNS):
                _reset_worker_peaks(client)
                dt, res = _timed_call(call, path, chunk_rows, persisted)
                runs.append({"seconds": dt, "worker_peak_bytes": _worker_peaks(client), **res})
            rerun = min(runs[1:], key=lambda r: r["seconds"])
            out[call] = [{"run": "first", **runs[0]}, {"run": "rerun", **rerun}]
        if mode == "autozyme":
            out["_served"] = {k: v for k, v in autozyme.status().get("served", {}).items()}
            out["_fallbacks"] = autozyme.status().get("fallbacks", {})
        out["_worker_memory_limit"] = limit
    return out


def _activate_workers(client) -> None:
    """autozyme on every worker: the cluster module's registration when present."""
    try:
        from ..dask import cluster as dask_cluster
    except ImportError:
        dask_cluster = None
    if dask_cluster is not None and hasattr(dask_cluster, "register"):
        dask_cluster.register(client)
        return
    client.run(lambda: __import__("autozyme").activate("scanpy"))


def upstream_in_memory(path: Path) -> dict:
    """Upstream's wilcoxon on the whole matrix in this process (it has no dask path)."""
    import scanpy as sc

    a = open_in_memory(path, layer="lognorm")
    t = time.perf_counter()
    sc.tl.rank_genes_groups(a, "cell_type", method="wilcoxon", pts=True)
    dt = time.perf_counter() - t
    return {"seconds": dt, "peak_bytes": peak_bytes(os.getpid()),
            "result": _rgg_digest(a.uns["rank_genes_groups"])}


def _in_fresh_process(*argv: str, env: dict | None = None) -> dict:
    return fresh_json(MODULE, *argv, what=" ".join(argv[:2]), env=env)


# --- the command -----------------------------------------------------------------------
def run(args) -> int:
    cache = Path(args.cache).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = args.dask_chunk_rows
    persisted = args.dask_input == "persisted"
    path = store_path(cache, args.cells, args.genes, args.density, rows)
    calls = [c for c in (args.calls or ",".join(DASK_CALLS)).split(",") if c in DASK_CALLS]
    matrix_bytes = _store_matrix_bytes(path)
    print(f"\nautozyme bench --dask: {args.cells} cells x {args.genes} genes, density {args.density:g}, "
          f"zarr store read lazily in row chunks of {rows} cells x all genes"
          f"{' and persisted in the workers before each timed call' if persisted else ''}; LocalCluster of "
          f"{args.workers} worker processes x 1 thread, memory limit {args.worker_memory} each; "
          f"counts matrix {matrix_bytes / 2**20:.0f} MiB as CSR; {os.cpu_count()} cores; "
          f"{stack_versions()}\n", flush=True)
    common = (str(path), ",".join(calls), str(args.workers), args.worker_memory, str(rows), args.dask_input)
    res = {m: _in_fresh_process("--side", m, *common) for m in ("upstream", "autozyme")
           if any(c != "rank_genes_groups" for c in calls) or m == "autozyme"}
    ok = True
    print(f"{'call':<24}{'run':<7}{'upstream on dask':>18}{'autozyme on dask':>18}{'speedup':>9}"
          f"{'worker peak (up / az)':>26}  identical")
    for call in calls:
        if call == "rank_genes_groups":
            continue
        for u, z in zip(res["upstream"][call], res["autozyme"][call]):
            same = u["result"] == z["result"]
            ok &= same
            print(f"{call:<24}{u['run']:<7}{u['seconds']:>17.2f}s{z['seconds']:>17.2f}s"
                  f"{u['seconds'] / z['seconds']:>8.1f}x{_mib(max(u['worker_peak_bytes'])):>12} / "
                  f"{_mib(max(z['worker_peak_bytes'])):<12} {'yes' if same else 'NO'}")
    if "rank_genes_groups" in calls:
        mem = _in_fresh_process("--in-memory", str(path))
        print(f"\nrank_genes_groups (wilcoxon, 9 groups, pts): upstream in memory {mem['seconds']:.2f}s "
              f"(peak {_mib(mem['peak_bytes'])}); autozyme on dask:")
        for z in res["autozyme"]["rank_genes_groups"]:
            same = z["result"] == mem["result"]
            ok &= same
            print(f"  {z['run']:<6} {z['seconds']:.2f}s, {mem['seconds'] / z['seconds']:.1f}x faster, "
                  f"worker peaks {', '.join(_mib(b) for b in z['worker_peak_bytes'])} (matrix "
                  f"{_mib(matrix_bytes)}, limit {_mib(res['autozyme']['_worker_memory_limit'])}); "
                  f"identical to upstream in memory: {'yes' if same else 'NO'}")
        res["upstream_in_memory"] = mem
    served = res["autozyme"].get("_served", {})
    print(f"\nautozyme served on the client: {served}; fallbacks: {res['autozyme'].get('_fallbacks', {})}")
    (out / "bench_dask.json").write_text(json.dumps(res, indent=1))
    if not ok:
        print("NOT IDENTICAL: see above")
    return 0 if ok else 1


def _store_matrix_bytes(path: Path) -> int:
    """The counts' CSR arrays as they are in memory (data, indices, indptr)."""
    import zarr

    g = zarr.open(str(path), mode="r")["X"]
    return sum(int(np.prod(g[k].shape)) * g[k].dtype.itemsize for k in ("data", "indices", "indptr"))


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


if __name__ == "__main__":
    if sys.argv[1] == "--side":
        mode, path, calls, workers, memory, rows, dask_input = sys.argv[2:9]
        print(json.dumps(side(mode, Path(path), calls.split(","), int(workers), memory, int(rows),
                              dask_input == "persisted")))
    elif sys.argv[1] == "--in-memory":
        print(json.dumps(upstream_in_memory(Path(sys.argv[2]))))
    else:
        sys.exit("usage: python -m autozyme.bench.on_dask --side MODE STORE CALLS WORKERS MEMORY ROWS INPUT | --in-memory STORE")
