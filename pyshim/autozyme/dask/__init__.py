"""autozyme on Dask: the dask-array paths of the patched calls, and the cluster side.

A patch serves a dask input by building the same task graph upstream builds, with
autozyme's chunk functions in place of upstream's per-chunk work. Chunk functions
run wherever Dask runs the task (a worker process on any machine, or this process
with the local schedulers) and use the daemon of that machine; a chunk the daemon
cannot serve runs upstream's own chunk code there (see ``chunks.run``), so a
result never depends on where a task ran.

- ``chunks``: the per-chunk fallback contract and the worker-side counts.
- ``cluster``: activating autozyme on a ``dask.distributed`` cluster's workers.
- one module per call: ``normalize_total``, ``log1p``, ``scale``,
  ``highly_variable_genes``, ``rank_genes_groups``.
"""

from __future__ import annotations


def is_dask_array(x) -> bool:
    """Whether ``x`` is a dask array, without importing dask when it is not loaded."""
    import sys

    da = sys.modules.get("dask.array")
    return da is not None and isinstance(x, da.Array)
