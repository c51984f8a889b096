"""sc.pp.log1p on a dask array: upstream's graph, with cheaper CSR chunk work.

Upstream (1.12's ``log1p_array``, reached through the singledispatch default)
runs, on the dask array ``x``:

- ``x.astype(float)`` when the dtype is not a float (a dask layer, kept as is);
- ``np.log1p(x, out=x)``: dask's ``elemwise`` with ``out``, which rebinds ``x``
  itself (``handle_out``) to a blockwise layer applying ``np.log1p`` per chunk;
- with ``base``: ``np.divide(x, np.log(base), out=x)``, a second such layer.

Per CSR chunk, ``np.log1p(chunk)`` is scipy's ``log1p`` method:
``chunk._with_data(np.log1p(chunk._deduped_data()), copy=True)``, i.e. the
duplicates summed (in place, a no-op on canonical chunks), numpy's log1p of the
data, and a new matrix with *copies* of indices and indptr. ``np.divide(chunk,
s)`` is scipy's ``_divide``: ``chunk.astype(float64, copy=False)._mul_scalar(1 /
s)``, up to two more data arrays and four more structure copies.

autozyme's chunk functions compute the same data arrays with the same numpy
calls (numpy's log1p is the only implementation that gives numpy's bits) and
build the result around the input chunk's own indices and indptr instead of
copies. That is safe: dask never changes a chunk in place, scanpy and scipy
never write into a canonical matrix's structure (``sort_indices`` and
``sum_duplicates`` are no-ops on it), and the structure of a non-canonical chunk
is rebuilt by ``_deduped_data`` before it is shared, exactly as upstream does.
The layers' dtype and meta are the ones dask derives for upstream's own layers.

Dense chunks are not served: upstream's per-chunk work (one ``np.log1p`` into a
new array) is already the least there is, so the caller falls back.
"""

from __future__ import annotations

import numpy as np

from ..fallback import Fallback
from . import chunks

CALL = "log1p"


def in_scope(x) -> None:
    """Raise Fallback unless autozyme's chunk functions serve this dask array."""
    from ..patches import _common

    meta = x._meta
    if not (_common.is_csr(meta)):
        raise Fallback(f"dask array of {type(meta).__name__} chunks")
    if not (x.dtype in _common.FLOATS or np.issubdtype(x.dtype, np.integer)):
        raise Fallback(f"dask array of dtype {x.dtype}")


def log1p_dask(x, *, base, copy):
    """upstream's ``log1p_array`` on a dask array (``in_scope`` checked)."""
    from dask.array.core import elemwise, handle_out

    if copy:
        x = x.astype(float) if not np.issubdtype(x.dtype, np.floating) else x.copy()
    elif not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, complex)):
        x = x.astype(float)
    # dtype and meta of upstream's layer: dask derives them from np.log1p on the
    # meta; building that layer (not computed) is cheap.
    ref = elemwise(np.log1p, x)
    handle_out(x, _blockwise(log1p_chunk, ref, x))
    if base is not None:
        log_base = np.log(base)
        ref = elemwise(np.divide, x, log_base)
        handle_out(x, _blockwise(divide_chunk, ref, x, log_base))
    return x


def _blockwise(fn, ref, x, *args):
    import dask.array as da

    return da.map_blocks(fn, x, *args, dtype=ref.dtype, meta=ref._meta, name=f"{ref.name}-azm")


# ---- chunk functions (module level: they are pickled to workers) --------------


def log1p_chunk(chunk):
    return chunks.run(CALL, _log1p_fast, np.log1p, chunk)


def divide_chunk(chunk, log_base):
    return chunks.run(CALL, _divide_fast, np.divide, chunk, log_base)


def _log1p_fast(chunk):
    _check_chunk(chunk)
    # scipy's ufunc method: duplicates summed first (in place, as upstream).
    data = chunk._deduped_data()
    result = _with_data(chunk, np.log1p(data))
    # Its structure is the (now canonical) chunk's: scipy's cached verdict spares
    # the next layer (``base``) another pass over the indices.
    result.has_canonical_format = True
    return result


def _divide_fast(chunk, log_base):
    _check_chunk(chunk)
    if not np.isscalar(log_base) and np.ndim(log_base) != 0:
        raise Fallback("non-scalar divisor")
    if not np.can_cast(chunk.dtype, np.float64):
        raise Fallback(f"chunk dtype {chunk.dtype}")
    # scipy's ``chunk / s``: ``astype(float64, copy=False)._mul_scalar(1 / s)``.
    # The data times the reciprocal, in float64. ``s`` is what numpy's object
    # loop hands scipy: the divisor cast to object (an np.float32 becomes a
    # Python float, so its reciprocal is taken in double precision).
    other = np.array([log_base]).astype(object)[0]
    recip = 1 / other
    if np.result_type(np.float64, recip) != np.float64:  # a divisor numpy promotes further
        raise Fallback(f"divisor of type {type(log_base).__name__}")
    if chunk.dtype != np.float64:
        # scipy sums duplicates after the cast (in float64, on its copy): only a
        # canonical chunk, where that is a no-op, is served.
        if not chunk.has_canonical_format:
            raise Fallback("non-canonical float32 chunk")
        # cast and product in one pass (the cast to float64 is exact)
        values = np.multiply(chunk.data, recip, dtype=np.float64)
    else:
        values = chunk.data * recip
    return _with_data(chunk, values)


def _check_chunk(chunk) -> None:
    """A float CSR chunk whose arrays agree (the usual shape: no padding beyond
    ``indptr[-1]``, which scipy's constructor would prune). Anything else goes to
    upstream's chunk function."""
    from ..patches import _common

    if not _common.is_csr(chunk) or not hasattr(chunk, "_deduped_data"):
        raise Fallback(f"{type(chunk).__name__} chunk")
    if chunk.data.dtype not in (np.float32, np.float64):
        raise Fallback(f"chunk data dtype {chunk.data.dtype}")
    chunks.check_csr_arrays(chunk)


def _with_data(chunk, data):
    """scipy's ``_with_data(data, copy=True)`` without the copies of the structure:
    the same constructor on the same values, so the same index dtypes (a
    csr_matrix's int64 structure that fits is narrowed, into new arrays, as
    upstream's copies are)."""
    return type(chunk)((data, chunk.indices, chunk.indptr), shape=chunk.shape, dtype=data.dtype)
