"""The daemon's Wilcoxon statistics of one matrix (``RankGenesGroups`` and
``RankGenesGroupsGroupSums``), for the in-memory patch (the whole matrix) and the
dask path (one block of genes at a time, on whichever machine holds it)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import shm
from ..client import DaemonError, get_client
from ..codec import msg
from ..fallback import Fallback
from . import _common


def as_float(values: np.ndarray) -> np.ndarray:
    """Float data as is; integers as float64, if every one converts exactly."""
    if values.dtype in _common.FLOATS:
        return values
    if values.size and max(abs(int(values.min())), abs(int(values.max()))) > 2**53:
        raise Fallback("integers beyond 2^53")
    widened = values.astype(np.float64)
    if np.abs(widened).sum() > 2**53:
        # 1.12's aggregate sums sparse integers exactly, in int64; f64 sums
        # agree only while every partial sum is exact.
        raise Fallback("integers whose sum exceeds 2^53")
    return widened


# Set when the kernel forbids reading this process's memory (Yama ptrace_scope).
_peer_refused = False


def matrix_ref(x):
    """The wire Matrix for the test matrix, and the arrays it refers to (kept alive
    by the caller during the request)."""
    if sp.issparse(x):
        data, indices, indptr = as_float(x.data), x.indices, x.indptr
        arrays = (data, indices, indptr)
        placed = all(shm.is_placed(a) for a in arrays)
        if placed or _peer_refused:
            arrays = tuple(shm.placed(np.ascontiguousarray(a)) for a in arrays)
            to_ref = shm.ref
        else:
            arrays = tuple(shm.peer_ready(a) for a in arrays)
            to_ref = shm.peer_ref
        data, indices, indptr = arrays
        m = msg("Csr", n_rows=x.shape[0], n_cols=x.shape[1], data=to_ref(data),
                indices=to_ref(indices), indptr=to_ref(indptr))
        return m, arrays
    x = np.ascontiguousarray(as_float(x))
    if shm.is_placed(x) or _peer_refused:
        arr = shm.placed(x)
        ref = shm.ref(arr)
    else:
        arr = shm.peer_ready(x)
        ref = shm.peer_ref(arr)
    return msg("Dense", n_rows=x.shape[0], n_cols=x.shape[1], data=ref), (arr,)


def request(x, labels, n_groups, reference, tie_correct, slots):
    """The daemon's statistics; ``slots`` None asks for 1.12's group sums (in cell
    order, no rest statistics), else 1.11.5's, with that many partial sums."""
    global _peer_refused
    matrix, keep = matrix_ref(x)
    if slots is None:
        request = msg("RankGenesGroupsGroupSums", x=matrix, group_of_row=labels, n_groups=n_groups,
                      reference=reference, tie_correct=bool(tie_correct))
    else:
        request = msg("RankGenesGroups", x=matrix, group_of_row=labels, n_groups=n_groups,
                      reference=reference, tie_correct=bool(tie_correct), mean_slots=slots)
    try:
        reply = get_client().call(request)
    except DaemonError as e:
        if e.kind == "Unsupported" and not _peer_refused and "client's memory" in str(e):
            _peer_refused = True
            return request(x, labels, n_groups, reference, tie_correct, slots)
        if e.kind == "Unsupported":
            raise Fallback(str(e)) from e
        raise
    del keep
    return reply
