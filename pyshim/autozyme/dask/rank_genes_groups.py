"""rank_genes_groups(method="wilcoxon") on a dask ``X``: exact, by blocks of genes.

Upstream has no dask path for this test (on scanpy 1.12.4 a dask ``X`` fails inside
numba). Every statistic the test needs is per gene: the rank sums of each group,
the tie-correction factor, the per-group sums in cell order and the counts of
non-zero values. So the matrix is regrouped by Dask from row chunks (which span all
genes) into blocks of whole columns (all cells, a range of genes); each block is
ranked where it is, by that machine's daemon, with the same request the in-memory
path sends (``RankGenesGroupsGroupSums``); only the per-gene statistics, a few
numbers per group and gene, travel back. Concatenated along the genes they are
exactly what the daemon returns for the whole matrix in memory, so upstream's own
code finishes the call as on the in-memory path and every field is identical to
upstream's in-memory result on the computed matrix.

No worker ever holds more than one block of genes (plus the pieces Dask moves to
assemble it): a matrix larger than any one worker's memory is ranked.

A block the daemon cannot rank (no daemon on that machine, a daemon killed
mid-request) is retried once, which restarts the daemon on demand; when that
fails too the task fails and Dask's own retry policy applies. There is no upstream
chunk computation to fall back to: upstream cannot compute this call on dask.
"""

from __future__ import annotations

import math

import numpy as np

from .. import codec, fallback
from ..patches import wilcoxon_request
from . import chunks

# A block's size, as dense float32 cells x genes, aimed at: large enough that each
# task's fixed costs (a request, the labels, Dask's bookkeeping) are small, small
# enough that a block is a fraction of a worker's memory. Sparse blocks are
# smaller by their density.
BLOCK_BYTES = 512 * 2**20


def n_workers() -> int:
    """The distributed client's worker count when there is one, else this machine's cores."""
    import sys

    if "distributed" in sys.modules:
        try:
            from distributed import default_client

            return max(1, len(default_client().scheduler_info(n_workers=-1)["workers"]))
        except (ValueError, KeyError, TypeError):
            pass
    import os

    return max(1, os.cpu_count() or 1)


def genes_per_block(n_cells: int, n_genes: int, workers: int) -> int:
    """At least two blocks a worker (so that a slow worker does not hold back the
    call), at most ``BLOCK_BYTES`` a block as dense float32."""
    by_size = max(1, BLOCK_BYTES // max(1, 4 * n_cells))
    by_workers = math.ceil(n_genes / (2 * workers))
    return max(1, min(n_genes, by_size, by_workers))


def check(x) -> None:
    """What the daemon ranks: a 2-d dask array of CSR (matrix or array) or dense chunks."""
    import scipy.sparse as sp

    from ..fallback import Fallback

    meta = getattr(x, "_meta", None)
    if x.ndim != 2:
        raise Fallback(f"{x.ndim}-dimensional dask array")
    if sp.issparse(meta):
        if meta.format != "csr":
            raise Fallback(f"dask array of {meta.format} chunks (CSR and dense are accelerated)")
    elif not isinstance(meta, np.ndarray) or isinstance(meta, np.matrix):
        raise Fallback(f"dask array of {type(meta).__name__} chunks")


def group_stats(x, group_of_row, n_groups: int, reference, tie_correct: bool) -> codec.Msg:
    """The daemon's ``RankGenesGroupsGroupSums`` reply for the whole dask matrix,
    computed block by block of genes wherever Dask runs the blocks."""
    import dask

    n_cells, n_genes = x.shape
    width = genes_per_block(n_cells, n_genes, n_workers())
    # Task-based rechunking: dask.distributed's default for large rechunks (P2P,
    # a shuffle through pyarrow-style buffers) fails on scipy sparse chunks.
    blocks = x.rechunk((n_cells, width), method="tasks").to_delayed().ravel()
    # One graph key for the labels: sent once to each worker, not once per block.
    labels = dask.delayed(np.ascontiguousarray(group_of_row, dtype=np.uint64), pure=True)
    tasks = [dask.delayed(_block_stats, pure=True)(b, labels, n_groups, reference, bool(tie_correct))
             for b in blocks]
    parts = dask.compute(*tasks)
    return _concatenate(parts, n_groups, reference)


def _block_stats(block, group_of_row, n_groups: int, reference, tie_correct: bool) -> dict:
    """One block's statistics, by the daemon of the machine this task runs on."""
    from ..client import DaemonError
    from ..runtime import DaemonUnavailable

    for attempt in (0, 1):
        try:
            reply = wilcoxon_request.request(block, group_of_row, n_groups, reference, tie_correct, None)
            break
        except (DaemonUnavailable, DaemonError) as e:
            if attempt or (isinstance(e, DaemonError) and e.kind in ("BadMatrix", "Unsupported")):
                raise
    g = int(reply.n_genes)
    if g != block.shape[1]:
        raise DaemonError("Internal", "gene count mismatch")
    with fallback.lock():  # the worker's count of blocks served (status()["workers"])
        fallback.served[chunks.counter_name("rank_genes_groups")] += 1
    return {
        "n_genes": g,
        "rank_sums": reply.rank_sums.reshape(-1, g),
        "tie": reply.tie.reshape(-1, g),
        "sums": reply.sums.reshape(-1, g),
        "nnz": reply.nnz.reshape(-1, g),
        "nonneg_integers": bool(reply.nonneg_integers),
    }


def _concatenate(parts, n_groups: int, reference) -> codec.Msg:
    """The blocks' per-gene statistics side by side, in the reply's flat layout."""

    def along_genes(key):
        return np.concatenate([p[key] for p in parts], axis=1).ravel()

    fields = {
        "n_genes": sum(p["n_genes"] for p in parts),
        "rank_sums": along_genes("rank_sums"),
        "tie": along_genes("tie"),
        "sums": along_genes("sums"),
        "nnz": along_genes("nnz"),
        "cache_hit": False,
        "nonneg_integers": all(p["nonneg_integers"] for p in parts),
    }
    return codec.Msg("RankGenesGroupsGroupSums", fields)
