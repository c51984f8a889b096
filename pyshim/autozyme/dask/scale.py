"""sc.pp.scale on a dask array (scanpy 1.12): upstream's graph, cheaper chunk work.

Upstream's ``scale_array`` on a row-chunked dask array ``x`` builds:

1. ``mean_var(x, axis=0, correction=1)`` (fast-array-utils): two
   ``da.reduction``s, one over ``x`` and one over ``power(x, 2, dtype=float64)``
   (a ``map_blocks``). Each chunk's leaf is ``_dask_block("sum", chunk, dtype=
   float64)``: a CSR chunk becomes ``csr_array(chunk, dtype=float64)`` (a float64
   copy of its data) summed over rows by scipy's ``ones @ chunk`` (the rows in
   order, each value added to its column's f64 sum from 0.0); a dense chunk is
   numpy's ``sum(axis=0, dtype=float64)`` (row by row per column). The squares are
   taken after widening to f64 (``np.power(values, 2, dtype=float64)``, another
   data-sized array per chunk). The per-chunk (1, genes) rows are combined by the
   same ``_dask_block`` sum (``aggregate``), in dask's tree (``split_every``).
   Then ``mean = sums / n``, ``var = sq / n - mean**2``, ``var *= n / (n - 1)``,
   ``std = sqrt(var)``, ``std[std == 0] = 1``: elementwise dask ops on (genes,).
2. with ``zero_center``: ``x - mean`` (dask elemwise; a CSR chunk densifies:
   ``todense()`` in the data's dtype, minus the mean in f64), ``dematrix``.
3. ``axis_mul_or_truediv(x, std, axis=1)``: ``map_blocks`` dividing each chunk
   by ``std`` (CSR: ``data / std.take(indices, mode="clip")`` into a new matrix
   with *copies* of indices and indptr; dense: ``np.true_divide``, f64 result).
4. with ``max_value``: ``clip``, a ``map_blocks`` clipping in place (numba).

``sc.pp.scale(adata)`` then assigns mean and std to ``adata.var``, which computes
them (pandas converts the dask arrays) there and then; ``X`` stays lazy.

autozyme builds the same reductions (same leaves' outputs, same aggregate
function, same tree) and the same elementwise steps on the same dask arrays,
so every bit matches, and replaces the leaf work:

- statistics: one task per chunk asks the daemon for both rows
  (``ScaleChunkStats``: the chunk's sums and sums of f64 squares, in upstream's
  order, from the chunk's own buffers) instead of two f64 copies of the data and
  two scipy/numpy passes; the two reductions take their rows from that task;
- ``sc.pp.scale(adata)``: mean and std are computed together (one pass over the
  data instead of upstream's two, one per column assigned), and ``X``'s graph
  divides by the computed ``std`` (upstream's graph recomputes it when ``X`` is
  computed; the values are the same);
- division and clipping: one task per chunk. CSR: the new data array in cache-
  sized blocks (gather, divide, clip), around the chunk's own indices and indptr
  (no copies; dask never changes a chunk in place, nor does scanpy a canonical
  matrix's structure); densified CSR: the daemon's ``ScaleApply`` (densify,
  centre, divide, clip in one pass); dense: numpy's own divide (and subtract) in
  row blocks with the clip fused.

The final array has upstream's chunks, dtype and meta (dtype and meta of
upstream's own layers, which dask derives from the meta; building those layers
is cheap and they are not computed).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ..fallback import Fallback
from . import chunks

CALL = "scale"
_BLOCK_BYTES = 1 << 18  # per block of a chunk's values: stays in L2 between passes


def in_scope(x, *, zero_center, clip_at, max_value, mask_obs) -> None:
    """Raise Fallback unless autozyme serves ``scale`` on this dask array."""
    from ..patches import _common

    if mask_obs is not None:
        # upstream assigns into x[mask_obs, :] (dask setitem): not reproduced here.
        raise Fallback("mask_obs with a dask array")
    if x.ndim != 2:
        raise Fallback(f"{x.ndim}-d dask array")
    if any(np.isnan(c) for cs in x.chunks for c in cs):
        raise Fallback("dask array of unknown chunk sizes")
    if x.numblocks[1] != 1:
        raise Fallback("dask array chunked along genes")
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        raise Fallback("empty dask array")
    meta = x._meta
    dense = isinstance(meta, np.ndarray) and not isinstance(meta, np.matrix)
    if not (dense or _common.is_csr(meta)):
        raise Fallback(f"dask array of {type(meta).__name__} chunks")
    if not (x.dtype in _common.FLOATS or np.issubdtype(x.dtype, np.integer)):
        raise Fallback(f"dask array of dtype {x.dtype}")
    if dense and n_cols == 1:
        # numpy sums a single column pairwise (contiguous along the reduced axis)
        raise Fallback("dense dask array with one column")
    if clip_at is not None and not clip_at >= 0:
        raise Fallback("negative or NaN max_value")
    if zero_center and clip_at == 0 and isinstance(max_value, (int, np.integer)):
        # numba negates an integer bound as an integer: the lower bound is +0,
        # where autozyme's kernels clip to -0.0
        raise Fallback("integer max_value 0 with zero_center")


def scale_dask(x, *, zero_center: bool, clip_at, max_value, compute_stats: bool, warn):
    """upstream's ``scale_array(x, return_mean_std=True)`` for a dask ``x``
    (``in_scope`` checked): returns (result, mean, std). ``compute_stats``: mean
    and std are computed here (numpy arrays, as ``adata.var`` stores them), else
    lazy as upstream's. ``warn()`` issues upstream's densifying warning."""
    import dask
    import dask.array as da
    from scanpy import logging as logg
    from scanpy._utils import dematrix

    from ..patches import _common

    if not zero_center and max_value is not None:
        logg.info("... be careful when using `max_value` without `zero_center`.")
    if np.issubdtype(x.dtype, np.integer):
        logg.info(
            "... as scaling leads to float results, integer "
            "input is cast to float, returning copy."
        )
        x = x.astype(np.float64)

    mean, std = _mean_std(x)
    csr = _common.is_csr(x._meta)
    if zero_center:
        if csr:
            warn()
        # upstream's centred layers, built (not computed) for their dtype and meta
        ref = dematrix(x - mean)
    else:
        ref = x
    dtype, meta = ref.dtype, ref._meta

    if compute_stats:
        mean, std = dask.compute(mean, std)
        mean_row = da.from_array(mean[None, :], chunks=((1,), (x.shape[1],)))
        std_row = da.from_array(std[None, :], chunks=((1,), (x.shape[1],)))
    else:
        mean_row, std_row = mean[None, :], std[None, :]
    args = (x, std_row, mean_row) if zero_center else (x, std_row)
    fn = partial(apply_chunk, zero_center=zero_center, clip_at=clip_at, max_value=max_value)
    result = da.map_blocks(fn, *args, dtype=dtype, meta=meta)
    return result, mean, std


def _mean_std(x):
    """upstream's mean and std (lazy), the reductions' leaves from one task per chunk."""
    import dask.array as da
    from fast_array_utils.stats._utils import _dask_block

    n_rows, n_cols = x.shape
    k = x.numblocks[0]
    f64 = np.float64
    both = x.map_blocks(stats_chunk, dtype=f64, chunks=((2,) * k, (n_cols,)),
                        meta=np.empty((0, 0), dtype=f64))
    # fast-array-utils' reduction, with its own aggregate, leaves taking a row.
    reduce = partial(da.reduction, aggregate=partial(_dask_block, "sum", dtype=f64), axis=0,
                     dtype=f64, meta=np.array([], dtype=f64))
    sums = reduce(both, partial(_row, 0))
    sq_sums = reduce(both, partial(_row, 1))
    # fast-array-utils' mean_var and scanpy's std, as upstream writes them.
    n = n_rows
    mean = sums / n
    mean_sq = sq_sums / n
    var = mean_sq - mean**2
    if n != 1:
        var *= n / (n - 1)
    std = np.sqrt(var)
    std[std == 0] = 1
    return mean, std


def _row(i, block, axis=None, keepdims=True, computing_meta=False, **_):
    """A reduction leaf: row ``i`` of a chunk's statistics, (1, genes), as
    ``_dask_block`` returns a chunk's sum with ``keepdims``."""
    if computing_meta:
        return np.ndarray((), np.float64)
    return block[i : i + 1]


# ---- chunk functions (module level: they are pickled to workers) --------------


def stats_chunk(chunk):
    """(2, genes) f64: the chunk's column sums and sums of f64 squares."""
    return chunks.run(CALL, _stats_fast, _stats_upstream, chunk)


def apply_chunk(chunk, std_row, mean_row=None, *, zero_center, clip_at, max_value):
    return chunks.run(CALL, _apply_fast, _apply_upstream, chunk, std_row, mean_row,
                      zero_center=zero_center, clip_at=clip_at, max_value=max_value)


def _stats_upstream(chunk):
    """fast-array-utils' two leaves on this chunk, as its dask reductions run them."""
    from fast_array_utils.stats._power import power
    from fast_array_utils.stats._utils import _dask_block

    leaf = partial(_dask_block, "sum", axis=(0,), dtype=np.float64, keepdims=True)
    return np.concatenate([leaf(chunk), leaf(power(chunk, 2, dtype=np.float64))])


def _stats_fast(chunk):
    from ..codec import msg
    from ..patches import _common

    request = lambda m: msg("ScaleChunkStats", x=m)  # noqa: E731
    if _common.is_csr(chunk):
        _check_csr(chunk)
        reply = _call_csr(request, chunk)
    elif isinstance(chunk, np.ndarray) and not isinstance(chunk, np.matrix):
        if chunk.ndim != 2 or chunk.dtype not in _common.FLOATS:
            raise Fallback(f"dense chunk {chunk.dtype} {chunk.ndim}-d")
        if not chunk.flags.c_contiguous or chunk.shape[1] < 2:
            # numpy sums such chunks in another order
            raise Fallback("dense chunk not C-contiguous, or one column")
        reply = _call_dense(request, chunk)
    else:
        raise Fallback(f"{type(chunk).__name__} chunk")
    out = np.empty((2, chunk.shape[1]), dtype=np.float64)
    out[0], out[1] = reply.sums, reply.sq_sums
    if not np.isfinite(out).all():
        # upstream's numpy warns (overflow, inf - inf) where the daemon cannot tell
        raise Fallback("non-finite sums (upstream's own warnings)")
    return out


def _call_csr(make_request, chunk):
    """A request over a CSR chunk's buffers, as ``_call_dense``. The shared-memory
    copies stay referenced until the reply: a dropped copy's segment is pooled,
    and another chunk's task (another thread) may take and overwrite it."""
    from ..client import DaemonError, get_client
    from ..codec import msg
    from ..patches import _common
    from .. import shm

    if not shm.peer_reads_refused():
        if chunk.indices.dtype not in _common.INDEX or chunk.indptr.dtype not in _common.INDEX:
            raise Fallback(f"index dtype {chunk.indices.dtype}/{chunk.indptr.dtype}")
        # (a chunk unpickled from a Dask transfer may lie at any byte: realigned)
        arrays = [shm.peer_ready(a) for a in (chunk.data, chunk.indices, chunk.indptr)]
        data, indices, indptr = (shm.peer_ref(a) for a in arrays)
        matrix = msg("Csr", n_rows=chunk.shape[0], n_cols=chunk.shape[1], data=data,
                     indices=indices, indptr=indptr)
        try:
            return get_client().call(make_request(matrix))
        except DaemonError as e:
            if e.kind != "Unsupported":
                raise
            shm.refuse_peer_reads()
    matrix, *buffers = _common.csr_refs(chunk, with_indices=True, peer=False)
    reply = get_client().call(make_request(matrix))
    del buffers
    return reply


def _call_dense(make_request, chunk):
    """A request over a dense chunk, read by the daemon from this process's memory
    (or from a shared-memory copy when the kernel refuses that, remembered as
    the in-memory path remembers it)."""
    from ..client import DaemonError, get_client
    from ..codec import msg
    from .. import shm

    def matrix(data_ref):
        return msg("Dense", n_rows=chunk.shape[0], n_cols=chunk.shape[1], data=data_ref)

    if not shm.is_placed(chunk) and not shm.peer_reads_refused():
        # (a chunk unpickled from a Dask transfer may lie at any byte: realigned)
        ready = shm.peer_ready(chunk)
        try:
            return get_client().call(make_request(matrix(shm.peer_ref(ready))))
        except DaemonError as e:
            if e.kind != "Unsupported":
                raise
            shm.refuse_peer_reads()
    placed = shm.placed(chunk)
    reply = get_client().call(make_request(matrix(shm.ref(placed))))
    del placed  # referenced until the reply (see _call_csr)
    return reply


def _check_csr(chunk) -> None:
    from ..patches import _common

    if chunk.data.dtype not in _common.FLOATS:
        raise Fallback(f"chunk data dtype {chunk.data.dtype}")
    chunks.check_csr_arrays(chunk)


def _apply_upstream(chunk, std_row, mean_row, *, zero_center, clip_at, max_value):
    """upstream's layers on this chunk: ``chunk - mean`` and ``dematrix``,
    ``axis_mul_or_truediv``, ``clip``."""
    from operator import truediv

    from scanpy._utils import axis_mul_or_truediv, dematrix
    from scanpy.preprocessing._scale import clip

    del clip_at
    if zero_center:
        chunk = dematrix(chunk - mean_row[0])  # upstream's mean block is 1-d
    chunk = axis_mul_or_truediv(chunk, std_row, 1, truediv)
    if max_value is not None:
        chunk = clip(chunk, max_value=max_value, zero_center=zero_center)
    return chunk


def _apply_fast(chunk, std_row, mean_row, *, zero_center, clip_at, max_value):
    from ..patches import _common

    del max_value
    std = std_row[0]
    if std.dtype != np.float64 or (mean_row is not None and mean_row.dtype != np.float64):
        raise Fallback("statistics not float64")
    if _common.is_csr(chunk):
        _check_csr(chunk)
        if zero_center:
            return _densify_csr(chunk, mean_row[0], std, clip_at)
        return _divide_csr(chunk, std, clip_at)
    if isinstance(chunk, np.ndarray) and not isinstance(chunk, np.matrix):
        if chunk.ndim != 2 or chunk.dtype not in _common.FLOATS:
            raise Fallback(f"dense chunk {chunk.dtype} {chunk.ndim}-d")
        if not chunk.flags.c_contiguous:
            # numpy's result follows the input's memory order
            raise Fallback("dense chunk not C-contiguous")
        return _divide_dense(chunk, None if mean_row is None else mean_row[0], std, clip_at)
    raise Fallback(f"{type(chunk).__name__} chunk")


def _clip(values, clip_at, both: bool) -> None:
    """numba's ``clip_array`` in place: above ``clip_at`` becomes ``clip_at``,
    else (``both``) below ``-clip_at`` becomes ``-clip_at``; NaN stays. With
    ``clip_at >= 0`` (``in_scope``) the two tests never both hold.

    For ``clip_at > 0``, numpy's ``minimum`` (``maximum``) gives the same: NaN
    propagates, and a value equal to the bound is the bound (a nonzero bound has
    one sign). At 0 they may pick either signed zero: the masked copy then."""
    if clip_at > 0:
        np.minimum(values, clip_at, out=values)
        if both:
            np.maximum(values, -clip_at, out=values)
        return
    np.copyto(values, clip_at, where=values > clip_at)
    if both:
        np.copyto(values, -clip_at, where=values < -clip_at)


def _divide_csr(chunk, std, clip_at):
    """``data / std.take(indices, mode="clip")`` (f64), clipped from above, in
    blocks; the new matrix shares the chunk's structure (scipy's constructor
    is given the same arrays upstream gives it copies of, so it keeps or narrows
    them the same way)."""
    data, indices = chunk.data, chunk.indices
    out = np.empty(data.shape, dtype=np.result_type(data.dtype, std.dtype))
    step = max(_BLOCK_BYTES // 8, 1)
    for a in range(0, data.size, step):
        b = min(a + step, data.size)
        o = out[a:b]
        np.take(std, indices[a:b], out=o, mode="clip")
        np.true_divide(data[a:b], o, out=o)
        if clip_at is not None:
            _clip(o, clip_at, both=False)
    return type(chunk)((out, chunk.indices, chunk.indptr), shape=chunk.shape)


def _divide_dense(chunk, mean, std, clip_at):
    """``(chunk [- mean]) / std`` (numpy's ufuncs, f64 result), clipped, in row blocks."""
    if mean is None and clip_at is None:
        return np.true_divide(chunk, std)  # upstream's one step: nothing to fuse
    out = np.empty(chunk.shape, dtype=np.result_type(chunk.dtype, std.dtype))
    rows = max(_BLOCK_BYTES // max(out.itemsize * chunk.shape[1], 1), 1)
    for a in range(0, chunk.shape[0], rows):
        b = min(a + rows, chunk.shape[0])
        o = out[a:b]
        if mean is not None:
            np.subtract(chunk[a:b], mean, out=o)
            np.true_divide(o, std, out=o)
        else:
            np.true_divide(chunk[a:b], std, out=o)
        if clip_at is not None:
            _clip(o, clip_at, both=mean is not None)
    return out


def _densify_csr(chunk, mean, std, clip_at):
    """``(chunk.todense() - mean) / std``, clipped both ways: the daemon's
    ``ScaleApply`` (densified in the data's dtype, then f64), written straight
    into a shared-memory segment that becomes the chunk's result (pooled again
    once dask drops it), as the in-memory path does for the whole matrix."""
    from ..codec import msg
    from .. import shm

    out = shm.leased_empty(chunk.shape, np.float64)
    _call_csr(
        lambda m: msg("ScaleApply", x=m, rows=None, mean=mean, std=std, per_row=False,
                      max_value=clip_at, out=shm.ref(out)),
        chunk,
    )
    return out
