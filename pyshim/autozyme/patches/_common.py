"""Pieces every patch uses: argument binding against upstream's signature, input
type checks, and placing a CSR matrix's buffers in shared memory."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import shm
from ..codec import msg
from ..fallback import BadInput, Delegate, Fallback, PassThrough

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INDEX = (np.dtype(np.int32), np.dtype(np.int64))


def bind(upstream, fast_defaults: dict, args: tuple, kwargs: dict):
    """The data argument and the keyword arguments of a call, with upstream's
    defaults filled in.

    The data must come first and by position; anything else (positional
    arguments after it, which scanpy's ``old_positionals`` turns into keywords with
    a FutureWarning, or a legacy keyword for the data) goes to upstream, and so do
    unknown keywords (upstream raises its TypeError)."""
    if len(args) != 1:
        raise Fallback("data not passed as the only positional argument")
    unknown = set(kwargs) - set(fast_defaults)
    if unknown:
        raise Delegate(f"unexpected keyword arguments {sorted(unknown)}")
    return args[0], {**fast_defaults, **kwargs}


@functools.lru_cache(maxsize=None)
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


def check_csr_structure(x) -> None:
    """Raise ValueError (as scipy's format check would) for a CSR or CSC matrix
    whose indptr decreases or runs past its data, or whose data and indices differ
    in length: upstream's compiled code reads or writes out of bounds on such a
    matrix (scipy's eliminate_zeros corrupts the heap, numba kernels crash), and
    the daemon refuses it anyway. O(rows); the O(stored values) index checks stay
    in the daemon."""
    kind = "CSC" if getattr(x, "format", "csr") == "csc" else "CSR"
    major = x.shape[1] if kind == "CSC" else x.shape[0]
    indptr = x.indptr
    if len(indptr) != major + 1:
        raise BadInput(f"autozyme: malformed {kind}: indptr has {len(indptr)} entries for {major} lines")
    if len(x.indices) != len(x.data):
        raise BadInput(f"autozyme: malformed {kind}: {len(x.indices)} indices but {len(x.data)} values")
    if len(indptr) and (indptr[0] != 0 or indptr[-1] > len(x.data)):
        raise BadInput(
            f"autozyme: malformed {kind}: indptr runs from {indptr[0]} to {indptr[-1]} over {len(x.data)} values"
        )
    if len(indptr) > 1 and not np.all(indptr[1:] >= indptr[:-1]):
        raise BadInput(f"autozyme: malformed {kind}: indptr decreases")


def csr_refs(x, *, with_indices: bool, peer: bool):
    """The wire Matrix for a CSR matrix, and the arrays it refers to.

    ``peer=False``: the buffers in shared memory (the arrays themselves if already
    placed, else segment-backed copies, which the patch may adopt after success).
    ``peer=True``: ``x``'s own arrays, which the daemon copies from this process.
    ``indices`` is included only when a kernel reads it (else None). Nothing of
    ``x`` is changed here."""
    if x.data.dtype not in FLOATS:
        raise Fallback(f"dtype {x.data.dtype}")
    if x.indptr.dtype not in INDEX or x.indices.dtype not in INDEX:
        raise Fallback(f"index dtype {x.indices.dtype}/{x.indptr.dtype}")
    if peer:
        data, indptr = np.ascontiguousarray(x.data), np.ascontiguousarray(x.indptr)
        indices = np.ascontiguousarray(x.indices) if with_indices else None
        to_ref = shm.peer_ref
    else:
        data, indptr = shm.placed(x.data), shm.placed(x.indptr)
        indices = shm.placed(x.indices) if with_indices else None
        to_ref = shm.ref
    n_rows, n_cols = x.shape
    matrix = msg(
        "Csr",
        n_rows=n_rows,
        n_cols=n_cols,
        data=to_ref(data),
        indices=to_ref(indices) if indices is not None else None,
        indptr=to_ref(indptr),
    )
    return matrix, data, indices, indptr


def adopt_csr(x, data=None, indices=None, indptr=None) -> None:
    """Rebind a CSR matrix's buffers to segment-backed arrays of equal content (or,
    for ``data``, the result); later calls then copy nothing. A replaced
    segment-backed array's segment is pooled once nothing else references it."""
    for attr, new in (("data", data), ("indices", indices), ("indptr", indptr)):
        if new is not None:
            setattr(x, attr, new)


@functools.lru_cache(maxsize=1)
def _caller_skip_prefixes() -> tuple[str, ...]:
    """Directories of scanpy, the decorator package scanpy skips, and autozyme."""
    import legacy_api_wrap
    import scanpy

    return tuple(
        str(Path(m.__file__).parent) for m in (scanpy, legacy_api_wrap)
    ) + (str(Path(__file__).parent.parent),)


def warn_like_upstream(message: str, category, *, skip_packages: bool, stacklevel: int) -> None:
    """Issue a warning that upstream issues, attributed to the frame upstream's
    would be: scanpy 1.12 attributes its warnings to the first frame outside its
    own package (``skip_file_prefixes``; autozyme's frames are skipped too, so the
    user's call is named), 1.11.5 uses a fixed ``stacklevel`` (counted from the
    caller of this function)."""
    try:
        if skip_packages and sys.version_info >= (3, 12):  # Python 3.12 added skip_file_prefixes
            warnings.warn(message, category, skip_file_prefixes=_caller_skip_prefixes())
        else:
            warnings.warn(message, category, stacklevel=stacklevel + 1)
    except Warning as e:
        # The user's filter made it an error: upstream raises it here too, with
        # the data changed as far as here, so it must not run again.
        raise PassThrough(e) from None
