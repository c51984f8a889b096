"""sc.tl.rank_genes_groups(method="wilcoxon"), verified against scanpy 1.11.5, 1.12.3 and 1.12.4.

Upstream's own function runs the call: argument checks, ``sanitize_anndata``,
group selection and its errors (single-cell groups), the numba thread limit of
1.12.2 and later (``settings.n_jobs``, restored afterwards) and everything written
to ``adata.uns[key_added]``. Only the two O(cells x genes) steps of its
``_RankGenes`` move to the daemon: ``_basic_stats`` (per-group means and fractions
of expressing cells) and the dense ranking of every cell of every gene in
``wilcoxon``. For that, scanpy's ``_RankGenes`` is replaced by a subclass that
behaves exactly as upstream unless this patch is serving the call in the current
thread. When serving, the subclass also makes ``compute_statistics``' table in one
step (same numbers, columns and order; see ``_compute_statistics``), and the
call skips ``eliminate_zeros``' rewrite of a matrix that stores no zero.

The daemon returns exact rank sums (half-integers), upstream's tie-correction
factors term by term, per-group f64 sums in the order upstream adds them, and
non-zero counts. From those, this module evaluates upstream's own numpy
expressions (``sqrt``, ``norm.sf``, the divisions) in upstream's order, so
scores, p-values, means, ``pts`` and ``pts_rest`` are bit-identical.

How the means are summed is where the versions differ (``UPSTREAM`` below):
1.11.5 slices each group and each group's rest and takes ``_get_mean_var`` of
each slice (CSR: numba's per-thread partials, ``numba.get_num_threads()`` of this
process); 1.12.3 and later take every group's sums from one ``sc.get.aggregate``
(f64, in cell order; the cells of no selected group form one more group) and
derive the rest's means and ``pts_rest`` from them. 1.12 also takes scipy's
sparse arrays (csr_array, csc_array), on which 1.11.5 raises.

Threads: 1.12.2's limit of numba to ``settings.n_jobs`` is upstream's own context
manager around ``compute_statistics``, so it holds, and numba's thread count is
restored, with this patch too (1.12's statistics do not depend on it). The
daemon's thread count is fixed when it starts (``settings.n_jobs`` when set, see
``runtime.daemon_threads``); no result depends on it.

Not reproduced: ``vars`` (upstream computes them but never uses them for the
Wilcoxon test; they are left as zeros, on 1.12 as None, on the internal object).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .. import codec, versions
from ..client import DaemonError
from ..dask import is_dask_array
from ..dask import rank_genes_groups as dask_path
from ..fallback import Delegate, Fallback
from . import _common, wilcoxon_request


@dataclass(frozen=True)
class Upstream:
    """What differs, for this call, between the scanpy versions reproduced."""

    # Where the group means, pts and the rest's come from. False (1.11.5):
    # ``_get_mean_var`` and ``getnnz`` of each group's slice and of each group's
    # rest slice (CSR means: numba's per-thread partial sums). True (1.12.3 on):
    # one ``sc.get.aggregate`` over the groups plus, without a reference, the
    # cells of no selected group as one more group: f64 sums in cell order over
    # the group's size, ``means_rest = (total - n_g * mean_g) / n_rest`` and
    # ``pts_rest`` likewise; ``vars`` left None.
    aggregate_stats: bool
    # scipy's sparse arrays (csr_array, csc_array) are computed on. 1.11.5's
    # ``check_nonnegative_integers`` has no case for them, so upstream raises
    # NotImplementedError: the call is delegated for the user to get that error.
    sparse_arrays: bool
    # A dask X is served (by blocks of genes, ``autozyme.dask.rank_genes_groups``)
    # with the in-memory result on the computed matrix. Upstream has no dask path
    # (1.12.4 fails inside numba); served where its in-memory statistics come from
    # one aggregate, whose per-gene sums a block of genes reproduces as they are.
    dask: bool


UPSTREAM = {
    "1.11.5": Upstream(aggregate_stats=False, sparse_arrays=False, dask=False),
    # 1.12.3's sources of this call (the module, get/_aggregated.py, _kernels.py,
    # _numba.py) are identical to 1.12.4's.
    "1.12.3": Upstream(aggregate_stats=True, sparse_arrays=True, dask=True),
    "1.12.4": Upstream(aggregate_stats=True, sparse_arrays=True, dask=True),
}
VERIFIED = tuple(UPSTREAM)
NO_GROUP = np.uint64(2**64 - 1)

_serving = threading.local()
_install_lock = threading.Lock()
# Results of the last call in this thread (for tests and the benchmark).
last = threading.local()


def fast(upstream, *args, **kwargs):
    from anndata import AnnData

    if not 1 <= len(args) <= 2:
        raise Fallback("arguments after groupby passed by position")
    defaults = _common.keyword_defaults(upstream)
    unknown = set(kwargs) - set(defaults) - {"groupby"}
    if unknown:
        # **kwds: logreg options, or the legacy only_positive.
        raise Fallback(f"extra keyword arguments {sorted(unknown)}")
    adata = args[0]
    if len(args) == 2 and "groupby" in kwargs:
        raise Delegate("groupby given twice")
    p = {**defaults, **kwargs}
    if p.get("method") != "wilcoxon":
        raise Fallback(f"method={p.get('method')!r} (only 'wilcoxon' is accelerated)")
    if not isinstance(adata, AnnData):
        raise Delegate(f"{type(adata).__name__} is not an AnnData")
    if adata.isbacked:
        raise Fallback("backed AnnData")
    layer, use_raw = p["layer"], p["use_raw"]
    if layer is not None:
        x = adata.layers[layer] if layer in adata.layers and not use_raw else None
    elif (use_raw is None or use_raw) and adata.raw is not None:
        x = adata.raw.X
    else:
        x = adata.X
    up = versions.pick(UPSTREAM)
    if x is not None:
        _check_matrix(x, up)
    _install()
    _serving.tie_correct = bool(p["tie_correct"])
    _serving.on = True
    try:
        with _eliminate_zeros_only_if_stored(x):
            return upstream(*args, **kwargs)
    finally:
        _serving.on = False
        _serving.checked = None


@contextmanager
def _eliminate_zeros_only_if_stored(x):
    """Upstream's ``_RankGenes`` calls ``X.eliminate_zeros()`` on the matrix it
    ranks, an O(non-zeros) rewrite of its arrays. On a matrix that stores no zero
    (and no entries past ``indptr[-1]``), as after any earlier call, it changes
    no value: for the duration of the call the matrix's own method first checks
    that with one read of ``data``, which costs a third of the rewrite. Only the
    object upstream reads (an AnnData view gives upstream a new one, which keeps
    scipy's method); removed afterwards."""
    if not (sp.issparse(x) and x.format in ("csr", "csc")) or "eliminate_zeros" in vars(x):
        yield
        return
    rewrite = x.eliminate_zeros

    def eliminate_zeros():
        nnz = int(x.indptr[-1])
        if len(x.data) == nnz and len(x.indices) == nnz and x.data.all():
            return
        rewrite()

    x.eliminate_zeros = eliminate_zeros
    try:
        yield
    finally:
        vars(x).pop("eliminate_zeros", None)


def _check_matrix(x, up: Upstream) -> None:
    """Fallback for inputs the daemon does not rank."""
    if is_dask_array(x):
        if not up.dask:
            raise Fallback("dask array on this scanpy")
        dask_path.check(x)
        _check_dtype(x.dtype)
        return
    if sp.issparse(x):
        if _common.is_sparse_array(x) and not up.sparse_arrays:
            raise Delegate(f"{type(x).__name__} (upstream raises NotImplementedError)")
        if x.format not in ("csr", "csc"):
            raise Fallback(f"{x.format} matrix (CSR, CSC and dense are accelerated)")
        _common.check_csr_structure(x)
        if x.format == "csc" and not x.has_sorted_indices:
            # Upstream's CSC means add each column in storage order.
            raise Fallback("CSC matrix with unsorted indices")
        _check_dtype(x.dtype)
        if x.indices.dtype not in _common.INDEX or x.indptr.dtype not in _common.INDEX:
            raise Fallback(f"index dtype {x.indices.dtype}/{x.indptr.dtype}")
        return
    if not isinstance(x, np.ndarray) or isinstance(x, np.matrix):
        raise Fallback(f"{type(x).__name__} input")
    _check_dtype(x.dtype)
    if x.ndim != 2:
        raise Fallback(f"{x.ndim}-dimensional input")
    if not up.aggregate_stats and x.shape[1] < 2:
        # 1.11.5: numpy's column means of a one-column array use pairwise
        # summation, not row by row. (Upstream slices rows with a mask, which gives
        # C-ordered copies whatever the input's layout, so their means add row by
        # row.) 1.12's aggregate adds row by row whatever the shape.
        raise Fallback("dense input with fewer than two genes")


def _check_dtype(dtype) -> None:
    # Integers travel as float64 (exact below 2^53, checked when they are sent):
    # upstream's ranks, f64 sums and integer check see the same numbers.
    if dtype not in _common.FLOATS and not (np.issubdtype(dtype, np.integer) and dtype.itemsize <= 8):
        raise Fallback(f"dtype {dtype}")


def _install() -> None:
    """Swap scanpy's ``_RankGenes`` for the subclass (once; it is inert unless serving)."""
    from scanpy.tools import _rank_genes_groups as mod

    with _install_lock:
        if getattr(mod._RankGenes, "_autozyme", False):
            return
        base = mod._RankGenes
        check = mod.check_nonnegative_integers

        class _RankGenes(base):
            _autozyme = True

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._autozyme_reply = None
                if getattr(_serving, "on", False):
                    # Asked right away: the reply also answers upstream's
                    # check_nonnegative_integers, which comes before the statistics.
                    self._autozyme_reply = _request_stats(self, _serving.tie_correct)
                    _serving.checked = (self.X, bool(self._autozyme_reply.nonneg_integers))

            def wilcoxon(self, *, tie_correct):
                reply = self._autozyme_reply
                if reply is None or bool(tie_correct) != reply.tie_correct:
                    yield from base.wilcoxon(self, tie_correct=tie_correct)
                    return
                yield from _wilcoxon(self, reply, tie_correct=tie_correct)

            def compute_statistics(self, method, **kwargs):
                if self._autozyme_reply is None or method != "wilcoxon" or set(kwargs) - _STATISTICS_KEYWORDS:
                    return base.compute_statistics(self, method, **kwargs)
                _compute_statistics(self, mod, **kwargs)

        def check_nonnegative_integers(x, /):
            known = getattr(_serving, "checked", None)
            if known is not None and known[0] is x:
                return known[1]
            return check(x)

        for cls_attr in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(_RankGenes, cls_attr, getattr(base, cls_attr))
        mod._RankGenes = _RankGenes
        mod.check_nonnegative_integers = check_nonnegative_integers


def _request_stats(self, tie_correct):
    """The daemon's per-gene statistics for this test object."""
    up = versions.pick(UPSTREAM)
    x = self.X
    _check_matrix(x, up)
    masks = np.asarray(self.groups_masks_obs, dtype=bool)
    n_groups, n_cells = masks.shape
    if masks.sum(axis=0).max(initial=0) > 1:
        raise Fallback("overlapping group masks")
    labels = np.full(n_cells, NO_GROUP, dtype=np.uint64)
    for g in range(n_groups):
        labels[masks[g]] = g
    sizes = [int(np.count_nonzero(m)) for m in masks]
    ref = self.ireference
    if ref is None and any(n_cells - s == 0 for s in sizes):
        raise Fallback("a group holds every cell (no rest to compare with)")
    n_sent = n_groups
    if up.aggregate_stats:
        # Upstream's ranks use the masks, its means the group codes of each cell:
        # the same partition, checked (O(cells)) rather than assumed.
        import pandas as pd

        codes = pd.Index(self.groups_order).get_indexer(self.group_col)
        if not np.array_equal(codes, np.where(labels == NO_GROUP, -1, labels.astype(np.int64))):
            raise Fallback("group codes and group masks disagree")
        if ref is None:
            # The cells of no selected group are aggregate's extra group.
            labels[labels == NO_GROUP] = n_groups
            n_sent = n_groups + 1
        slots = None
    else:
        # Upstream's means: CSR, numba's per-thread partials over rows; CSC
        # (numba's per-column kernel over sorted rows) and dense (numpy, row by
        # row), one sum in row order.
        import numba

        slots = int(numba.get_num_threads()) if sp.issparse(x) and x.format == "csr" else 1
    reference = None if ref is None else int(ref)
    if is_dask_array(x):
        # Blocks of genes, each ranked by its own machine's daemon (one reply
        # frame a block).
        reply = dask_path.group_stats(x, labels, n_sent, reference, tie_correct)
    else:
        if n_sent * x.shape[1] * 8 * 8 > codec.MAX_FRAME_BYTES:
            raise Fallback(f"{n_groups} groups x {x.shape[1]} genes exceed one reply frame")
        if sp.issparse(x) and x.format == "csc":
            x = x.tocsr()
        reply = wilcoxon_request.request(x, labels, n_sent, reference, tie_correct, slots)
    if int(reply.n_genes) != x.shape[1]:
        raise DaemonError("Internal", "gene count mismatch")
    reply.fields["tie_correct"] = bool(tie_correct)
    reply.fields["sizes"] = sizes
    reply.fields["n_sent"] = n_sent
    reply.fields["group_counts"] = np.bincount(labels[labels != NO_GROUP].astype(np.int64), minlength=n_sent)
    last.cache_hit = bool(reply.cache_hit)
    return reply


# compute_statistics' keywords besides ``method`` (anything else: upstream's own).
_STATISTICS_KEYWORDS = {"corr_method", "n_genes_user", "rankby_abs", "tie_correct"}


def _compute_statistics(self, mod, *, corr_method="benjamini-hochberg", n_genes_user=None,
                        rankby_abs=False, tie_correct=False):
    """Upstream's ``compute_statistics`` for the Wilcoxon test (the same in 1.11.5
    and 1.12.3-1.12.4): the same arrays from the same expressions, in the same
    order, but ``self.stats`` is made in one step instead of one pandas column
    insertion per group and field (45 for 9 groups, most of its time).

    Reproduced as upstream builds it: the columns in order of first assignment (a
    repeated group name overwrites in place), the MultiIndex levels in order of
    first appearance (``MultiIndex.insert`` appends; the order of the keys written
    to ``uns``), each array copied when stored (as ``DataFrame.__setitem__`` does,
    so the later ``pvals[isnan] = 1`` does not reach the stored p-values), the
    index ``var_names`` without ``n_genes_user`` (else a RangeIndex)."""
    import pandas as pd

    columns: dict[tuple[str, str], object] = {}
    n_genes = self.X.shape[1]
    for group_index, scores, pvals in self.wilcoxon(tie_correct=tie_correct):
        group_name = str(self.groups_order[group_index])
        if n_genes_user is not None:
            scores_sort = np.abs(scores) if rankby_abs else scores
            global_indices = mod._select_top_n(scores_sort, n_genes_user)
            columns[group_name, "names"] = self.var_names[global_indices]
        else:
            global_indices = slice(None)
        columns[group_name, "scores"] = np.array(scores[global_indices])
        if pvals is not None:
            columns[group_name, "pvals"] = np.array(pvals[global_indices])
            if corr_method == "benjamini-hochberg":
                from statsmodels.stats.multitest import multipletests

                pvals[np.isnan(pvals)] = 1
                _, pvals_adj, _, _ = multipletests(pvals, alpha=0.05, method="fdr_bh")
            elif corr_method == "bonferroni":
                pvals_adj = np.minimum(pvals * n_genes, 1.0)
            columns[group_name, "pvals_adj"] = np.array(pvals_adj[global_indices])
        if self.means is not None:
            mean_group = self.means[group_index]
            if self.ireference is None:
                mean_rest = self.means_rest[group_index]
            else:
                mean_rest = self.means[self.ireference]
            foldchanges = (self.expm1_func(mean_group) + 1e-9) / (self.expm1_func(mean_rest) + 1e-9)
            columns[group_name, "logfoldchanges"] = np.log2(foldchanges[global_indices])
    self.stats = None
    if not columns:
        return
    keys = list(columns)
    levels = [list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))]
    codes = [[levels[0].index(k[0]) for k in keys], [levels[1].index(k[1]) for k in keys]]
    stats = pd.DataFrame(dict(enumerate(columns.values())), copy=False)
    stats.columns = pd.MultiIndex(levels=levels, codes=codes)
    if n_genes_user is None:
        stats.index = self.var_names
    self.stats = stats


def _basic_stats_sliced(self, reply):
    """1.11.5's ``_basic_stats``: each row from its own group's (or rest's) slice."""
    n_groups, n_cells = self.groups_masks_obs.shape
    sizes = reply.sizes
    n_genes = int(reply.n_genes)
    sums = reply.sums.reshape(n_groups, n_genes)
    nnz = reply.nnz.reshape(n_groups, n_genes).astype(np.int64)
    self.means = np.zeros((n_groups, n_genes))
    self.vars = np.zeros((n_groups, n_genes))
    self.pts = np.zeros((n_groups, n_genes)) if self.comp_pts else None
    rest = self.ireference is None
    if rest:
        rest_sums = reply.rest_sums.reshape(n_groups, n_genes)
        rest_nnz = reply.rest_nnz.reshape(n_groups, n_genes).astype(np.int64)
        self.means_rest = np.zeros((n_groups, n_genes))
        self.vars_rest = np.zeros((n_groups, n_genes))
        self.pts_rest = np.zeros((n_groups, n_genes)) if self.comp_pts else None
    for g in range(n_groups):
        n_g = sizes[g]
        self.means[g] = sums[g] / n_g
        if self.comp_pts:
            self.pts[g] = nnz[g] / n_g
        if rest:
            n_rest = n_cells - n_g
            self.means_rest[g] = rest_sums[g] / n_rest
            if self.comp_pts:
                self.pts_rest[g] = rest_nnz[g] / n_rest


def _basic_stats_aggregated(self, reply):
    """1.12's ``_basic_stats`` (no variances): ``sc.get.aggregate``'s means and
    non-zero counts of every group sent, the rest's derived from them with
    upstream's expressions."""
    k = self.groups_masks_obs.shape[0]
    n_sent = reply.n_sent
    n_genes = int(reply.n_genes)
    group_counts = reply.group_counts
    # aggregate drops empty groups; upstream's arrays keep zeros there.
    present = group_counts > 0
    mean = np.zeros((n_sent, n_genes))
    mean[present] = reply.sums.reshape(n_sent, n_genes)[present] / group_counts[present][:, None]
    nnz = np.zeros((n_sent, n_genes)) if self.comp_pts else None
    if self.comp_pts:
        nnz[present] = reply.nnz.reshape(n_sent, n_genes)[present]
    self.vars = None
    if self.ireference is not None:
        self.means = mean
        self.pts = nnz / self.groups_masks_obs.sum(axis=1)[:, None] if self.comp_pts else None
        return
    n_sel = group_counts[:k]
    self.means = mean[:k]
    self.pts = nnz[:k] / n_sel[:, None] if self.comp_pts else None
    n_rest = (self.X.shape[0] - group_counts[:k])[:, None]
    total = (group_counts[:, None] * mean).sum(axis=0)
    self.means_rest = (total - group_counts[:k, None] * mean[:k]) / n_rest
    self.vars_rest = None
    self.pts_rest = (nnz.sum(axis=0) - nnz[:k]) / n_rest if self.comp_pts else None


def _wilcoxon(self, reply, *, tie_correct):
    """Upstream's ``_basic_stats`` and ``wilcoxon``, from the daemon's statistics."""
    from scanpy import logging as logg
    from scipy import stats

    n_groups, n_cells = self.groups_masks_obs.shape
    sizes = reply.sizes
    ref = self.ireference
    n_genes = int(reply.n_genes)
    if versions.pick(UPSTREAM).aggregate_stats:
        _basic_stats_aggregated(self, reply)
    else:
        _basic_stats_sliced(self, reply)
    rank_sums = reply.rank_sums.reshape(reply.n_sent, n_genes)[:n_groups]

    # wilcoxon: the z-scores and p-values, with upstream's expressions.
    if ref is not None:
        tie = reply.tie.reshape(reply.n_sent, n_genes)
        m_active = sizes[ref]
        for g in range(n_groups):
            if g == ref:
                continue
            n_active = sizes[g]
            if n_active <= 25 or m_active <= 25:
                logg.hint("Few observations in a group for normal approximation (<=25). Lower test accuracy.")
            tc_coef = tie[g] if tie_correct else 1
            scores = rank_sums[g].copy()
            std_dev = np.sqrt(tc_coef * n_active * m_active * (n_active + m_active + 1) / 12.0)
            scores = (scores - (n_active * ((n_active + m_active + 1) / 2.0))) / std_dev
            scores[np.isnan(scores)] = 0
            pvals = 2 * stats.distributions.norm.sf(np.abs(scores))
            yield g, scores, pvals
    else:
        tie = reply.tie.reshape(1, n_genes)
        scores = rank_sums.copy()
        for g in range(n_groups):
            n_active = sizes[g]
            coef = tie[0] if tie_correct else 1
            std_dev = np.sqrt(coef * n_active * (n_cells - n_active) * (n_cells + 1) / 12.0)
            scores[g, :] = (scores[g, :] - (n_active * (n_cells + 1) / 2.0)) / std_dev
            scores[np.isnan(scores)] = 0
            pvals = 2 * stats.distributions.norm.sf(np.abs(scores[g, :]))
            yield g, scores[g], pvals
