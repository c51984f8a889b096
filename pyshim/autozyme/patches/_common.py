"""Pieces every patch uses: argument binding against upstream's signature, input
type checks, and placing a CSR matrix's buffers in shared memory."""

from __future__ import annotations

import inspect

import numpy as np
import scipy.sparse as sp

from .. import shm
from ..codec import msg
from ..fallback import Delegate, Fallback

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INDEX = (np.dtype(np.int32), np.dtype(np.int64))


def bind(upstream, fast_defaults: dict, args: tuple, kwargs: dict) -> dict:
    """Keyword arguments of a call, with upstream's defaults filled in.

    Positional arguments beyond the first go to upstream (scanpy's
    ``old_positionals`` turns them into keywords with a FutureWarning); unknown
    keywords too (upstream raises its TypeError)."""
    if args:
        raise Fallback("positional arguments after the data")
    unknown = set(kwargs) - set(fast_defaults)
    if unknown:
        raise Delegate(f"unexpected keyword arguments {sorted(unknown)}")
    return {**fast_defaults, **kwargs}


def keyword_defaults(fn) -> dict:
    """Keyword-only parameters and defaults of upstream's function."""
    sig = inspect.signature(inspect.unwrap(fn))
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def is_csr(x) -> bool:
    return sp.issparse(x) and x.format == "csr"


def is_sparse_array(x) -> bool:
    """scipy's newer sparse *array* classes (csr_array, ...), not sparse matrices."""
    return sp.issparse(x) and not isinstance(x, sp.spmatrix)


def is_csc(x) -> bool:
    return sp.issparse(x) and x.format == "csc"


def check_float_or_int(x) -> None:
    dt = x.dtype
    if dt not in FLOATS and not np.issubdtype(dt, np.integer):
        raise Fallback(f"dtype {dt}")


def placed_csr(x):
    """Shared-memory copies (or the arrays themselves, if already placed) of a CSR
    matrix's buffers, and the wire Matrix describing them. Nothing of ``x`` is
    changed here; the patch rebinds the placed arrays only after success."""
    if x.data.dtype not in FLOATS:
        raise Fallback(f"dtype {x.data.dtype}")
    if x.indptr.dtype not in INDEX or x.indices.dtype not in INDEX:
        raise Fallback(f"index dtype {x.indices.dtype}/{x.indptr.dtype}")
    data, indices, indptr = (shm.placed(a) for a in (x.data, x.indices, x.indptr))
    n_rows, n_cols = x.shape
    matrix = msg(
        "Csr",
        n_rows=n_rows,
        n_cols=n_cols,
        data=shm.ref(data),
        indices=shm.ref(indices),
        indptr=shm.ref(indptr),
    )
    return matrix, data, indices, indptr


def adopt_csr(x, data=None, indices=None, indptr=None) -> None:
    """Rebind a CSR matrix's buffers to segment-backed arrays of equal content (or,
    for ``data``, the result); later calls then copy nothing."""
    for attr, new in (("data", data), ("indices", indices), ("indptr", indptr)):
        if new is not None and getattr(x, attr) is not new:
            shm.replace_attr(x, attr, new)
