"""The fallback contract for one chunk of a dask computation.

A call on a dask array is decided once, where the user calls it (the graph is
built there, and upstream runs instead when the call is out of scope). The chunk
tasks run later, possibly on another machine: a chunk the daemon there cannot
serve (no daemon, a daemon error, a daemon killed mid-request) is computed by
upstream's own chunk function in the same task, so the result is the same
either way. Each chunk is counted in this process's counters as
``"<call> (dask chunk)"``; ``AUTOZYME_STRICT=1`` in the worker's environment makes
a chunk fallback an error, as for an in-memory call.
"""

from __future__ import annotations

from .. import fallback
from ..client import DaemonError
from ..runtime import DaemonUnavailable
from ..shm import PlacementError


def counter_name(call: str) -> str:
    return f"{call} (dask chunk)"


def run(call: str, fast, upstream, *args, **kwargs):
    """``fast(*args, **kwargs)``, or ``upstream(*args, **kwargs)`` when the daemon
    cannot serve this chunk. Both must give the same result; ``fast`` must not have
    changed its inputs when it raises (dask chunks are never changed in place)."""
    name = counter_name(call)
    try:
        result = fast(*args, **kwargs)
    except (DaemonUnavailable, DaemonError, PlacementError, fallback.Fallback) as e:
        if isinstance(e, DaemonError) and e.kind == "BadMatrix":
            raise fallback.BadInput(f"autozyme: malformed matrix: {e.message}") from None
        kind = getattr(e, "kind", "failure") if isinstance(e, fallback.Fallback) else "failure"
        fallback.record_fallback(name, kind, f"{type(e).__name__}: {e}")
        return upstream(*args, **kwargs)
    with fallback.lock():
        fallback.served[name] += 1
    return result


def check_csr_arrays(chunk) -> None:
    """A CSR chunk's arrays agree with its shape (no padding, no truncation);
    else the chunk is upstream's (``Fallback``)."""
    indptr = chunk.indptr
    if (
        chunk.data.ndim != 1
        or chunk.indices.ndim != 1
        or indptr.ndim != 1
        or len(indptr) != chunk.shape[0] + 1
        or indptr[0] != 0
        or not (len(chunk.data) == len(chunk.indices) == indptr[-1])
    ):
        raise fallback.Fallback("malformed or padded CSR chunk")
