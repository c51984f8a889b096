"""sc.pp.normalize_total on a dask array: upstream's graph, cheaper CSR chunks.

Upstream 1.12's ``normalize_total`` / ``_normalize_total_helper`` on dask ``x``:

- ``x.copy()`` (inplace=False) and ``x.astype(np.float32)`` (integer counts):
  dask layers, kept as they are;
- ``counts = fast_array_utils.stats.sum(x, axis=1)``: ``da.reduction`` whose
  chunk and aggregate steps are both ``_dask_block("sum", dtype=<numpy's sum
  dtype>)``; per CSR chunk that is ``sp.csr_array(chunk, dtype=...).sum(axis=1)``,
  i.e. scipy's ``_minor_reduce``: ``np.add.reduceat(data, indptr[non-empty
  rows])`` scattered into zeros, reshaped to a column;
- ``target_sum=None``: ``_compute_nnz_median(counts)`` computes the counts there
  and then (upstream's own function is called here, at the same point);
- ``counts / target_sum`` (lazy), then ``axis_mul_or_truediv`` on dask:
  ``map_blocks`` of the in-memory ``axis_mul_or_truediv`` over row chunks with
  the factors as a (rows, 1) column; per CSR chunk ``data / np.repeat(factors
  with zeros replaced by 1, row lengths)`` in a new matrix with *copies* of
  indices and indptr.

autozyme builds the same layers with the same arguments (the aggregate step is
upstream's own) and replaces two leaves: the per-chunk row sums call the same
``np.add.reduceat`` on the chunk's arrays directly (no sparse-array wrapper, no
format checks, no extra copies), and the per-chunk division computes the same
quotients with the same numpy ufunc (over cache-sized row blocks) and shares
the chunk's indices and indptr
(dask never changes a chunk in place, and nothing writes into a CSR's
structure) instead of copying them.

Dense chunks are not served: upstream's chunk work there (``np.sum`` over rows,
one ``np.true_divide`` into a new array) is already the least there is.
``exclude_highly_expressed`` on dask (comparisons and a gene subset taken over
the whole dask array) is not served either.
"""

from __future__ import annotations

from functools import partial
from operator import truediv

import numpy as np

from ..fallback import Fallback
from . import chunks
from .log1p import _check_chunk  # the same float, well-formed CSR chunk scope

CALL = "normalize_total"
# The fast-array-utils releases whose dask sum (``_dask_inner``/``_dask_block``)
# was read for this module; another release may build another graph.
FAST_ARRAY_UTILS = ("1.5.1",)
# Stored values per block of the row division (float32: 512 KiB of data).
_BLOCK = 1 << 17


def in_scope(x, *, exclude_highly_expressed, target_sum) -> None:
    """Raise Fallback unless autozyme's graph serves this dask array."""
    from importlib.metadata import version

    from ..patches import _common

    if exclude_highly_expressed:
        raise Fallback("exclude_highly_expressed on a dask array")
    meta = x._meta
    if not _common.is_csr(meta):
        raise Fallback(f"dask array of {type(meta).__name__} chunks")
    if x.ndim != 2:
        raise Fallback(f"{x.ndim}-d dask array")
    if not (x.dtype in _common.FLOATS or np.issubdtype(x.dtype, np.integer)):
        raise Fallback(f"dask array of dtype {x.dtype}")
    if target_sum is not None and not isinstance(target_sum, (int, float, np.floating, np.integer)):
        raise Fallback(f"target_sum of type {type(target_sum).__name__}")
    fau = version("fast-array-utils")
    if fau not in FAST_ARRAY_UTILS:
        raise Fallback(f"fast-array-utils {fau} (its dask sum was read for {FAST_ARRAY_UTILS})")
    try:  # the private helpers the graph is built from, checked before anything changes
        from fast_array_utils.stats._utils import _dask_block  # noqa: F401
        from scanpy._utils import _broadcast_axis, _make_axis_chunks  # noqa: F401
        from scanpy.preprocessing._normalization import _compute_nnz_median  # noqa: F401
    except ImportError as e:
        raise Fallback(f"upstream helper missing: {e}") from None


def normalize_total(adata, *, target_sum, key_added, layer, obsm, inplace, copy):
    """upstream's ``normalize_total`` body for a dask X/layer/obsm entry
    (``in_scope`` checked, the argument errors delegated by the caller)."""
    from scanpy import logging as logg
    from scanpy._utils import view_to_actual
    from scanpy.get import _get_obs_rep, _set_obs_rep
    from scanpy.preprocessing._normalization import _compute_nnz_median

    if copy:
        adata = adata.copy()
    view_to_actual(adata)
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    if not inplace:
        x = x.copy()
    if issubclass(x.dtype.type, int | np.integer):
        x = x.astype(np.float32)  # upstream's cast

    start = logg.info("normalizing counts per cell")
    counts_per_cell = row_sums(x)
    if target_sum is None:
        target_sum = _compute_nnz_median(counts_per_cell)
    counts_per_cell = counts_per_cell / target_sum
    x = divide_rows(x, counts_per_cell)
    # upstream warns about cells with zero counts only for in-memory counts.

    dat = dict(X=x, norm_factor=counts_per_cell)
    if inplace:
        if key_added is not None:
            adata.obs[key_added] = dat["norm_factor"]
        _set_obs_rep(adata, dat["X"], layer=layer, obsm=obsm)
    logg.info("    finished ({time_passed})", time=start)
    if key_added is not None:
        logg.debug(f"and added {key_added!r}, counts per cell before normalization (adata.obs)")
    if copy:
        return adata
    if not inplace:
        return dat
    return None


def row_sums(x):
    """fast-array-utils' ``stats.sum(x, axis=1)`` on dask, with our chunk step."""
    import dask.array as da
    from fast_array_utils.stats._utils import _dask_block

    dtype = np.sum(np.zeros(1, dtype=x.dtype)).dtype  # fast-array-utils' "numpy result dtype"
    return da.reduction(
        x,
        partial(row_sums_chunk, dtype=dtype),
        partial(_dask_block, "sum", dtype=dtype),
        axis=1,
        dtype=dtype,
        meta=np.array([], dtype=dtype),
    )


def divide_rows(x, counts_per_cell):
    """scanpy's ``axis_mul_or_truediv`` on dask (``op=truediv, axis=0,
    allow_divide_by_zero=False``), with our chunk function."""
    import dask.array as da
    from scanpy._compat import DaskArray, warn
    from scanpy._utils import _broadcast_axis, _make_axis_chunks

    axis = 0
    scaling_array = _broadcast_axis(counts_per_cell, axis)
    if isinstance(scaling_array, DaskArray):
        if x.chunksize[0] != scaling_array.chunksize[0]:
            warn("Rechunking scaling_array in user operation", UserWarning)
            scaling_array = scaling_array.rechunk(_make_axis_chunks(x, axis))
    else:
        scaling_array = da.from_array(scaling_array, chunks=_make_axis_chunks(x, axis))
    return da.map_blocks(
        divide_rows_chunk,
        x,
        scaling_array,
        axis,
        truediv,
        meta=x._meta,
        out=None,
        allow_divide_by_zero=False,
    )


# ---- chunk functions (module level: they are pickled to workers) --------------


def row_sums_chunk(a, *, axis=None, dtype=None, keepdims=False, computing_meta=False):
    from fast_array_utils.stats._utils import _dask_block

    upstream = partial(_dask_block, "sum")
    if computing_meta:  # dask asking for the meta while building the graph
        return upstream(a, axis=axis, dtype=dtype, keepdims=keepdims, computing_meta=True)
    return chunks.run(CALL, _row_sums_fast, upstream, a, axis=axis, dtype=dtype, keepdims=keepdims)


def _row_sums_fast(a, *, axis, dtype, keepdims):
    _check_chunk(a)
    if axis not in ((1,), 1) or not keepdims:
        raise Fallback(f"row sums with axis={axis!r}, keepdims={keepdims!r}")
    if dtype is None or np.dtype(dtype) != a.data.dtype:
        # csr_array(a, dtype=...) would cast the data first
        raise Fallback(f"sum dtype {dtype} of {a.data.dtype} data")
    indptr = a.indptr
    # scipy's _minor_reduce: one reduceat over the rows that store values (an
    # empty segment would yield a value instead of 0), scattered into zeros.
    rows = np.flatnonzero(np.diff(indptr))
    sums = np.zeros(a.shape[0], dtype=a.data.dtype)
    sums[rows] = np.add.reduceat(a.data, indptr[rows])
    # scipy's closing ``ret.sum(axis=(), dtype=...)``: not a plain copy, it adds
    # to the identity (a -0.0 sum comes out +0.0).
    sums = sums.sum(axis=(), dtype=a.data.dtype)
    # the column shape is _dask_block's keepdims reshape.
    return sums.reshape(a.shape[0], 1)


def divide_rows_chunk(x, scaling_array, axis, op, *, out=None, allow_divide_by_zero=True):
    from scanpy._utils import axis_mul_or_truediv

    return chunks.run(
        CALL, _divide_rows_fast, axis_mul_or_truediv, x, scaling_array, axis, op,
        out=out, allow_divide_by_zero=allow_divide_by_zero,
    )


def _divide_rows_fast(x, scaling_array, axis, op, *, out, allow_divide_by_zero):
    _check_chunk(x)
    if axis != 0 or op is not truediv or out is not None or allow_divide_by_zero:
        raise Fallback("not a row division without zero divisors")
    if not isinstance(scaling_array, np.ndarray) or scaling_array.shape != (x.shape[0], 1):
        raise Fallback(f"factors of shape {getattr(scaling_array, 'shape', None)}")
    if not isinstance(x.data, np.ndarray):
        raise Fallback(f"data of type {type(x.data).__name__}")
    # upstream's zero guard, then ``x.data / np.repeat(factors, row lengths)``.
    # Division is elementwise and correctly rounded, so the quotients do not
    # depend on how the values are grouped: the repeat and the division run
    # over row blocks of about _BLOCK stored values, whose operands stay in the
    # cache, instead of through a repeated-factors array as long as the data.
    scaling_array = scaling_array.copy() + (scaling_array == 0)
    factors = scaling_array.reshape(-1)  # np.repeat's flattening
    data, indptr = x.data, x.indptr
    n_rows = x.shape[0]
    lengths = np.diff(indptr)
    out = np.empty(len(data), dtype=np.result_type(data.dtype, factors.dtype))
    cuts = np.unique(
        np.concatenate(([0], np.searchsorted(indptr, np.arange(_BLOCK, len(data), _BLOCK)), [n_rows]))
    )
    for a, b in zip(cuts[:-1], cuts[1:]):
        lo, hi = indptr[a], indptr[b]
        # ndarray truediv is np.true_divide
        np.true_divide(data[lo:hi], np.repeat(factors[a:b], lengths[a:b]), out=out[lo:hi])
    # upstream: type(x)((data, indices.copy(), indptr.copy()), shape=x.shape)
    return type(x)((out, x.indices, x.indptr), shape=x.shape)
