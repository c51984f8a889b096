"""sc.pp.normalize_total, verified against scanpy 1.11.5, 1.12.3 and 1.12.4.

Mirrors upstream's steps one for one; only the O(non-zeros) work moves:
- CSR: per-cell sums (f64 accumulation in index order, as upstream's numba
  ``_normalize_csr``), the highly-expressed-gene exclusion and the row division run
  in the daemon over shared memory. The division writes a new data array, as
  upstream's ``x.data = x.data / np.repeat(...)`` does, into a recycled segment.
- dense: numpy's own pairwise row sums and ``true_divide``, on row blocks in
  parallel threads (the summation order is numpy's implementation detail, so
  numpy computes it; 1.12's fast-array-utils ``stats.sum`` is ``np.sum`` here).
Everything O(cells) (median, ``/ target_sum``, the zero guard) is upstream's numpy
expression on the same arrays, so dtypes and rounding follow by construction.

What differs between the versions is declared once, in ``UPSTREAM``: scipy's
sparse arrays (1.12), the median of a CSR input's sums when ``target_sum`` is None
(1.12.4: over the cells with non-zero counts, as the dense path always did), and
how the zero-counts warning names its caller. 1.12's ``obsm`` argument comes with
upstream's signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import parallel, shm, versions
from ..client import DaemonError, get_client, prefault_in_background
from ..codec import msg
from ..dask import is_dask_array
from ..dask import normalize_total as dask_normalize_total
from ..fallback import Delegate, Fallback
from . import _common


@dataclass(frozen=True)
class Upstream:
    sparse_arrays: bool  # csr_array/csc_array input served (1.11.5 fails on them)
    csr_median_of_nonzero: bool  # target_sum=None, CSR: median over cells with counts > 0
    warn_skips_packages: bool  # warnings name the first frame outside scanpy
    dask: bool  # a dask array served by autozyme.dask.normalize_total (graph read from this release)


UPSTREAM = {
    "1.11.5": Upstream(sparse_arrays=False, csr_median_of_nonzero=False, warn_skips_packages=False, dask=False),
    # 1.12.3 differs from 1.12.4 only in the in-memory CSR median (read from its
    # source); its dask path is 1.12.4's.
    "1.12.3": Upstream(sparse_arrays=True, csr_median_of_nonzero=False, warn_skips_packages=True, dask=True),
    "1.12.4": Upstream(sparse_arrays=True, csr_median_of_nonzero=True, warn_skips_packages=True, dask=True),
}
VERIFIED = tuple(UPSTREAM)


def fast(upstream, *args, **kwargs):
    from anndata import AnnData
    from scanpy import logging as logg
    from scanpy._utils import view_to_actual
    from scanpy.get import _get_obs_rep, _set_obs_rep

    up = versions.pick(UPSTREAM)
    adata, p = _common.bind(upstream, _common.keyword_defaults(upstream), args, kwargs)
    target_sum, exclude = p["target_sum"], p["exclude_highly_expressed"]
    max_fraction, key_added, layer = p["max_fraction"], p["key_added"], p["layer"]
    obsm = p.get("obsm")  # a parameter of upstream's signature since 1.12
    inplace, copy = p["inplace"], p["copy"]

    # Scope and error checks first, before anything changes.
    if not isinstance(adata, AnnData):
        raise Delegate(f"{type(adata).__name__} is not an AnnData")
    if copy and not inplace:
        raise Delegate("copy=True with inplace=False")
    if not isinstance(max_fraction, (int, float)) or not 0 <= max_fraction <= 1:
        raise Delegate("max_fraction outside [0, 1]")
    if adata.isbacked:
        raise Fallback("backed AnnData")
    if layer is not None and obsm is not None:
        raise Delegate("both layer and obsm")
    if layer is not None and layer not in adata.layers:
        raise Delegate(f"no layer {layer!r}")
    if obsm is not None and obsm not in adata.obsm:
        raise Delegate(f"no obsm {obsm!r}")
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    if x is None:
        raise Delegate("no X (upstream raises)")
    if is_dask_array(x):
        if not up.dask:
            raise Fallback(f"dask array on scanpy {versions.scanpy_version()}")
        dask_normalize_total.in_scope(x, exclude_highly_expressed=exclude, target_sum=target_sum)
        return dask_normalize_total.normalize_total(
            adata, target_sum=target_sum, key_added=key_added, layer=layer, obsm=obsm,
            inplace=inplace, copy=copy,
        )
    if not (isinstance(x, np.ndarray) and not isinstance(x, np.matrix)) and not (
        _common.is_csr(x) or _common.is_csc(x)
    ):
        raise Fallback(f"{type(x).__name__} input")
    if _common.is_sparse_array(x) and not up.sparse_arrays:
        raise Fallback("scipy sparse array input (upstream 1.11.5 fails on csr_array)")
    if x.ndim != 2:
        raise Fallback(f"{x.ndim}-d input")
    if obsm is not None and exclude and x.shape[1] != adata.n_vars:
        # upstream names the excluded genes from var_names: it may raise
        raise Delegate("exclude_highly_expressed on an obsm entry not n_vars wide")
    _common.check_float_or_int(x)
    if target_sum is not None and not isinstance(target_sum, (int, float, np.floating, np.integer)):
        raise Fallback(f"target_sum of type {type(target_sum).__name__}")

    if copy:
        adata = adata.copy()
    view_to_actual(adata)
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    if _common.is_csc(x):
        x = x.tocsr()
    was_float = x.dtype in _common.FLOATS
    if not inplace and was_float and not _common.is_csr(x):
        x = x.copy()
    if not was_float:
        x = x.astype(np.float32)  # upstream: "TODO: Check if float64 should be used"

    start = logg.info("normalizing counts per cell")
    if _common.is_csr(x):
        # A CSR result never shares buffers with the input: the data array is new
        # and inplace=False gets its own indices/indptr (upstream copies them).
        x, counts_per_cell, highly_expressed = _csr(
            x, exclude, max_fraction, target_sum, own_structure=not inplace and was_float,
            median=_nnz_median if up.csr_median_of_nonzero else np.median,
        )
    else:
        x, counts_per_cell, highly_expressed = _dense(x, exclude, max_fraction, target_sum)

    if exclude:
        logg.info(
            "The following highly-expressed genes are not considered during normalization factor computation:\n"
            f"{adata.var_names[highly_expressed].tolist()}"
        )
    cell_subset = counts_per_cell > 0
    if not np.all(cell_subset):
        # stacklevel (1.11.5's stacklevel=2 from the user's call): the user's
        # call -> autozyme's wrapper -> here.
        _common.warn_like_upstream("Some cells have zero counts", UserWarning,
                                   skip_packages=up.warn_skips_packages, stacklevel=3)

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


def _nnz_median(counts_per_cell):
    """Upstream's ``_compute_nnz_median``: the median of the non-zero sums (NaN,
    with numpy's warnings, when every cell is empty)."""
    return np.median(counts_per_cell[counts_per_cell > 0])


def _factors(counts_per_cell, target_sum):
    """Upstream's ``counts / target_sum`` and ``axis_mul_or_truediv``'s zero guard."""
    counts_per_cell = counts_per_cell / target_sum
    scaling = counts_per_cell.copy() + (counts_per_cell == 0)
    if scaling.dtype not in _common.FLOATS:
        raise Fallback(f"scaling dtype {scaling.dtype}")
    return counts_per_cell, scaling


# Set when the kernel forbids reading this process's memory (Yama ptrace_scope):
# then every input goes through shared memory.
_peer_refused = False


def _csr(x, exclude, max_fraction, target_sum, own_structure, median):
    """Two daemon requests: the per-cell sums, then the division into a new array.

    Where the data lives decides how it travels. Already in shared memory (a
    re-run on an adopted object): nothing is copied, the result goes to a pooled
    segment and the matrix adopts it. Not yet placed, with a pooled segment at
    hand (ours, or lent from the daemon's pool): copied there once and divided in place (that copy is ours alone, so if
    the daemon dies mid-way the user's data is untouched). Not placed and no
    segment at hand (a fresh process): the daemon copies the arrays straight out
    of this process and writes the result into a new numpy array, because
    allocating shared memory costs several times more than the copy; a spare
    segment is then prepared in the background for the next call."""
    global _peer_refused
    _common.check_csr_structure(x)
    peer = not _peer_refused and not shm.is_placed(x.data) and not shm.reserve(x.data.nbytes)
    matrix, data, indices, indptr = _common.csr_refs(x, with_indices=exclude, peer=peer)
    if peer:
        # The new array's pages are populated while the daemon sums (the kernel
        # call releases the GIL); numpy's promotion fixes its dtype beforehand.
        with np.errstate(all="ignore"):  # the probe's 0/0 must not warn
            probe = np.ones(1, x.dtype) / (median(np.ones(1, x.dtype)) if target_sum is None else target_sum)
        out_pending = parallel.submit(shm.private_empty, data.shape, np.result_type(x.data.dtype, probe.dtype))
    client = get_client()
    try:
        reply = client.call(
            msg("RowSums", x=matrix, exclude_max_fraction=float(max_fraction) if exclude else None)
        )
    except DaemonError as e:
        if not peer or e.kind != "Unsupported":
            raise
        _peer_refused = True
        return _csr(x, exclude, max_fraction, target_sum, own_structure, median)
    counts_per_cell = reply.sums.astype(x.dtype)
    highly_expressed = reply.highly_expressed.astype(np.intp)
    if target_sum is None:
        target_sum = median(counts_per_cell)
    counts_per_cell, scaling = _factors(counts_per_cell, target_sum)

    out_dtype = np.result_type(x.data.dtype, scaling.dtype)
    in_place = not peer and data is not x.data and out_dtype == data.dtype
    if peer:
        out = out_pending.result()
        if out.dtype != out_dtype:
            out = shm.private_empty(data.shape, out_dtype)
    else:
        out = data if in_place else shm.empty(data.shape, out_dtype)
    client.call(
        msg("DivideRows", x=matrix, factors=scaling.astype(np.float64),
            factors_dtype=shm.dtype_tag(scaling.dtype),
            out=shm.peer_ref(out) if peer else shm.ref(out)),
        retry=not in_place,  # dividing twice would be wrong
    )
    if own_structure:
        # inplace=False: a new matrix whose buffers are its own (upstream copies).
        new = type(x)(x.shape, dtype=out.dtype)
        # Assigned after construction: the constructor could narrow int64 indices,
        # while upstream's copy keeps the input's index dtypes.
        new.data = out
        new.indices = x.indices.copy() if indices is None or indices is x.indices else indices
        new.indptr = x.indptr.copy() if indptr is x.indptr else indptr
        x = new
    elif peer:
        x.data = out
    else:
        _common.adopt_csr(x, data=out, indices=indices, indptr=indptr)
    # The next call (a re-run, or this data again) gets a segment ready for it.
    shm.ensure_spare(out.nbytes, on_ready=prefault_in_background)
    return x, counts_per_cell, highly_expressed


def _dense(x, exclude, max_fraction, target_sum):
    n_rows = x.shape[0]
    row_bytes = max(1, x.shape[1] * x.dtype.itemsize)
    # Row blocks keep numpy's per-row (pairwise) summation order only where rows
    # are contiguous; any other layout (an F-ordered obsm entry) is one block,
    # upstream's own whole-array calls.
    bounds = parallel.blocks(n_rows, row_bytes) if x.flags.c_contiguous else [(0, n_rows)]
    counts_per_cell = np.empty(n_rows, dtype=np.sum(x[:0], axis=1).dtype)

    def sums(a, b):
        counts_per_cell[a:b] = np.sum(x[a:b], axis=1)

    parallel.run_blocks(sums, bounds)
    highly_expressed = np.empty(0, dtype=np.intp)
    if exclude:
        hi = np.zeros(x.shape[1], dtype=bool)
        hi_parts = []

        def flag(a, b):
            hi_parts.append(np.any(x[a:b] > counts_per_cell[a:b, None] * max_fraction, axis=0))

        parallel.run_blocks(flag, bounds)
        for part in hi_parts:
            hi |= part
        gene_subset = ~hi
        highly_expressed = np.flatnonzero(hi)

        def subset_sums(a, b):
            counts_per_cell[a:b] = np.sum(x[a:b][:, gene_subset], axis=1)

        parallel.run_blocks(subset_sums, bounds)
    if target_sum is None:
        target_sum = _nnz_median(counts_per_cell)
    counts_per_cell, scaling = _factors(counts_per_cell, target_sum)

    def divide(a, b):
        np.true_divide(x[a:b], scaling[a:b, None], out=x[a:b])

    parallel.run_blocks(divide, bounds)
    return x, counts_per_cell, highly_expressed
