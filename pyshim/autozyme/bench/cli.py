"""``autozyme bench``: the command line (its options) and what each form runs.

``autozyme bench`` prints upstream and autozyme side by side per call
(calls.py, rank.py, leiden.py, neighbors.py); ``--pipeline`` the tutorial
notebook step by step (pipeline.py); ``--report DIR`` writes the report of every
call on dataset tiers and thread counts (report.py); ``--dask`` compares both
on Dask (on_dask.py). The package's modules import one way: this one ->
report.py (-> charts.py) -> the per-call runners (calls.py, rank.py,
leiden.py, neighbors.py, on_dask.py, pipeline.py) -> measure.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import leiden, neighbors, on_dask, pipeline, rank, report
from .calls import CALLS, measure_call, print_call, run_workers
from .measure import copy_bandwidth, dataset_path, stack_versions, touch_memory


def run(args) -> int:
    if args.report:
        return report.run(args)
    if args.dask:
        return on_dask.run(args)
    if args.pipeline:
        return pipeline.run(args)
    from ..client import get_client

    args.repeat = args.repeat or 3
    cache = Path(args.cache).expanduser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_path(cache, args.cells, args.genes, args.density)
    calls = [c for c in (args.calls or ",".join(CALLS)).split(",") if c]
    leiden_ok = True
    if "leiden" in calls:  # a graph, not a count matrix: its own rows (leiden.py)
        calls.remove("leiden")
        leiden_ok = leiden.run(cache, out, args.leiden_cells, args.leidenalg)
    if "neighbors" in calls:  # a PCA, not a count matrix: its own rows (neighbors.py)
        calls.remove("neighbors")
        leiden_ok = neighbors.run(cache, out, args.neighbors_cells) and leiden_ok
    if not calls:
        return 0 if leiden_ok else 1
    hello = get_client().connection().hello  # a running daemon, as after login
    touch_memory(8 * data.stat().st_size)
    bw = copy_bandwidth()
    print(f"\nautozyme bench: {args.cells} cells x {args.genes} genes, density {args.density:g}; "
          f"daemon pid {hello.pid} with {hello.threads} threads; {os.cpu_count()} cores; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (1 thread); phases {args.pause:g} s apart; "
          f"median of {args.repeat} fresh processes per side; {stack_versions()}\n", flush=True)
    rows = []
    if "rank_genes_groups" in calls:
        calls.remove("rank_genes_groups")
        if not rank.run_call(args, data, out, hello.threads):
            rows.append(dict(call="rank_genes_groups", upstream={}, autozyme={}, max_ulp=None,
                             served=0, equivalent=False))
            # (rank_genes_groups prints its own rows and is listed here only if it failed)
    # One throwaway upstream run, so numba's on-disk cache exists as it does for
    # anyone who has called these functions before.
    if calls:
        run_workers("upstream", calls[0], data, out, 0, 1)
    for call in calls:
        # scale gets the genes it usually gets (--scale-genes): its result is dense,
        # and on all genes of a large matrix upstream's would not fit in memory.
        call_data = data
        if call == "scale" and args.scale_genes < args.genes:
            call_data = dataset_path(cache, args.cells, args.scale_genes, args.density)
        row = measure_call(call, call_data, out, args.repeat, args.pause)
        rows.append(row)
        print_call(row, bw)
    (out / "bench.json").write_text(json.dumps(
        [{k: r[k] for k in ("call", "upstream", "autozyme", "max_ulp")} for r in rows], indent=1))
    bad = [r["call"] for r in rows if not r["equivalent"]]
    if bad:
        print(f"NOT EQUIVALENT or not served: {', '.join(bad)}")
        return 1
    return 0 if leiden_ok else 1


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="time upstream scanpy and autozyme side by side",
                       description="Time upstream scanpy and autozyme side by side, in fresh processes. "
                       "With --report DIR: every call on dataset tiers and thread counts, written to "
                       "DIR/report.md (tables, charts) and DIR/report.json.")
    b.add_argument("--cells", type=int, default=100_000)
    b.add_argument("--genes", type=int, default=25_000)
    b.add_argument("--density", type=float, default=0.07)
    b.add_argument("--calls", default=None,
                   help=f"comma-separated, from {', '.join([*CALLS, 'leiden', 'neighbors'])} "
                        f"(default: all but leiden and neighbors; with --report: all)")
    b.add_argument("--leiden-cells", type=int, default=20_000, help="nodes of the kNN graph for leiden")
    b.add_argument("--neighbors-cells", type=int, default=50_000,
                   help="neighbors: cells of the PCA (neighbors and umap, first call in a fresh process)")
    b.add_argument("--leidenalg", action="store_true",
                   help="leiden: also upstream's default flavor='leidenalg' (slow) and parallel mode on it")
    b.add_argument("--rgg-cells", type=int, default=20_000,
                   help="rank_genes_groups: cells taken from the dataset (upstream is slow)")
    b.add_argument("--rgg-genes", type=int, default=10_000,
                   help="rank_genes_groups: genes taken from the dataset")
    b.add_argument("--cache", default="~/.cache/autozyme/bench")
    b.add_argument("--out", default="bench-out")
    b.add_argument("--repeat", type=int, default=None,
                   help="fresh-process runs per side (medians; default 3, with --report 1)")
    b.add_argument("--pause", type=float, default=1.0,
                   help="seconds between phases, as between notebook cells (0: back to back)")
    r = b.add_argument_group("report (--report DIR)")
    r.add_argument("--report", metavar="DIR", default=None,
                   help="run every call on dataset tiers at every thread count and write DIR/report.md "
                        "(tables and PNG charts) and DIR/report.json")
    r.add_argument("--tiers", default="small,medium,large",
                   help="comma-separated: small (20,000 x 20,000), medium (100,000 x 25,000), large "
                        "(25,000 genes, cells from MemAvailable: 60%% of it at 80 kB per cell, in steps "
                        "of 10,000, skipped unless above medium), or CELLSxGENES (e.g. 3000x2000)")
    r.add_argument("--threads", default=None,
                   help="thread counts, e.g. 1,2 or 1-4 (default: 1, 2, 4, ... and all cores). Upstream "
                        "gets NUMBA_NUM_THREADS, autozyme a daemon of its own with AUTOZYME_THREADS, per count")
    b.add_argument("--scale-genes", type=int, default=3_000,
                   help="scale: genes of its matrix (the highly variable genes scale usually gets; "
                        "its result is dense)")
    d = b.add_argument_group("dask (--dask)")
    d.add_argument("--dask", action="store_true",
                   help="upstream on Dask against autozyme on Dask, per call, on a zarr store read lazily "
                        "(LocalCluster per side, fresh processes); wilcoxon on Dask against upstream in memory")
    d.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster (1 thread each)")
    d.add_argument("--worker-memory", default="auto",
                   help="memory limit of each worker, as dask.distributed takes it (e.g. 2GiB; auto: "
                        "the machine's memory over the workers)")
    d.add_argument("--dask-chunk-rows", type=int, default=10_000, help="cells per row chunk of the store")
    d.add_argument("--dask-input", choices=("store", "persisted"), default="store",
                   help="store: each call reads the zarr store lazily (as an atlas is read); persisted: "
                        "the store is first read into the workers' memory (not timed), so the timings "
                        "are the calls' own chunk work")
    p = b.add_argument_group("pipeline (--pipeline)")
    p.add_argument("--pipeline", action="store_true",
                   help="the scanpy tutorial notebook step by step (read, hvg seurat_v3 with 7 batches, "
                        "normalize_total, log1p, raw + subset to the hvg, scale, pca, neighbors, leiden, umap, "
                        "rank_genes_groups wilcoxon), upstream and autozyme each in a fresh process; "
                        "results compared; crest-sc's times added when it is installed")
    p.add_argument("--pipeline-cells", type=int, default=50_000)
    p.add_argument("--pipeline-genes", type=int, default=20_000)
    p.add_argument("--crest-python", default=None,
                   help="an interpreter that has crest-sc (default: this one, if it has it)")
    p.add_argument("--no-crest", action="store_true", help="leave crest-sc out")
    p.add_argument("--no-prime", action="store_true",
                   help="no priming process before each side (tests: numba's caches exist already)")
    b.set_defaults(func=run)


