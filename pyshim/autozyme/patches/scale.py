"""sc.pp.scale, verified against scanpy 1.11.5, 1.12.3 and 1.12.4.

Upstream's steps, one for one; the O(cells x genes) work moves to the daemon:
1. per-gene sums and sums of squares (``ScaleStats``), accumulated in f64 in
   exactly upstream's order: scanpy's numba kernel for CSR (rows dealt
   round-robin to ``numba.get_num_threads()`` parts, which the shim reads here),
   its per-column kernel for CSC, numpy's row-by-row ``mean(axis=0)`` for dense;
2. mean, variance (ddof 1), ``std`` and the ``std == 0`` guard: upstream's own
   numpy expressions, here, on O(genes) arrays (same bits, same warnings);
3. one fused pass (``ScaleApply``) that centres, divides and clips, writing the
   dense result straight into a shared-memory segment that becomes the new ``X``
   (or, for dense data already in shared memory, in place, as upstream).
Sparse data without centring stays sparse: its stored values are divided and
clipped with numpy here, as upstream's numba kernel does (same promotion, same
NaN rule), on parallel blocks.

1.12 computes the statistics with fast-array-utils' ``mean_var(x, axis=0,
correction=1)`` instead of scanpy's ``_get_mean_var``: the same numba kernels
(rows dealt round-robin to ``numba.get_num_threads()`` parts, f64 sums of values
and of their squares in the data's dtype), the same numpy sums for dense data
(``sum(dtype=float64) / n``, which is what ``mean(dtype=float64)`` computed) and
the same ``n / (n - 1)`` correction, so the arithmetic is shared. What differs
is declared once, in ``UPSTREAM``: scipy's sparse arrays (1.12) and how the
densifying warning names its caller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .. import parallel, shm, versions
from ..client import DaemonError, get_client
from ..codec import msg
from ..fallback import Delegate, Fallback, Interrupted
from ..runtime import DaemonUnavailable
from ..dask import is_dask_array
from ..dask import scale as dask_scale
from . import _common


@dataclass(frozen=True)
class Upstream:
    sparse_arrays: bool  # csr_array/csc_array input (1.11.5 raises NotImplementedError)
    warn_skips_packages: bool  # warnings name the first frame outside scanpy
    # dask arrays served (autozyme.dask.scale): the graph of scanpy's scale_array,
    # fast-array-utils' dask mean_var and scanpy's axis_mul_or_truediv, as read
    # on this release's stack.
    dask: bool


UPSTREAM = {
    "1.11.5": Upstream(sparse_arrays=False, warn_skips_packages=False, dask=False),
    # 1.12.3's _scale.py is 1.12.4's, byte for byte; its stack's dask graph
    # (fast-array-utils, scanpy._utils) has not been read: no dask there.
    "1.12.3": Upstream(sparse_arrays=True, warn_skips_packages=True, dask=False),
    "1.12.4": Upstream(sparse_arrays=True, warn_skips_packages=True, dask=True),
}
VERIFIED = tuple(UPSTREAM)
_EXACT_INT = 2**53


class ScaleInterrupted(Interrupted):
    """The daemon failed while scaling the user's array in place (in shared
    memory): falling back would run upstream on partly scaled data."""


def fast(upstream, *args, **kwargs):
    from anndata import AnnData

    data, p = _common.bind(upstream, _common.keyword_defaults(upstream), args, kwargs)
    if isinstance(data, AnnData):
        return _anndata(data, **p)
    return _array(data, **p)


def _max_value(max_value):
    if max_value is None:
        return None
    if isinstance(max_value, (bool, np.bool_)):
        raise Fallback("boolean max_value")
    if isinstance(max_value, (int, np.integer)):
        if abs(int(max_value)) > _EXACT_INT:
            raise Fallback("integer max_value beyond 2**53")
        return float(max_value)
    if isinstance(max_value, (float, np.floating)):
        return float(max_value)  # exact for float16/32/64
    raise Fallback(f"max_value of type {type(max_value).__name__}")


def _check_scope(x, zero_center, max_value):
    """Input types the fast path serves; returns (dense, zero_center, clip_at)."""
    up = versions.pick(UPSTREAM)
    if not isinstance(zero_center, (bool, np.bool_)):
        raise Fallback(f"zero_center of type {type(zero_center).__name__}")
    clip_at = _max_value(max_value)
    if zero_center and isinstance(max_value, (int, np.integer)) and max_value == 0:
        # Upstream's lower bound is the integer -0, so clipped values become +0.0;
        # the fast path's bound is the float -0.0. Rare enough to hand to upstream.
        raise Fallback("integer max_value=0 with zero_center (upstream clips to +0.0)")
    dense = isinstance(x, np.ndarray) and not isinstance(x, np.matrix)
    if not dense and not (_common.is_csr(x) or _common.is_csc(x)):
        raise Fallback(f"{type(x).__name__} input")
    if _common.is_sparse_array(x) and not up.sparse_arrays:
        raise Fallback("scipy sparse array input (upstream 1.11.5 has no scale for them)")
    if x.ndim != 2:
        raise Fallback(f"{x.ndim}-d input")
    _common.check_float_or_int(x)
    if not dense:
        _common.check_csr_structure(x)
    return dense, bool(zero_center), clip_at


def _check_selection(x, mask, dense, zero_center):
    """The mask as upstream's ``_check_mask`` returned it; the selected rows."""
    if mask is None:
        rows = None
    else:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 1:
            raise Fallback(f"mask_obs of type {type(mask).__name__}")
        if not dense and zero_center:
            raise Fallback("sparse input with mask_obs and zero_center (upstream writes rows into the sparse matrix)")
        rows = np.flatnonzero(mask)
    if (x.shape[0] if rows is None else rows.size) == 0:
        raise Fallback("no cells selected")
    return rows


def _scale_array(x, *, zero_center, clip_at, max_value, mask, rows, in_place):
    """upstream's ``scale_array``: returns (result, mean, std). ``in_place``: a
    dense float input must itself hold the result, as upstream's ``x -= mean``
    leaves it (else the result may be a new, segment-backed array)."""
    from scanpy import logging as logg

    if not zero_center and max_value is not None:
        logg.info("... be careful when using `max_value` without `zero_center`.")
    if np.issubdtype(x.dtype, np.integer):
        logg.info(
            "... as scaling leads to float results, integer "
            "input is cast to float, returning copy."
        )
        x = _as_float64(x)
        in_place = False
    if isinstance(x, np.ndarray):
        return _dense(x, rows, mask, zero_center, clip_at, in_place=in_place)
    if zero_center:
        return _sparse_centred(x, clip_at)
    return _sparse_uncentred(x, mask, rows, clip_at)


def _array(x, *, zero_center, max_value, copy, layer, obsm, mask_obs):
    """``sc.pp.scale(array)``: upstream's ``scale_array`` without mean and std."""
    from scanpy.get import _check_mask

    if layer is not None or obsm is not None:
        raise Delegate("layer or obsm given with an array (upstream raises)")
    if is_dask_array(x):
        zero_center, clip_at = _check_dask_scope(x, zero_center, max_value, mask_obs)
        x, _, _ = dask_scale.scale_dask(x, zero_center=zero_center, clip_at=clip_at,
                                        max_value=max_value, compute_stats=False,
                                        warn=_warn_densifies)
        return x
    dense, zero_center, clip_at = _check_scope(x, zero_center, max_value)
    mask = None
    if mask_obs is not None:
        try:
            mask = _check_mask(x, mask_obs, "obs")
        except Exception as e:  # noqa: BLE001 - upstream raises its own error
            raise Delegate(f"bad mask_obs: {e}") from None
    rows = _check_selection(x, mask, dense, zero_center)
    if copy and not np.issubdtype(x.dtype, np.integer):  # integers: cast to a new array anyway
        x = _copy(x) if dense else x.copy()
    x, _, _ = _scale_array(x, zero_center=zero_center, clip_at=clip_at, max_value=max_value,
                           mask=mask, rows=rows, in_place=not copy)
    return x


def _copy(x):
    """``x.copy()`` (same memory order), in a segment."""
    f_order = not x.flags.c_contiguous and x.flags.f_contiguous
    if not (x.flags.c_contiguous or f_order):
        return x.copy()
    c = x.T if f_order else x
    placed = shm.leased_empty(c.shape, c.dtype)
    _copy_into(placed, c)
    return placed.T if f_order else placed


def _copy_into(dst, src):
    """``np.copyto(dst, src)`` for equal-shaped C-contiguous arrays, in blocks."""
    d, s = dst.reshape(-1), src.reshape(-1)
    parallel.run_blocks(lambda a, b: np.copyto(d[a:b], s[a:b], casting="unsafe"),
                        parallel.blocks(d.size, d.itemsize))


def _anndata(adata, *, zero_center, max_value, copy, layer, obsm, mask_obs):
    from scanpy._utils import view_to_actual
    from scanpy.get import _check_mask, _get_obs_rep, _set_obs_rep

    # Scope and error checks first, before anything changes.
    if adata.isbacked:
        raise Fallback("backed AnnData")
    if layer is not None and obsm is not None:
        raise Delegate("both layer and obsm")
    if layer is not None and layer not in adata.layers:
        raise Delegate(f"no layer {layer!r}")
    if obsm is not None and obsm not in adata.obsm:
        raise Delegate(f"no obsm {obsm!r}")
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    if is_dask_array(x):
        return _dask_anndata(adata, x, zero_center=zero_center, max_value=max_value, copy=copy,
                             layer=layer, obsm=obsm, mask_obs=mask_obs)
    dense, zero_center, clip_at = _check_scope(x, zero_center, max_value)
    if obsm is not None and x.shape[1] != adata.n_vars:
        raise Delegate("obsm width differs from n_vars (upstream raises writing var)")
    if mask_obs is not None:
        try:
            mask = _check_mask(adata, mask_obs, "obs")
        except Exception as e:  # noqa: BLE001 - upstream raises its own error
            raise Delegate(f"bad mask_obs: {e}") from None
        if isinstance(mask_obs, str):
            keys = (f"mean of {mask_obs}", f"std of {mask_obs}")
        else:
            keys = ("mean with mask", "std with mask")
    else:
        mask, keys = None, ("mean", "std")
    if mask is None and _common.is_csr(x) and not zero_center:
        mask = np.ones(x.shape[0], dtype=np.bool_)  # upstream's default for CSR
    rows = _check_selection(x, mask, dense, zero_center)

    adata = adata.copy() if copy else adata
    view_to_actual(adata)
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    x, mean, std = _scale_array(x, zero_center=zero_center, clip_at=clip_at, max_value=max_value,
                                mask=mask, rows=rows, in_place=True)
    adata.var[keys[0]] = mean
    adata.var[keys[1]] = std
    _set_obs_rep(adata, x, layer=layer, obsm=obsm)
    return adata if copy else None


def _check_dask_scope(x, zero_center, max_value, mask_obs):
    """A dask array autozyme serves; returns (zero_center, clip_at)."""
    if not versions.pick(UPSTREAM).dask:
        raise Fallback(f"dask array on scanpy {versions.scanpy_version()}")
    if not isinstance(zero_center, (bool, np.bool_)):
        raise Fallback(f"zero_center of type {type(zero_center).__name__}")
    clip_at = _max_value(max_value)
    dask_scale.in_scope(x, zero_center=zero_center, clip_at=clip_at, max_value=max_value,
                        mask_obs=mask_obs)
    return bool(zero_center), clip_at


def _warn_densifies():
    # stacklevel (1.11.5-style warnings only): the user's call -> autozyme's
    # wrapper -> fast -> _anndata -> _dask_anndata -> scale_dask -> here.
    _common.warn_like_upstream("zero-centering a sparse array/matrix densifies it.", UserWarning,
                               skip_packages=versions.pick(UPSTREAM).warn_skips_packages,
                               stacklevel=7)


def _dask_anndata(adata, x, *, zero_center, max_value, copy, layer, obsm, mask_obs):
    """upstream's ``scale_anndata`` on a dask array: ``X`` stays lazy; mean and std
    are computed when assigned to ``adata.var`` (pandas computes upstream's)."""
    from scanpy._utils import view_to_actual
    from scanpy.get import _get_obs_rep, _set_obs_rep

    zero_center, clip_at = _check_dask_scope(x, zero_center, max_value, mask_obs)
    if obsm is not None and x.shape[1] != adata.n_vars:
        raise Delegate("obsm width differs from n_vars (upstream raises writing var)")
    adata = adata.copy() if copy else adata
    view_to_actual(adata)
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    x, mean, std = dask_scale.scale_dask(x, zero_center=zero_center, clip_at=clip_at,
                                         max_value=max_value, compute_stats=True,
                                         warn=_warn_densifies)
    adata.var["mean"] = mean
    adata.var["std"] = std
    _set_obs_rep(adata, x, layer=layer, obsm=obsm)
    return adata if copy else None


def _as_float64(x):
    if isinstance(x, np.ndarray):
        f_order = not x.flags.c_contiguous and x.flags.f_contiguous
        c = x.T if f_order else x
        out = shm.leased_empty(c.shape, np.float64)
        if c.flags.c_contiguous:
            _copy_into(out, c)
        else:
            np.copyto(out, c, casting="unsafe")
        return out.T if f_order else out
    return x.astype(np.float64)


def _finish_stats(sums, sq_sums, n, *, squares_of_means: bool, numba: bool):
    """Upstream's mean, var (ddof 1) and std from f64 sums, with its guard.

    Non-finite sums (NaN or infinite values, or squares overflowing) go to
    upstream: its numpy steps warn in places the daemon's sums cannot tell."""
    if not (np.isfinite(sums).all() and np.isfinite(sq_sums).all()):
        raise Fallback("non-finite values (upstream's own warnings and results)")
    with np.errstate(all="ignore") if numba else contextlib.nullcontext():
        mean = sums / n
        if squares_of_means:
            # numba minor-axis kernel and numpy: sq / n - (s / n) ** 2
            var = sq_sums / n - mean**2
        else:
            # numba major-axis kernel: sq / n - mean * mean
            var = sq_sums / n - mean * mean
        if n != 1:
            var *= n / (n - 1)
    std = np.sqrt(var)
    std[std == 0] = 1
    return mean, std


def _numpy_mean_var(x):
    """Upstream's dense mean and variance (ddof 1), by numpy itself: the f64 sum
    of the values and of their squares (squared in the data's dtype) over ``n``
    (1.11.5's ``mean(axis=0, dtype=float64)`` divides the same sum by the same
    ``n``; 1.12's ``mean_var`` is this expression), then the ``n / (n - 1)``
    correction."""
    n = x.shape[0]
    mean = np.sum(x, axis=0, dtype=np.float64) / n
    var = np.sum(np.multiply(x, x), axis=0, dtype=np.float64) / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    return mean, var


def _dense_stats(matrix, n, rows=None):
    """numpy's ``mean(axis=0, dtype=float64)`` of the values and of their
    squares (row by row, per column), from the daemon."""
    reply = get_client().call(
        msg(
            "ScaleStats",
            x=matrix,
            rows=None if rows is None else rows.astype(np.uint64),
            partitions=1,
            along_rows=False,
        )
    )
    return _finish_stats(reply.sums, reply.sq_sums, n, squares_of_means=True, numba=False)


def _apply(matrix, out_ref, *, rows=None, mean=None, std, per_row=False, clip_at, retry=True):
    get_client().call(
        msg(
            "ScaleApply",
            x=matrix,
            rows=None if rows is None else rows.astype(np.uint64),
            mean=mean,
            std=std,
            per_row=per_row,
            max_value=clip_at,
            out=out_ref,
        ),
        retry=retry,
    )


def _dense(x, rows, mask, zero_center, clip_at, *, in_place):
    """Dense data: upstream changes ``x`` in place. The daemon works in shared
    memory: in ``x`` itself when it already lies there (a re-run on a result),
    else in a segment-backed copy (same memory order), whose values are then
    copied back into ``x`` when ``in_place`` (upstream's ``x`` is the same object
    afterwards, and whoever else holds it sees the change), or which is the
    result. An F-ordered matrix (upstream's result for CSC input) goes as its
    C-ordered transpose, with the statistics per row."""
    if x.dtype not in _common.FLOATS:
        raise Fallback(f"dtype {x.dtype}")
    f_order = not x.flags.c_contiguous and x.flags.f_contiguous
    if not (x.flags.c_contiguous or f_order):
        raise Fallback("dense input that is neither C- nor F-contiguous")
    if f_order and mask is not None:
        raise Fallback("F-ordered dense input with mask_obs")
    if in_place and not x.flags.writeable:
        raise Delegate("read-only array (upstream raises)")
    original = x
    if not shm.is_placed(x):
        x = _copy(x)
    n = x.shape[0] if rows is None else rows.size
    if f_order or x.shape[1] == 1:
        # numpy sums these columns pairwise (contiguous along the reduced axis),
        # not row by row: numpy computes the statistics, as upstream.
        mean, var = _numpy_mean_var(x if mask is None else x[mask])
        std = np.sqrt(var)
        std[std == 0] = 1
    else:
        matrix = msg("Dense", n_rows=x.shape[0], n_cols=x.shape[1], data=shm.ref(x))
        mean, std = _dense_stats(matrix, n, rows)
    c = x.T if f_order else x
    matrix = msg("Dense", n_rows=c.shape[0], n_cols=c.shape[1], data=shm.ref(c))
    try:
        _apply(matrix, shm.ref(c), rows=rows, mean=mean if zero_center else None, std=std,
               per_row=f_order, clip_at=clip_at, retry=False)  # in place: never twice
    except (DaemonError, DaemonUnavailable) as e:
        if x is original:
            # The user's own array may be partly scaled: upstream must not run on it.
            raise ScaleInterrupted(
                f"autozyme: the daemon failed while scaling the data in place ({e}); "
                "the array may be partly scaled"
            ) from e
        raise  # only our copy was touched: upstream runs on the intact input
    if in_place and x is not original:
        _copy_into(original.T if f_order else original, c)
        return original, mean, std
    return x, mean, std


def _sparse_refs(x):
    """The CSR's wire matrix: from shared memory when already placed, else read
    by the daemon straight from this process's memory."""
    placed = shm.is_placed(x.data) and shm.is_placed(x.indices) and shm.is_placed(x.indptr)
    peer = not placed and not shm.peer_reads_refused()
    # The arrays are the shared-memory copies when the matrix was placed here:
    # the caller holds them until the reply, or their segments could be reused
    # (and overwritten) before the daemon has read them.
    matrix, *arrays = _common.csr_refs(x, with_indices=True, peer=peer)
    return matrix, peer, arrays


def _call_sparse(make_request, x):
    """Send a request over ``x``'s buffers, retrying through shared memory when
    the kernel refuses peer-memory access."""
    matrix, peer, keep = _sparse_refs(x)
    try:
        return get_client().call(make_request(matrix))
    except DaemonError as e:
        if not peer or e.kind != "Unsupported":
            raise
        shm.refuse_peer_reads()
        matrix, _, keep = _sparse_refs(x)
        return get_client().call(make_request(matrix))
    finally:
        del keep


def _sparse_stats(x, rows=None):
    """Upstream's ``_get_mean_var`` of a CSR (numba, per thread parts) or CSC
    (per column) matrix; ``rows`` selects CSR rows (``x[mask_obs, :]``)."""
    import numba

    if _common.is_csc(x):
        # The CSC's columns are the rows of its transpose, a CSR matrix.
        t = x.T
        reply = _call_sparse(
            lambda m: msg("ScaleStats", x=m, rows=None, partitions=1, along_rows=True), t
        )
        return _finish_stats(reply.sums, reply.sq_sums, x.shape[0], squares_of_means=False, numba=True)
    n = x.shape[0] if rows is None else rows.size
    reply = _call_sparse(
        lambda m: msg(
            "ScaleStats",
            x=m,
            rows=None if rows is None else rows.astype(np.uint64),
            partitions=int(numba.get_num_threads()),
            along_rows=False,
        ),
        x,
    )
    return _finish_stats(reply.sums, reply.sq_sums, n, squares_of_means=True, numba=True)


def _sparse_centred(x, clip_at):
    """Sparse, centred: upstream densifies (``x.todense() - mean``, f64; F-ordered
    for CSC). The daemon writes the centred, scaled, clipped rows straight into
    a segment, which becomes the new matrix."""
    csc = _common.is_csc(x)
    c = x.T if csc else x  # a CSC matrix's transpose is CSR, genes as rows
    # The output segment is leased and mapped while the daemon sums.
    pending = parallel.submit(shm.leased_empty, c.shape, np.float64)
    try:
        mean, std = _sparse_stats(x)
    finally:
        out = pending.result()
    # stacklevel: the user's call -> autozyme's wrapper -> fast -> _anndata or
    # _array -> _scale_array -> here.
    _common.warn_like_upstream("zero-centering a sparse array/matrix densifies it.", UserWarning,
                               skip_packages=versions.pick(UPSTREAM).warn_skips_packages, stacklevel=6)
    _call_sparse(
        lambda m: msg("ScaleApply", x=m, rows=None, mean=mean, std=std, per_row=csc,
                      max_value=clip_at, out=shm.ref(out)),
        c,
    )
    return (out.T if csc else out), mean, std


def _sparse_uncentred(x, mask, rows, clip_at):
    """Sparse, not centred: stays sparse, as upstream.

    CSR (and CSC with a mask, converted to CSR as upstream): upstream's numba
    ``scale_and_clip_csr`` divides the selected rows' stored values in place:
    ``min(max_value, v / std)`` in f64 (a NaN quotient becomes ``max_value``),
    rounded to the data's dtype. CSC without a mask: ``data / std[indices]``, a
    new f64 data array, then clipped from above."""
    if _common.is_csc(x) and mask is None:
        mean, std = _sparse_stats(x)
        q = np.empty(x.data.shape, np.float64)
        # upstream: the transpose's rows scaled, `np.repeat(std, np.diff(indptr))`
        per_value = np.repeat(std, np.diff(x.indptr))
        _blocks(lambda a, b: np.true_divide(x.data[a:b], per_value[a:b], out=q[a:b]), q.size)
        if clip_at is not None:
            _blocks(lambda a, b: np.copyto(q[a:b], clip_at, where=q[a:b] > clip_at), q.size)
        # A new matrix sharing the structure (upstream's `x.T` ... `.T`); the
        # input keeps its values.
        new = type(x)(x.shape, dtype=np.float64)
        new.data, new.indices, new.indptr = q, x.indices, x.indptr
        return new, mean, std
    if _common.is_csc(x):
        x = x.tocsr()
    if rows is not None and rows.size == x.shape[0]:
        rows = None  # every row (upstream's default all-true mask for CSR)
    mean, std = _sparse_stats(x, rows)
    data, indices = x.data, x.indices
    selected = None if rows is None else np.repeat(mask, np.diff(x.indptr))

    def block(a, b):
        q = data[a:b] / std[indices[a:b]]
        if clip_at is not None:
            q = np.where(q < clip_at, q, clip_at)  # numba's min(max_value, q)
        if selected is None:
            data[a:b] = q
        else:
            np.copyto(data[a:b], q, casting="unsafe", where=selected[a:b])

    _blocks(block, data.size)
    return x, mean, std


def _blocks(fn, n):
    parallel.run_blocks(fn, parallel.blocks(n, 8))
