"""sc.pp.highly_variable_genes(flavor="seurat_v3" | "seurat_v3_paper"), verified
against scanpy 1.11.5 and 1.12.4.

Upstream computes per-gene means and variances of all cells and of every batch,
fits a loess per batch (scikit-misc) and then sums the clipped values and their
squares per batch. Here the O(stored values) work runs in the daemon, over the
matrix placed once in shared memory, without copying any batch:

1. ``HvgMeanVar``: means and variances of all cells (and, as scanpy 1.11.5
   computes them, of every batch) in upstream's order of additions (CSR: numba's
   kernel, whose rows are dealt to ``numba.get_num_threads()`` accumulators;
   dense: numpy's row-order sums), and a check of every value (negative /
   non-integer / non-finite) that replaces ``check_nonnegative_integers``. For
   non-negative integer counts every sum is exact in any order, so all cells'
   sums are the batches' sums added up (one pass instead of two).
2. ``HvgBatchWelford`` (scanpy 1.12.2 and later, with a ``batch_key``): each
   batch's means and variances as ``sc.get.aggregate(func=["mean", "var"])``
   computes them, by Welford's algorithm (dense: over every value; sparse: over
   the stored values, then the implicit zeros merged in closed form), in the
   same operations and order as its numba kernels; the ``n / (n - 1)`` scaling
   (NaN and upstream's warning for a one-cell batch) is upstream's numpy
   expression here. Loess turns a last-bit difference into another selection.
3. ``HvgClippedSums``: per batch and gene, the sums of the values clipped to the
   batch's clip values and of their squares, in upstream's order; with batches,
   one request per batch on a second connection, sent as soon as that batch's
   loess fit is done, so the daemon works while the next fit runs here.

What differs between the scanpy versions is declared once, in ``UPSTREAM``
(which batch statistics, the 1.12.1 guard that skips loess for a batch in which
no gene varies, sparse arrays, how upstream decides its numba kernels run
serially, where its warnings point, the AnnData upstream 1.12 builds of the
names); the code branches on the picked record's fields only.

CSC input (canonical: sorted indices, no duplicates) is served through a CSR
copy: upstream's CSC kernels add each gene's values in row order with a single
accumulator and f64 squares, which the CSR kernels reproduce with one partition
on f64 values. int32/int64 counts are served through an f64 copy where every
square fits the integer type and every sum stays below 2^53 (then each of
upstream's operations gives the same value on the copy).

A result is kept (the last ``KEPT_RESULTS``, in this process) under the daemon's
fingerprint of the matrix's content plus every input that shapes it (batches,
flavor, ``n_top_genes``, ``span``, numba's thread count): the same cell run again,
or on a fresh copy of the same data, gets a copy of it after one hashing pass
over the matrix, instead of the statistics and seven loess fits again. The
computation is deterministic, so a kept result is the one it would compute.
``AUTOZYME_HVG_CACHE=0`` turns this off. Results whose computation warns (a
batch of one cell) are not kept, so every call warns as upstream does.

The loess fits run here with scikit-misc exactly as upstream calls it (same
inputs, same routine, so the same fitted values, errors and warnings; it holds
the GIL, so fits cannot run in parallel threads). Everything O(genes) after
that (normalized variances, ranks, median rank, sorting, the DataFrame and the
``var`` columns) is upstream's numpy/pandas expression on the same arrays, so
dtypes and bits follow by construction.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import inspect
import os
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from .. import parallel, shm, versions
from ..client import get_client, prefault_in_background
from ..codec import msg
from ..dask import is_dask_array
from ..fallback import BadInput, Delegate, Fallback
from . import _common


@dataclass(frozen=True)
class Upstream:
    """What differs, for these flavors, between the scanpy versions served."""

    # With a batch_key, each batch's means and variances: "sums" (1.11.5:
    # `_get_mean_var` of the batch's rows, as for all cells) or "welford" (1.12.2+:
    # `sc.get.aggregate`'s Welford kernels, then `var *= n / (n - 1)` in numpy,
    # NaN with a RuntimeWarning for a one-cell batch).
    batch_stats: str
    # 1.12.1+: a batch in which no gene varies skips loess (estimates stay 0);
    # before, scikit-misc crashes the process on it (we raise BadInput).
    loess_skips_no_variance: bool
    # 1.12+ take scipy sparse arrays (csr_array, csc_array).
    sparse_arrays: bool
    # Predicates (module, name) under which upstream's numba kernels run serially
    # with a warning; we leave such calls to upstream.
    serial_numba: tuple[tuple[str, str], ...]
    # Whether upstream's numba kernels (and so `serial_numba`) are used for a dense
    # matrix with a batch_key (1.12: aggregate's kernels), not only for sparse input.
    numba_for_dense_batches: bool
    # Where upstream's warnings point: "stacklevel" (1.11.5: warnings.warn with
    # stacklevel=3 from the seurat_v3 helper) or "skip_prefixes" (1.12: scanpy's
    # `warn`, skipping scanpy's and legacy_api_wrap's frames).
    warning_site: str
    # 1.12 builds AnnData objects of adata's obs and var names (for aggregate),
    # which warn when the names are not unique.
    anndata_of_names: bool
    # A row-chunked dask array is served (autozyme.dask.highly_variable_genes
    # rebuilds 1.12.4's dask graph); 1.11.5's dask path is not reproduced.
    dask: bool


UPSTREAM = {
    "1.11.5": Upstream(
        batch_stats="sums",
        loess_skips_no_variance=False,
        sparse_arrays=False,
        serial_numba=(("scanpy._compat", "_is_in_unsafe_thread_pool"),),
        numba_for_dense_batches=False,
        warning_site="stacklevel",
        anndata_of_names=False,
        dask=False,
    ),
    "1.12.4": Upstream(
        batch_stats="welford",
        loess_skips_no_variance=True,
        sparse_arrays=True,
        serial_numba=(
            ("fast_array_utils.numba", "_is_on_unsafe_thread"),
            ("fast_array_utils.numba._parallel_runtime", "_needs_parallel_runtime_probe"),
        ),
        numba_for_dense_batches=True,
        warning_site="skip_prefixes",
        anndata_of_names=True,
        dask=True,
    ),
}
VERIFIED = tuple(UPSTREAM)
FLAVORS = ("seurat_v3", "seurat_v3_paper")
KEPT_RESULTS = 4


def fast(upstream, *args, **kwargs):
    from anndata import AnnData
    from scanpy import logging as logg

    up = versions.pick(UPSTREAM)
    adata, p = _common.bind(upstream, _common.keyword_defaults(upstream), args, kwargs)
    flavor = p["flavor"]
    if not isinstance(adata, AnnData):
        raise Delegate(f"{type(adata).__name__} is not an AnnData")
    if not isinstance(flavor, str):
        raise Delegate(f"flavor of type {type(flavor).__name__}")
    if flavor not in FLAVORS:
        raise Fallback(f"flavor {flavor!r}")
    try:
        from skmisc.loess import loess
    except ImportError as e:
        raise Delegate("scikit-misc is not installed") from e
    layer, batch_key = p["layer"], p["batch_key"]
    if adata.isbacked:
        raise Fallback("backed AnnData")
    if layer is not None and layer not in adata.layers:
        raise Delegate(f"no layer {layer!r}")
    if batch_key is not None and batch_key not in adata.obs.columns:
        raise Delegate(f"no obs column {batch_key!r}")
    if up.anndata_of_names and not (adata.obs_names.is_unique and adata.var_names.is_unique):
        raise Fallback("obs or var names that are not unique (upstream's AnnData of them warns)")
    n_top_genes = p["n_top_genes"]
    if n_top_genes is None:
        n_top_genes = _default_n_top_genes()

    from scanpy.get import _get_obs_rep

    data = _get_obs_rep(adata, layer=layer)
    if is_dask_array(data):
        if not up.dask:
            raise Fallback(f"dask array on scanpy {versions.scanpy_version()}")
        from ..dask import highly_variable_genes as dask_hvg

        start = logg.info("extracting highly variable genes")  # noqa: F841 (as upstream)
        result = dask_hvg.compute(
            adata, data, loess, up=up, flavor=flavor, batch_key=batch_key,
            n_top_genes=n_top_genes, check_values=p["check_values"], span=p["span"],
        )
        return _finish(adata, result, flavor=flavor, batch_key=batch_key, subset=p["subset"],
                       inplace=p["inplace"])
    batched = batch_key is not None
    kind, work, partitions = _in_scope(data, up, batched)
    codes, n_batches, sizes, labels = _batches(adata, batch_key)
    dof_warning = None
    if batched and up.batch_stats == "welford":
        dof_warning = _aggregate_dof_warning(adata.obs[batch_key], sizes)

    start = logg.info("extracting highly variable genes")  # noqa: F841 (as upstream)
    result = _compute(
        work, kind, loess, up=up, codes=codes, n_batches=n_batches, sizes=sizes,
        labels=labels, batched=batched, dof_warning=dof_warning, flavor=flavor,
        n_top_genes=n_top_genes, check_values=p["check_values"], span=p["span"],
        partitions=partitions, var_names=adata.var_names,
        adopt=work is data and not adata.is_view,
    )
    return _finish(adata, result, flavor=flavor, batch_key=batch_key, subset=p["subset"],
                   inplace=p["inplace"])


@functools.lru_cache(maxsize=1)
def _default_n_top_genes() -> int:
    from scanpy.preprocessing._highly_variable_genes import _highly_variable_genes_seurat_v3

    return inspect.signature(_highly_variable_genes_seurat_v3).parameters["n_top_genes"].default


def _in_scope(data, up: Upstream, batched: bool):
    """(kind, matrix to compute on, partitions) for inputs the fast path serves,
    else Fallback. kind is 'csr' or 'dense'; partitions is the number of
    accumulators upstream's sparse all-cells kernel uses (None: numba's thread
    count, the CSR kernel's)."""
    import numba

    if isinstance(data, np.ndarray) and not isinstance(data, np.matrix):
        if data.dtype in INTEGERS and data.ndim == 2 and data.flags.c_contiguous:
            data = _integers_as_f64(data, data, data.shape[0])
        if data.dtype not in _common.FLOATS:
            raise Fallback(f"dtype {data.dtype}")
        if data.ndim != 2 or not data.flags.c_contiguous:
            raise Fallback("dense input that is not a C-contiguous matrix")
        if data.shape[1] < 2:
            # numpy sums a single column pairwise, not row by row.
            raise Fallback("dense input with fewer than two genes")
        if batched and up.numba_for_dense_batches:
            _check_numba_parallel(up)
        return "dense", data, None
    if not (_common.is_csr(data) or _common.is_csc(data)):
        raise Fallback(f"{type(data).__name__} input")
    if _common.is_sparse_array(data) and not up.sparse_arrays:
        raise Fallback(f"{type(data).__name__} input")
    _common.check_csr_structure(data)
    if data.dtype in INTEGERS:
        data = _integers_as_f64(data, data.data, data.shape[0])
    if data.dtype not in _common.FLOATS:
        raise Fallback(f"dtype {data.dtype}")
    if data.indptr.dtype not in _common.INDEX or data.indices.dtype not in _common.INDEX:
        raise Fallback(f"index dtype {data.indices.dtype}/{data.indptr.dtype}")
    _check_numba_parallel(up)
    if _common.is_csr(data):
        return "csr", data, int(numba.get_num_threads())
    # CSC: upstream adds each gene's values in stored order (row order for a
    # canonical matrix) into one accumulator, squaring in f64; a CSR copy in f64
    # with one partition does exactly that.
    if not data.has_canonical_format:
        raise Fallback("CSC input with unsorted or duplicate indices")
    work = data.tocsr()
    if work.dtype != np.float64:
        work = work.astype(np.float64)
    return "csr", work, 1


INTEGERS = (np.dtype(np.int32), np.dtype(np.int64))
# Largest magnitude whose square upstream computes without overflow: numpy
# squares int32 counts in int32.
_SQUARE_BOUND = {np.dtype(np.int32): 46340, np.dtype(np.int64): 1 << 26}


def _integers_as_f64(data, values, n_rows):
    """Integer counts as an f64 copy, which gives upstream's results exactly:
    upstream widens each value to f64 (sums, Welford, clipping) and squares in the
    integer type, which equals the f64 square below the bound; and with
    ``n_rows * largest^2 < 2^53`` every sum of values or squares is exact, so
    its order (numpy's buffered casting reduction) cannot matter. Else Fallback."""
    largest = max(abs(int(values.max())), abs(int(values.min()))) if values.size else 0
    if largest > _SQUARE_BOUND[data.dtype] or n_rows * largest * largest >= 1 << 53:
        raise Fallback(f"{data.dtype} counts up to {largest}: sums not exact in f64")
    return data.astype(np.float64)


def _check_numba_parallel(up: Upstream) -> None:
    """Upstream's numba kernels run serially, with a warning, in some threads or
    runtimes: such calls are left to upstream."""
    for module, name in up.serial_numba:
        if getattr(importlib.import_module(module), name)():
            raise Delegate("numba would run upstream's kernels serially here (it warns)")


def _batches(adata, batch_key):
    """Per-cell batch index in upstream's batch order (``np.unique``), the batch
    count and sizes; None codes for a single batch of every cell."""
    n = adata.n_obs
    if n == 0:
        raise Delegate("no cells")
    if batch_key is None:
        return None, 1, np.array([n]), [0]
    fast_codes = _categorical_batches(adata.obs[batch_key])
    if fast_codes is not None:
        return fast_codes
    info = adata.obs[batch_key].to_numpy()
    try:
        uniq = np.unique(info)
    except Exception as e:  # noqa: BLE001 - upstream raises its own error
        raise Delegate(f"batch values np.unique cannot sort: {e}") from e
    codes = np.full(n, -1, dtype=np.int64)
    for k, b in enumerate(uniq):
        mask = np.asarray(info == b)
        if mask.shape != (n,) or mask.dtype != bool or not mask.any():
            raise Delegate(f"batch {b!r} selects no cells")
        codes[mask] = k
    if (codes < 0).any():
        raise Delegate("cells whose batch equals none of the batch values (NaN)")
    if len(uniq) == 1:
        return None, 1, np.array([n]), list(uniq)
    return codes.astype(np.uint64), len(uniq), np.bincount(codes, minlength=len(uniq)), list(uniq)


def _categorical_batches(col):
    """``_batches`` for a categorical column of strings or numbers, from its codes
    (no object comparisons): the batches are the used categories in the order
    ``np.unique`` gives their values. None where that shortcut does not apply."""
    import pandas as pd

    if not isinstance(col.dtype, pd.CategoricalDtype):
        return None
    cats = col.cat.categories
    if cats.inferred_type not in ("string", "integer", "floating"):
        return None
    cat_codes = col.cat.codes.to_numpy()
    if cat_codes.size == 0 or (cat_codes < 0).any():
        return None  # NaN batches: the generic path decides
    counts = np.bincount(cat_codes, minlength=len(cats))
    used = np.flatnonzero(counts)
    values = cats.to_numpy()[used]
    uniq = np.unique(values)
    if len(uniq) != len(used):
        return None
    order = {v: k for k, v in enumerate(uniq.tolist())}
    to_batch = np.full(len(cats), -1, dtype=np.int64)
    for cat, value in zip(used, values.tolist()):
        to_batch[cat] = order[value]
    labels = list(uniq)
    n = len(cat_codes)
    if len(uniq) == 1:
        return None, 1, np.array([n]), labels
    codes = to_batch[cat_codes]
    return codes.astype(np.uint64), len(uniq), counts[used][np.argsort(to_batch[used])], labels


def _arrays(data, kind: str) -> tuple:
    return (data.data, data.indices, data.indptr) if kind == "csr" else (data,)


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


def _footprint(data, kind: str) -> int:
    return sum(_aligned(a.nbytes) for a in _arrays(data, kind))


def _place(data, kind: str, adopt: bool):
    """Copy the matrix's arrays into one segment (copied in parallel blocks) and,
    if ``adopt``, rebind the matrix to them, so later calls copy nothing. Returns
    the placed arrays."""
    buf = shm.empty((max(_footprint(data, kind), 1),), np.uint8)
    placed, off = [], 0
    for arr in _arrays(data, kind):
        src = np.ascontiguousarray(arr).reshape(-1)
        view = buf[off : off + src.nbytes].view(src.dtype)
        off += _aligned(src.nbytes)

        def copy(a, b, view=view, src=src):
            np.copyto(view[a:b], src[a:b])

        parallel.run_blocks(copy, parallel.blocks(src.size, src.itemsize, align=parallel.ALIGN))
        placed.append(view.reshape(arr.shape))
    if adopt:
        if kind == "csr":
            _common.adopt_csr(data, data=placed[0], indices=placed[1], indptr=placed[2])
    return placed


def _wire_matrix(data, kind: str, arrays: tuple):
    """The wire Matrix over ``arrays`` (``data``'s arrays placed in segments)."""
    refs = [shm.ref(a) for a in arrays]
    if any(r is None for r in refs):
        raise Fallback("arrays that cannot be referenced")
    n_rows, n_cols = data.shape
    if kind == "csr":
        return msg("Csr", n_rows=n_rows, n_cols=n_cols, data=refs[0], indices=refs[1], indptr=refs[2])
    return msg("Dense", n_rows=n_rows, n_cols=n_cols, data=refs[0])


def _placed(data, kind: str) -> bool:
    return all(shm.is_placed(a) for a in _arrays(data, kind))


def _transport(data, kind: str, adopt: bool):
    """The matrix's arrays in shared memory. Already in shared
    memory: as it is. Otherwise copied once into a segment (one lent from the
    daemon's pool or ours when at hand) that all three requests read; a CSR
    matrix then adopts it, so re-runs copy nothing (a dense array is not adopted:
    that would replace the user's array object). Reading this process's memory
    instead would copy the matrix into fresh daemon memory once per request, and
    fresh pages cost more than the copy itself here."""
    if _placed(data, kind):
        return _arrays(data, kind)
    size = _footprint(data, kind)
    shm.reserve(size)  # lease a pooled segment if one fits
    return tuple(_place(data, kind, adopt=adopt and kind == "csr"))


def _aggregate_dof_warning(col, sizes):
    """scanpy 1.12's ``aggregate`` (dof 1) gives a one-cell batch a NaN variance
    and warns, naming such groups in its category order (the used categories of
    ``pd.Categorical(col)``, as strings): that warning's message, or None. Where
    the categories' names coincide as strings upstream's aggregate raises."""
    import pandas as pd

    cat = pd.Categorical(col).remove_unused_categories()
    names = ["_".join(map(str, (c,))) for c in cat.categories]
    if len(set(names)) != len(names):
        raise Delegate("batch categories whose names coincide as strings (upstream's aggregate raises)")
    if (np.asarray(sizes) > 1).all():
        return None
    codes = np.asarray(cat.codes)
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    which = [name for name, k in zip(names, counts) if k <= 1]
    return f"Group counts matches dof, resulting var for groups {which} will be nan"


def _batch_stats(client, matrix, *, up, codes, n_batches, sizes, batched, partitions,
                 dof_warning, check_values, flavor):
    """(overall means, variances, per-batch means, per-batch variances, value
    flags, warnings): the statistics upstream computes before its loess fits,
    variances scaled to upstream's ``n / (n - 1)``, and the warnings upstream
    gives on the way, in its order, as (message, category). They are given once
    the loess fits have succeeded: where a fit fails, upstream runs and gives
    them itself (with its error), so the user sees each once."""
    one = np.empty(0, np.uint64)  # no batch codes: one batch of every cell
    batches = one if codes is None else codes
    welford = batched and up.batch_stats == "welford"
    sums_per_batch = codes is not None and not welford
    stats = client.call(msg("HvgMeanVar", x=matrix, batches=batches if sums_per_batch else one,
                            n_batches=n_batches if sums_per_batch else 1,
                            partitions=partitions, check=True, with_overall=sums_per_batch))
    if stats.non_finite:
        raise Delegate("NaN or infinite values")
    pending = []
    if check_values and (stats.negative or stats.non_integer):
        pending.append((_non_integer_message(flavor), UserWarning))
    n_genes = int(matrix.n_cols)
    means = stats.means.reshape(-1, n_genes)
    variances = stats.variances.reshape(-1, n_genes)
    mean_all, var_all = means[0], variances[0]
    _unbias(var_all, int(matrix.n_rows))
    if welford:
        # sc.get.aggregate(func=["mean", "var"], dof=1): Welford's biased
        # variances, then upstream's numpy scaling by count / (count - 1).
        w = client.call(msg("HvgBatchWelford", x=matrix, batches=batches, n_batches=n_batches))
        batch_means = w.means.reshape(-1, n_genes)
        batch_vars = w.variances.reshape(-1, n_genes)
        group_counts = np.asarray(sizes, dtype=np.int64)
        denom = np.where(group_counts > 1, group_counts - 1, np.nan)
        if dof_warning is not None:
            pending.append((dof_warning, RuntimeWarning))
        batch_vars *= (group_counts / denom)[:, np.newaxis]
        return mean_all, var_all, list(batch_means), list(batch_vars), stats, pending
    if codes is None:
        return mean_all, var_all, [mean_all], [var_all], stats, pending
    batch_means, batch_vars = list(means[1:]), list(variances[1:])
    for v, size in zip(batch_vars, sizes):
        _unbias(v, int(size))
    return mean_all, var_all, batch_means, batch_vars, stats, pending


def _compute(data, kind, loess, *, up, codes, n_batches, sizes, labels, batched, dof_warning,
             flavor, n_top_genes, check_values, span, partitions, var_names, adopt):
    import numba

    n_genes = data.shape[1]
    was_placed = _placed(data, kind)
    keep = _transport(data, kind, adopt)
    matrix = _wire_matrix(data, kind, keep)
    if partitions is None:
        partitions = int(numba.get_num_threads())
    client = get_client()
    one = np.empty(0, np.uint64)  # no batch codes: one batch of every cell

    batches = one if codes is None else codes
    key = _result_key(client, matrix, codes, n_batches, flavor, n_top_genes, span, partitions,
                      (up.batch_stats, batched))
    kept = _kept.get(key)
    if kept is not None:
        del keep
        df, raw_counts = kept
        if check_values and not raw_counts:
            _warn_non_integers(up, flavor)
        df = df.copy()
        df.index = var_names
        df["gene_name"] = df.index
        return df
    mean_all, var_all, batch_means, batch_vars, stats, pending = _batch_stats(
        client, matrix, up=up, codes=codes, n_batches=n_batches, sizes=sizes, batched=batched,
        partitions=partitions, dof_warning=dof_warning, check_values=check_values,
        flavor=flavor)
    # Each batch's clipped sums are computed on a second connection as soon as
    # its clip values are known, while the next loess fit runs here.
    clipped = None
    if codes is not None:
        todo: queue.SimpleQueue = queue.SimpleQueue()

        def clip_batches():
            done = {}
            while (item := todo.get()) is not None:
                b, clip = item
                done[b] = _side_client().call(msg(
                    "HvgClippedSums", x=matrix, batches=batches, n_batches=n_batches,
                    clip=clip, only=b))
            return done

        clipped = parallel.submit(clip_batches)
    try:
        reg_stds, clips = [], np.empty((n_batches, n_genes), dtype=np.float64)
        for b, (mean, var) in enumerate(zip(batch_means, batch_vars)):
            # upstream's per-batch loess, verbatim in what it computes
            not_const = var > 0
            estimat_var = np.zeros(n_genes, dtype=np.float64)
            n_points = int(np.count_nonzero(not_const))
            if n_points or not up.loess_skips_no_variance:
                y = np.log10(var[not_const])
                x = np.log10(mean[not_const])
                _check_loess_input(n_points, span, labels[b])
                model = loess(x, y, span=span, degree=2)
                model.fit()
                estimat_var[not_const] = model.outputs.fitted_values
            reg_std = np.sqrt(10**estimat_var)
            vmax = np.sqrt(int(sizes[b]))
            clips[b] = reg_std * vmax + mean
            reg_stds.append(reg_std)
            if clipped is not None:
                todo.put((b, clips[b]))

        if clipped is None:
            sums = client.call(msg("HvgClippedSums", x=matrix, batches=batches,
                                   n_batches=n_batches, clip=clips.reshape(-1), only=None))
            batch_sums = sums.sums.reshape(n_batches, n_genes)
            batch_squares = sums.squares.reshape(n_batches, n_genes)
    finally:
        # Never leave a request behind that reads these segments.
        if clipped is not None:
            todo.put(None)
            per_batch = clipped.result()
    if clipped is not None:
        batch_sums = [per_batch[b].sums for b in range(n_batches)]
        batch_squares = [per_batch[b].squares for b in range(n_batches)]
    for message, category in pending:
        _warn(up, message, category)
    del keep
    if not was_placed:
        # The next fresh matrix of this size finds a segment ready (prepared in
        # the background, after this call's own work).
        shm.ensure_spare(_footprint(data, kind), on_ready=prefault_in_background)

    norm_gene_vars = []
    for b in range(n_batches):
        n = int(sizes[b])
        mean, reg_std = batch_means[b], reg_stds[b]
        norm_gene_var = (1 / ((n - 1) * np.square(reg_std))) * (
            (n * np.square(mean)) + batch_squares[b] - 2 * batch_sums[b] * mean
        )
        norm_gene_vars.append(norm_gene_var.reshape(1, -1))
    df = _rank(mean_all, var_all, norm_gene_vars, flavor=flavor, n_top_genes=n_top_genes,
               var_names=var_names)
    if (np.asarray(sizes) > 1).all() and not stats.negative:
        # (a one-cell batch divides by zero; negative values can take a log of a
        # negative mean: numpy warns on every call, so such results are not kept)
        _kept.put(key, (df.copy(), not (stats.negative or stats.non_integer)))
    return df


class _Kept:
    """The last few results, by key (None: not kept)."""

    def __init__(self, size: int):
        self._size = size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        if key is None:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key, item) -> None:
        if key is None:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_kept = _Kept(KEPT_RESULTS)


def _result_key(client, matrix, codes, n_batches, flavor, n_top_genes, span, partitions, how):
    """What determines the result: the matrix's content (the daemon's fingerprint,
    which covers kind, shape and dtypes), each cell's batch, the parameters and
    ``how`` (which batch statistics). None when keeping results is turned off."""
    if os.environ.get("AUTOZYME_HVG_CACHE", "1") == "0":
        return None
    fp = client.call(msg("Fingerprint", x=matrix))
    h = hashlib.blake2b(digest_size=16)
    h.update(b"none" if codes is None else np.ascontiguousarray(codes).view(np.uint8))
    h.update(repr((fp.lo, fp.hi, n_batches, flavor, n_top_genes, type(n_top_genes).__name__,
                   span, type(span).__name__, partitions, how)).encode())
    return h.digest()


_side: dict = {}  # pid -> Client: a second connection, for overlapping requests


def _side_client():
    import atexit
    import os

    from ..client import Client

    pid = os.getpid()
    if pid not in _side:
        if not _side:
            atexit.register(_close_side_clients)
        _side[pid] = Client()
    return _side[pid]


def _close_side_clients() -> None:
    import os

    cl = _side.get(os.getpid())
    if cl is not None:
        cl.reset()


def _check_loess_input(n_points: int, span, label) -> None:
    """scikit-misc's loess dereferences out of bounds, killing the process with
    SIGSEGV, when ``floor(n_points * span)`` is 0 (a span in (0, 1] covering less
    than one point: e.g. a batch of one cell, where no gene varies). Upstream
    scanpy 1.11.5 crashes there; 1.12.1 and later skip loess when no gene varies
    (never calling this) but still crash for a few varying genes. We raise
    instead."""
    try:
        tiny = 0 < span <= 1 and n_points * span < 1
    except TypeError:
        return  # loess raises its own error for such a span
    if tiny:
        raise BadInput(
            f"highly_variable_genes: batch {label!r} has {n_points} genes with non-zero "
            f"variance, too few for a loess fit with span={span} (needs span * genes >= 1). "
            "scikit-misc's loess crashes the Python process on such input (upstream scanpy "
            "dies with a segmentation fault here); use larger batches or a larger span."
        )


def _unbias(var, n: int) -> None:
    """upstream's ``var *= n / (n - 1)`` (R's unbiased estimator), in place."""
    if n != 1:
        var *= n / (n - 1)


@functools.lru_cache(maxsize=1)
def _upstream_warning_site():
    """Where upstream's non-integer warning is attributed (stacklevel=3 from
    ``_highly_variable_genes_seurat_v3`` lands in ``legacy_api_wrap``'s wrapper of
    ``highly_variable_genes``): (filename, lineno, module globals), or None."""
    try:
        from scanpy.preprocessing import _highly_variable_genes as mod

        wrapper = mod.highly_variable_genes
        wrapper = getattr(wrapper, "__autozyme_upstream__", wrapper)
        code = wrapper.__code__
        lines, first = inspect.getsourcelines(code)
        for k, line in enumerate(lines):
            if line.strip().startswith("return fn("):
                import sys

                module = sys.modules.get(wrapper.__module__)
                return code.co_filename, first + k, vars(module) if module else None
    except Exception:  # noqa: BLE001 - attribution is cosmetic
        return None
    return None


def _non_integer_message(flavor) -> str:
    return f"`{flavor=!r}` expects raw count data, but non-integers were found."


def _warn_non_integers(up: Upstream, flavor) -> None:
    _warn(up, _non_integer_message(flavor), UserWarning)


@functools.lru_cache(maxsize=1)
def _skipped_prefixes() -> tuple[str, ...]:
    """The frames scanpy 1.12's ``warn`` skips (scanpy's and legacy_api_wrap's
    directories), and ours: the warning then points at the caller, as upstream's."""
    from pathlib import Path

    import legacy_api_wrap
    import scanpy

    return tuple(str(Path(m.__file__).parent) for m in (scanpy, legacy_api_wrap)) + (
        str(Path(__file__).parent.parent),
    )


def _warn(up: Upstream, message: str, category) -> None:
    """A warning of upstream's, pointing where upstream's points."""
    if up.warning_site == "skip_prefixes":
        warnings.warn(message, category, skip_file_prefixes=_skipped_prefixes())
        return
    site = _upstream_warning_site()
    if site is None or site[2] is None:
        warnings.warn(message, category, stacklevel=5)
        return
    filename, lineno, module_globals = site
    warnings.warn_explicit(
        message, category, filename, lineno,
        module=module_globals.get("__name__"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )


def _argsort_rows(a):
    """``np.argsort(a, axis=1)``, rows sorted in parallel threads (numpy sorts each
    row on its own, with the GIL released, so the result is the same)."""
    out = np.empty(a.shape, dtype=np.intp)

    def sort(lo, hi):
        out[lo:hi] = np.argsort(a[lo:hi], axis=1)

    parallel.run_blocks(sort, [(r, r + 1) for r in range(a.shape[0])] or [(0, 0)])
    return out


def _rank(mean_all, var_all, norm_gene_vars, *, flavor, n_top_genes, var_names):
    """upstream's ranking and selection, step for step, on the same arrays."""
    import pandas as pd

    df = pd.DataFrame(index=var_names)
    df["means"], df["variances"] = mean_all, var_all
    norm_gene_vars = np.concatenate(norm_gene_vars, axis=0)
    ranked_norm_gene_vars = _argsort_rows(_argsort_rows(-norm_gene_vars))
    ranked_norm_gene_vars = ranked_norm_gene_vars.astype(np.float32)
    num_batches_high_var = np.sum((ranked_norm_gene_vars < n_top_genes).astype(int), axis=0)
    ranked_norm_gene_vars[ranked_norm_gene_vars >= n_top_genes] = np.nan
    ma_ranked = np.ma.masked_invalid(ranked_norm_gene_vars)
    median_ranked = np.ma.median(ma_ranked, axis=0).filled(np.nan)

    df["gene_name"] = df.index
    df["highly_variable_nbatches"] = num_batches_high_var
    df["highly_variable_rank"] = median_ranked
    df["variances_norm"] = np.mean(norm_gene_vars, axis=0)
    if flavor == "seurat_v3":
        sort_cols = ["highly_variable_rank", "highly_variable_nbatches"]
        sort_ascending = [True, False]
    else:
        sort_cols = ["highly_variable_nbatches", "highly_variable_rank"]
        sort_ascending = [False, True]
    sorted_index = (
        df[sort_cols].sort_values(sort_cols, ascending=sort_ascending, na_position="last").index
    )
    df["highly_variable"] = False
    df.loc[sorted_index[: int(n_top_genes)], "highly_variable"] = True
    return df


def _finish(adata, df, *, flavor, batch_key, subset, inplace):
    from scanpy import logging as logg

    if inplace:
        adata.uns["hvg"] = {"flavor": flavor}
        logg.hint(
            "added\n"
            "    'highly_variable', boolean vector (adata.var)\n"
            "    'highly_variable_rank', float vector (adata.var)\n"
            "    'means', float vector (adata.var)\n"
            "    'variances', float vector (adata.var)\n"
            "    'variances_norm', float vector (adata.var)"
        )
        adata.var["highly_variable"] = df["highly_variable"].to_numpy()
        adata.var["highly_variable_rank"] = df["highly_variable_rank"].to_numpy()
        adata.var["means"] = df["means"].to_numpy()
        adata.var["variances"] = df["variances"].to_numpy()
        adata.var["variances_norm"] = df["variances_norm"].to_numpy().astype("float64", copy=False)
        if batch_key is not None:
            adata.var["highly_variable_nbatches"] = df["highly_variable_nbatches"].to_numpy()
        if subset:
            adata._inplace_subset_var(df["highly_variable"].to_numpy())
        return None
    if batch_key is None:
        df = df.drop(["highly_variable_nbatches"], axis=1)
    if subset:
        df = df.iloc[df["highly_variable"].to_numpy(), :]
    return df
