"""sc.pp.log1p, verified against scanpy 1.11.5, 1.12.3 and 1.12.4.

numpy's float32/float64 ``log1p`` is a SIMD routine whose last bits differ from a
correctly rounded log1p (and from one CPU to another), so no other implementation
can be bit-identical to it. The fast path applies numpy's own ufunc to aligned
blocks of the values in parallel threads (numpy releases the GIL inside the loop);
each element goes through the same SIMD lanes as in one whole-array call. Where
the values make one block only (one thread: ``AUTOZYME_THREADS=1`` or
``sc.settings.n_jobs``; or under 2 MiB of values), threads cannot help and each
pass is upstream's own whole-array call (``threads_help``), nothing added.
Everything else (scanpy's dispatch, sklearn's ``check_array`` validation and
dtype rules, ``uns["log1p"]``, the warnings) is upstream's own code path.

Upstream's log1p is the same code in all three versions (1.12 only renamed the
helpers around it); the one difference, declared in ``UPSTREAM``, is that 1.12
dispatches scipy's sparse arrays (csr_array, csc_array) to its sparse path. On
1.11.5, where upstream raises TypeError for a sparse array, such a call is
delegated so that the user gets upstream's error, not a result upstream would
not give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .. import parallel, versions
from ..dask import is_dask_array
from ..dask import log1p as dask_log1p
from ..fallback import Delegate, Fallback
from . import _common


@dataclass(frozen=True)
class Upstream:
    sparse_arrays: bool  # upstream's own log1p takes csr_array/csc_array (1.12)
    dask: bool  # a dask array served by autozyme.dask.log1p (its graph read from this release)


UPSTREAM = {
    "1.11.5": Upstream(sparse_arrays=False, dask=False),
    # 1.12.3's log1p is 1.12.4's, line for line (dask path included).
    "1.12.3": Upstream(sparse_arrays=True, dask=True),
    "1.12.4": Upstream(sparse_arrays=True, dask=True),
}
VERIFIED = tuple(UPSTREAM)
_ARRAY_ONLY = ("chunked", "chunk_size", "layer", "obsm")


def fast(upstream, *args, **kwargs):
    from anndata import AnnData

    data, p = _common.bind(upstream, _common.keyword_defaults(upstream), args, kwargs)
    if isinstance(data, AnnData):
        return _anndata(data, **p)
    if is_dask_array(data):
        _check_dask(data, p["base"])
        if any(k in kwargs for k in _ARRAY_ONLY):
            raise Delegate(f"{sorted(set(kwargs) & set(_ARRAY_ONLY))} given with an array")
        return dask_log1p.log1p_dask(data, base=p["base"], copy=p["copy"])
    _check_sparse_array(data)
    if not _array_in_scope(data):
        raise Fallback(f"{type(data).__name__} input")
    if any(k in kwargs for k in _ARRAY_ONLY):
        # upstream's array implementations take no such arguments: TypeError.
        raise Delegate(f"{sorted(set(kwargs) & set(_ARRAY_ONLY))} given with an array")
    return log1p_values(data, base=p["base"], copy=p["copy"])


def threads_help(x) -> bool:
    """Whether the values split into more than one block (more than one thread,
    and enough values: ``parallel.blocks``). Where they do not, every pass is
    upstream's own call on the whole array (sklearn's ``check_array`` with its
    finiteness check, one ``np.log1p``), nothing added."""
    if sp.issparse(x):
        n, itemsize = x.nnz, max(x.dtype.itemsize, 4)
    elif x.flags.c_contiguous or x.flags.f_contiguous:
        n, itemsize = x.size, x.dtype.itemsize
    else:
        return False  # _elementwise would make one whole-array call anyway
    return len(parallel.blocks(n, itemsize, align=parallel.ALIGN)) > 1


def _check_sparse_array(x) -> None:
    if _common.is_sparse_array(x) and not versions.pick(UPSTREAM).sparse_arrays:
        raise Delegate(f"{type(x).__name__}: this scanpy's log1p raises TypeError for sparse arrays")


def _check_dask(x, base) -> None:
    if not versions.pick(UPSTREAM).dask:
        raise Fallback(f"dask array on scanpy {versions.scanpy_version()}")
    dask_log1p.in_scope(x)
    if base is not None and not (
        isinstance(base, (int, float, np.integer, np.floating)) and not isinstance(base, bool)
    ):
        raise Fallback(f"base of type {type(base).__name__} on a dask array")


def _array_in_scope(x) -> bool:
    if isinstance(x, np.ndarray) and not isinstance(x, np.matrix):
        return x.dtype in _common.FLOATS or np.issubdtype(x.dtype, np.integer)
    if _common.is_csr(x) or _common.is_csc(x):
        return x.dtype in _common.FLOATS or np.issubdtype(x.dtype, np.integer)
    return False


def _anndata(adata, *, base, copy, chunked, chunk_size, layer, obsm):
    from scanpy import logging as logg
    from scanpy._utils import view_to_actual
    from scanpy.get import _get_obs_rep, _set_obs_rep

    if chunked:
        raise Fallback("chunked=True")
    if adata.isbacked:
        raise Fallback("backed AnnData")
    if layer is not None and obsm is not None:
        raise Delegate("both layer and obsm")
    if layer is not None and layer not in adata.layers:
        raise Delegate(f"no layer {layer!r}")
    if obsm is not None and obsm not in adata.obsm:
        raise Delegate(f"no obsm {obsm!r}")
    dask = is_dask_array(_get_obs_rep(adata, layer=layer, obsm=obsm))
    if dask:
        _check_dask(_get_obs_rep(adata, layer=layer, obsm=obsm), base)
    else:
        _check_sparse_array(_get_obs_rep(adata, layer=layer, obsm=obsm))
        if not _array_in_scope(_get_obs_rep(adata, layer=layer, obsm=obsm)):
            raise Fallback(f"{type(_get_obs_rep(adata, layer=layer, obsm=obsm)).__name__} input")

    if "log1p" in adata.uns:
        logg.warning("adata.X seems to be already log-transformed.")
    adata = adata.copy() if copy else adata
    view_to_actual(adata)
    x = _get_obs_rep(adata, layer=layer, obsm=obsm)
    if dask:
        x = dask_log1p.log1p_dask(x, base=base, copy=False)
    else:
        x = log1p_values(x, base=base, copy=False)
    _set_obs_rep(adata, x, layer=layer, obsm=obsm)
    adata.uns["log1p"] = {"base": base}
    if copy:
        return adata
    return None


def log1p_values(x, *, base, copy):
    """upstream's ``log1p_sparse`` / ``log1p_array``, with the ufuncs parallel."""
    if sp.issparse(x):
        x = _check_sparse(x, copy)
        x.data = log1p_values(x.data, base=base, copy=False)
        return x
    if copy:
        x = x.astype(float) if not np.issubdtype(x.dtype, np.floating) else x.copy()
    elif not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, complex)):
        x = x.astype(float)
    _elementwise(x, np.log1p)
    if base is not None:
        log_base = np.log(base)
        _elementwise(x, lambda v, out: np.divide(v, log_base, out=out))
    return x


def _check_sparse(x, copy: bool):
    """sklearn's ``check_array`` as upstream calls it, with its finiteness pass
    (one single-threaded read of every value) run on parallel blocks instead.
    Its outcome is "raise if any value is NaN or infinite"; when a block says so,
    sklearn's own check runs and raises its own error (or, with sklearn's
    ``assume_finite`` set, lets it pass, as upstream would)."""
    from sklearn.utils import check_array

    kwargs = dict(accept_sparse=("csr", "csc"), dtype=(np.float64, np.float32), copy=copy)
    if not threads_help(x):
        return check_array(x, **kwargs)  # upstream's call, as is
    try:
        checked = check_array(x, ensure_all_finite=False, **kwargs)
    except TypeError:  # an sklearn without ensure_all_finite: its own check, as is
        return check_array(x, **kwargs)
    if _all_finite(checked.data):
        return checked
    return check_array(x, **kwargs)


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite: a sum per block (cheap) and, for a block
    whose sum is not finite (a non-finite value, or overflow), an exact test."""
    flat = values.reshape(-1)
    verdicts = []

    def block(a, b):
        with np.errstate(over="ignore", invalid="ignore"):
            part = flat[a:b]
            verdicts.append(bool(np.isfinite(np.sum(part))) or bool(np.isfinite(part).all()))

    parallel.run_blocks(block, parallel.blocks(flat.size, flat.itemsize, align=parallel.ALIGN))
    return all(verdicts)


def _elementwise(x: np.ndarray, ufunc) -> None:
    """``ufunc(x, out=x)`` over aligned blocks of a contiguous array, in parallel."""
    if x.flags.c_contiguous:
        flat = x.reshape(-1)
    elif x.flags.f_contiguous:
        flat = x.T.reshape(-1)
    else:
        ufunc(x, out=x)
        return

    def block(a, b):
        ufunc(flat[a:b], out=flat[a:b])

    parallel.run_blocks(block, parallel.blocks(flat.size, x.itemsize, align=parallel.ALIGN))
