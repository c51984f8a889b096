"""sc.pp.highly_variable_genes(flavor="seurat_v3" | "seurat_v3_paper") on a dask
array, as scanpy 1.12.4 computes it (row chunks of CSR or dense blocks).

What upstream does with a dask array, and what happens here:

1. ``check_nonnegative_integers``: one task on the whole matrix (``map_blocks``
   with both axes dropped concatenates every block); ``bool()`` of it computes.
   The answer is the AND of every block's check.
2. ``fast_array_utils.stats.mean_var``: two ``da.reduction`` sums over the row
   blocks (values, and ``power(x, 2, dtype=f64)``), each block summed in f64
   (scipy's ``csr_array(x, dtype=f64).sum(axis=0)``: per gene in row order from
   0.0; dense: numpy's ``sum(axis=0, dtype=f64)``), the block sums combined by
   dask's tree (``_dask_block`` sums, ``split_every`` 16); pandas computes the
   means and the variances column by column.
3. With a ``batch_key``, ``sc.get.aggregate`` (``aggregate_dask_mean_var``): per
   block ``(count, mean, M2)`` of every batch (``_block_moments``: the Welford
   kernels with dof 0, ``M2 = var * count``), combined across blocks by
   ``_chan_reduce_axis_0`` in a ``da.reduction``; then ``var = M2 / (count - 1)``.
4. The loess fits, in memory, per batch.
5. ``clip_square_sum`` per batch on ``data[batch_info == b]``: dask's ``take``
   regroups the batch's rows into blocks of its own choosing; per such block the
   sums of the clipped values and of their squares (numba, row order), stacked
   ``(1, 2, genes)`` and added over the blocks by ``.sum(axis=0)``.

Steps 1-3 are one pass here: one task per row block places the block once in
shared memory and runs the daemon's ``HvgMeanVar`` (only for its value check),
``ScaleChunkStats`` (the f64 sums of the values and of their f64 squares in row
order) and ``HvgBatchWelford`` (the Welford kernels' operations), and packs the
results in one row; upstream's own reduction
functions then combine those rows over the same tree as upstream's (the same
block count, ``split_every`` and combine functions), so every sum is added in
upstream's order. This computes once where upstream computes four times (and
evaluates the input graph once instead of four times).

Step 5, dense: upstream's graph (its ``take``, ``map_blocks`` and ``.sum``) with
the daemon's ``HvgClippedSums`` as the block function. CSR: no ``take``. The
blocks of ``data[mask]`` gather each batch's rows across chunk boundaries, and
upstream adds a block's values in one sequence; so one task per chunk, chained
in chunk order, labels every row with its (batch, block) and has
``HvgClippedSumsFrom`` continue each block's sums from the previous chunk. The
finished blocks' rows go into upstream's ``.sum(axis=0)`` over the same number
of blocks, so the same tree.

A block the daemon cannot serve is computed by upstream's own block code in the
same task (``chunks.run``), giving the same row.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import shm
from ..codec import msg
from ..fallback import Delegate, Fallback
from ..patches import _common
from . import chunks

CALL = "highly_variable_genes"
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INTEGERS = (np.dtype(np.int32), np.dtype(np.int64))
INDEX = (np.dtype(np.int32), np.dtype(np.int64))
# Packed per-block row: [ok, finite, sums (G), squares (G), moments (3 x K x G)].
_HEAD = 2


def _kind(data) -> str:
    """'csr' or 'dense' for the row-chunked dask arrays served, else Fallback."""
    import scipy.sparse as sp

    meta = data._meta
    if data.ndim != 2:
        raise Fallback(f"{data.ndim}-d dask array")
    if isinstance(meta, np.ndarray) and not isinstance(meta, np.matrix):
        kind = "dense"
    elif sp.issparse(meta) and meta.format == "csr":
        kind = "csr"
    else:
        raise Fallback(f"dask array of {type(meta).__name__} blocks")
    if data.dtype not in FLOATS + INTEGERS:
        raise Fallback(f"dask array of dtype {data.dtype}")
    if kind == "dense" and data.shape[1] < 2:
        # numpy sums a single column pairwise, not row by row.
        raise Fallback("dense blocks with fewer than two genes")
    if any(np.isnan(c) for c in data.chunks[0]):
        raise Fallback("row blocks of unknown size")
    if any(c == 0 for c in data.chunks[0]):
        raise Fallback("a row block of no rows")
    return kind


# --- per-block statistics (steps 1-3) ------------------------------------------


def _placed(block, kind: str):
    """The block in one shared-memory segment (the daemon's three requests read
    it there, instead of copying it in three times), and its wire Matrix. Float
    values keep their dtype (every kernel widens each value to f64 as upstream
    does); integer counts become f64, the conversion upstream makes."""
    if kind == "csr":
        if block.indices.dtype not in INDEX or block.indptr.dtype not in INDEX:
            raise Fallback(f"index dtype {block.indices.dtype}/{block.indptr.dtype}")
        # A malformed structure is refused (BadInput) as for an in-memory matrix:
        # upstream's compiled block code would read out of bounds on it.
        _common.check_csr_structure(block)
        dtype = block.data.dtype if block.data.dtype in FLOATS else np.dtype(np.float64)
        nnz = len(block.data)
        sizes = [nnz * dtype.itemsize, block.indices.nbytes, block.indptr.nbytes]
        offsets = np.cumsum([0] + [-(-s // 64) * 64 for s in sizes])
        buf = shm.empty((max(int(offsets[-1]), 1),), np.uint8)
        data = buf[offsets[0] : offsets[0] + sizes[0]].view(dtype)
        indices = buf[offsets[1] : offsets[1] + sizes[1]].view(block.indices.dtype)
        indptr = buf[offsets[2] : offsets[2] + sizes[2]].view(block.indptr.dtype)
        np.copyto(data, block.data, casting="safe")
        np.copyto(indices, block.indices)
        np.copyto(indptr, block.indptr)
        refs = [shm.ref(a) for a in (data, indices, indptr)]
        m = msg("Csr", n_rows=block.shape[0], n_cols=block.shape[1], data=refs[0],
                indices=refs[1], indptr=refs[2])
        return m, buf
    x = np.asarray(block)
    data = shm.empty(x.shape, x.dtype if x.dtype in FLOATS else np.float64)
    np.copyto(data, x, casting="safe")
    return msg("Dense", n_rows=x.shape[0], n_cols=x.shape[1], data=shm.ref(data)), data


def _local_batches(codes_sub: np.ndarray, n_batches: int):
    """The block's batch codes renumbered over the batches present in it (the
    daemon wants at most one batch per row), and those batches."""
    present = np.flatnonzero(np.bincount(codes_sub, minlength=n_batches))
    local = np.searchsorted(present, codes_sub).astype(np.uint64)
    return local, present


def _stats_fast(block, codes_sub, n_batches: int, batched: bool, kind: str):
    from ..client import get_client

    n_rows, n_genes = block.shape
    matrix, keep = _placed(block, kind)
    client = get_client()
    one = np.empty(0, np.uint64)
    flags = client.call(msg("HvgMeanVar", x=matrix, batches=one, n_batches=1, partitions=1,
                            check=True, with_overall=False))
    # fast-array-utils' dask mean_var block sums: rows in order from 0.0, values
    # widened to f64 before squaring (ScaleChunkStats, sc.pp.scale's dask leaf).
    sums = client.call(msg("ScaleChunkStats", x=matrix))
    out = np.zeros(_row_length(n_genes, n_batches, batched), dtype=np.float64)
    out[0] = not (flags.negative or flags.non_integer or flags.non_finite)
    out[1] = not flags.non_finite
    out[_HEAD : _HEAD + n_genes] = sums.sums
    out[_HEAD + n_genes : _HEAD + 2 * n_genes] = sums.sq_sums
    if batched:
        moments = out[_HEAD + 2 * n_genes :].reshape(3, n_batches, n_genes)
        counts = np.bincount(codes_sub, minlength=n_batches)
        moments[0] = counts[:, None]
        local, present = _local_batches(codes_sub, n_batches)
        w = client.call(msg("HvgBatchWelford", x=matrix, batches=local,
                            n_batches=len(present)))
        means = np.asarray(w.means).reshape(len(present), n_genes)
        variances = np.asarray(w.variances).reshape(len(present), n_genes)
        # _block_moments: M2 = (biased) var * count; absent batches keep zeros.
        moments[1, present] = means
        moments[2, present] = variances * counts[present][:, np.newaxis]
    del keep
    return out[None, :]


def _stats_upstream(block, codes_sub, n_batches: int, batched: bool, kind: str):
    """The same row from upstream's own block code."""
    import pandas as pd
    from fast_array_utils import stats
    from fast_array_utils.stats._power import power
    from scanpy._utils import check_nonnegative_integers
    from scanpy.get._aggregated import _block_moments

    n_genes = block.shape[1]
    out = np.zeros(_row_length(n_genes, n_batches, batched), dtype=np.float64)
    values = block.data if kind == "csr" else np.asarray(block)
    out[0] = bool(check_nonnegative_integers(block))
    out[1] = bool(np.isfinite(values).all())
    out[_HEAD : _HEAD + n_genes] = stats.sum(block, axis=0, dtype=np.float64)
    out[_HEAD + n_genes : _HEAD + 2 * n_genes] = stats.sum(
        power(block, 2, dtype=np.float64), axis=0, dtype=np.float64)
    if batched:
        by = pd.Categorical.from_codes(codes_sub.astype(np.int64), categories=np.arange(n_batches))
        out[_HEAD + 2 * n_genes :] = _block_moments(
            block, by, mask=None, n_categories=n_batches).reshape(-1)
    return out[None, :]


def _row_length(n_genes: int, n_batches: int, batched: bool) -> int:
    return _HEAD + 2 * n_genes + (3 * n_batches * n_genes if batched else 0)


def block_stats(block, *, codes, n_batches: int, batched: bool, kind: str, block_info=None):
    """One row block's packed statistics (a dask task)."""
    rows = slice(*block_info[0]["array-location"][0])
    codes_sub = np.asarray(codes[rows], dtype=np.int64)
    return chunks.run(CALL, _stats_fast, _stats_upstream, block, codes_sub, n_batches, batched,
                      kind)


def _columns(block, *, lo: int, hi: int):
    return block[:, lo:hi]


def _moments(block, *, lo: int, n_batches: int, n_genes: int):
    return block[:, lo:].reshape(1, 3, n_batches, n_genes)


def _identity(x, axis=None, keepdims=False):
    return x


def _dask_sum(rows):
    """fast_array_utils' dask sum over axis 0 from per-block rows: its block
    function gives each block's ``(1, genes)`` sums (here already computed), its
    aggregate adds them over dask's tree."""
    import dask.array as da
    from fast_array_utils.stats._utils import _dask_block

    agg = functools.partial(_dask_block, "sum", dtype=np.float64)
    return da.reduction(rows, _identity, agg, axis=0, dtype=np.float64,
                        meta=np.array([], dtype=np.float64))


def statistics(data, kind: str, codes, n_batches: int, batched: bool):
    """Computes (once) everything upstream computes before its loess fits:
    whether every value is a non-negative integer, all cells' means and
    variances, and with ``batched`` each batch's means and variances (row
    ``k`` of ``codes``' batch ``k``)."""
    import dask.array as da
    from scanpy.get._aggregated import _chan_reduce_axis_0

    n_rows, n_genes = data.shape
    n_blocks = data.numblocks[0]
    width = _row_length(n_genes, n_batches, batched)
    fn = functools.partial(block_stats, codes=codes, n_batches=n_batches, batched=batched,
                           kind=kind)
    packed = data.map_blocks(fn, chunks=((1,) * n_blocks, (width,)), dtype=np.float64,
                             meta=np.array([], dtype=np.float64))
    flags = packed.map_blocks(functools.partial(_columns, lo=0, hi=_HEAD),
                              chunks=((1,) * n_blocks, (_HEAD,)), dtype=np.float64)
    sums = packed.map_blocks(functools.partial(_columns, lo=_HEAD, hi=_HEAD + n_genes),
                             chunks=((1,) * n_blocks, (n_genes,)), dtype=np.float64)
    squares = packed.map_blocks(
        functools.partial(_columns, lo=_HEAD + n_genes, hi=_HEAD + 2 * n_genes),
        chunks=((1,) * n_blocks, (n_genes,)), dtype=np.float64)
    todo = [flags, _dask_sum(sums), _dask_sum(squares)]
    if batched:
        per_block = packed.map_blocks(
            functools.partial(_moments, lo=_HEAD + 2 * n_genes, n_batches=n_batches,
                              n_genes=n_genes),
            chunks=((1,) * n_blocks, (3,), (n_batches,), (n_genes,)), new_axis=(2, 3),
            dtype=np.float64, meta=np.array([], dtype=np.float64))
        # aggregate_dask_mean_var's reduction, with its own combine function.
        todo.append(da.reduction(
            per_block, chunk=_identity, aggregate=_chan_reduce_axis_0, axis=0, keepdims=False,
            concatenate=True, dtype=np.float64, meta=np.array([], dtype=np.float64)))
    got = da.compute(*todo)
    flags, total, total_sq = got[0], got[1], got[2]
    if not flags[:, 1].all():
        raise Delegate("NaN or infinite values")
    nonneg_integers = bool(flags[:, 0].all())
    # fast_array_utils' mean_var: mean(x), mean(power(x, 2)) and the correction,
    # its dask expressions on the computed sums (each elementwise, so the same).
    n = n_rows
    mean = total / n
    var = total_sq / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    if not batched:
        return nonneg_integers, mean, var, None, None
    combined = got[3]
    counts, batch_mean, m2 = combined[0], combined[1], combined[2]
    denom = np.where(counts > 1, counts - 1, np.nan)
    return nonneg_integers, mean, var, batch_mean, m2 / denom


# --- clipped sums (step 5) -----------------------------------------------------


def _clipped_fast(block, clip):
    """A dense block's clipped sums by the daemon (``HvgClippedSums``, one batch),
    reading the block from this process's memory."""
    from ..client import get_client

    x = shm.peer_ready(block)  # (a block unpickled from a Dask transfer may be unaligned)
    if x.dtype in INTEGERS:
        x = x.astype(np.float64)  # upstream widens each value (astype(float64))
    if _peer_refused:
        x = shm.placed(x)
    ref = shm.ref(x) if _peer_refused else shm.peer_ref(x)
    matrix = msg("Dense", n_rows=x.shape[0], n_cols=x.shape[1], data=ref)
    got = get_client().call(msg("HvgClippedSums", x=matrix, batches=np.empty(0, np.uint64),
                                n_batches=1, clip=clip, only=None))
    del x  # (kept alive until the daemon has read it)
    return np.vstack((np.asarray(got.squares), np.asarray(got.sums)))[None, ...]


_peer_refused = False


def _clipped_with_retry(block, clip):
    """Peer references first; a daemon that may not read this process's memory
    gets shared-memory copies (once refused, always)."""
    global _peer_refused
    from ..client import DaemonError

    try:
        return _clipped_fast(block, clip)
    except DaemonError as e:
        if e.kind == "Unsupported" and not _peer_refused and "client's memory" in str(e):
            _peer_refused = True
            return _clipped_fast(block, clip)
        raise


def _clipped_upstream(block, clip):
    from scanpy.preprocessing._highly_variable_genes import clip_square_sum

    return np.vstack(clip_square_sum(block, clip))[None, ...]


def clipped_block(block, *, clip):
    """One dense block of ``data[batch_info == b]``: its clipped squares and sums
    (a dask task)."""
    return chunks.run(CALL, _clipped_with_retry, _clipped_upstream, block, clip)


def clipped_sums(data, kind: str, masks, clips):
    """Per batch, (sums of squares, sums) of the clipped values, as upstream's
    ``clip_square_sum`` on ``data[mask]`` computes them: one ``(1, 2, genes)``
    row per block of ``data[mask]`` (dask's ``take`` decides the blocks), added
    over those blocks by ``.sum(axis=0)``; all batches computed together.

    Dense: upstream's graph, with the daemon's ``HvgClippedSums`` as the block
    function (4.5x upstream's f64 copy, putmask and numpy sums).

    CSR: the same rows without the ``take``. A block of ``data[mask]`` gathers
    its rows from several chunks and upstream adds them in one sequence (numba,
    row order, from 0.0). Here one task per chunk, each after the previous one,
    sends the chunk with every row labelled by its (batch, block) to
    ``HvgClippedSumsFrom``, which continues each block's sums from where the
    previous chunk left them: the same additions in the same order, without
    copying any row. Each finished block's row then goes into the same
    ``.sum(axis=0)`` (same block count, so the same tree) as upstream's."""
    import dask.array as da

    n_genes = data.shape[1]
    if kind == "csr":
        return _clipped_sums_csr(data, masks, clips)
    todo = []
    for mask, clip in zip(masks, clips):
        sub = data[mask]
        fn = functools.partial(clipped_block, clip=np.asarray(clip, dtype=np.float64))
        sq, s = sub.map_blocks(
            fn, new_axis=(1,), chunks=((1,) * sub.blocks.size, (2,), (n_genes,)),
            meta=np.array([]), dtype=np.float64,
        ).sum(axis=0)
        todo += [sq, s]
    got = da.compute(*todo)
    return [(got[2 * b], got[2 * b + 1]) for b in range(len(masks))]


def _pieces(data, masks):
    """For each chunk: its rows' piece numbers and its pieces, a piece being the
    rows of one block of ``data[mask]`` (batch ``b``, block ``k``) in this chunk,
    as (b, k, continues from an earlier chunk, ends in this chunk); and each
    batch's block count."""
    bounds = np.cumsum((0,) + tuple(data.chunks[0]))
    n_chunks = len(bounds) - 1
    piece_of_row = [np.empty(int(bounds[i + 1] - bounds[i]), np.int64) for i in range(n_chunks)]
    pieces = [[] for _ in range(n_chunks)]
    n_blocks = []
    for b, mask in enumerate(masks):
        rows = np.flatnonzero(mask)
        sizes = data[mask].chunks[0]  # dask's take decides these blocks
        n_blocks.append(len(sizes))
        starts = np.cumsum((0,) + tuple(sizes))
        for k in range(len(sizes)):
            block_rows = rows[starts[k] : starts[k + 1]]
            chunk_of = np.searchsorted(bounds, block_rows, side="right") - 1
            where = np.flatnonzero(np.diff(chunk_of)) + 1
            parts = np.split(np.arange(len(block_rows)), where)
            for j, part in enumerate(parts):
                i = int(chunk_of[part[0]])
                piece_of_row[i][block_rows[part] - bounds[i]] = len(pieces[i])
                pieces[i].append((b, k, j > 0, j == len(parts) - 1))
    return piece_of_row, pieces, n_blocks


def _clip_chain_fast(block, carry, piece_of_row, pieces, clips):
    from ..client import get_client

    n_genes = block.shape[1]
    # Placed in shared memory: reading it there beats the daemon copying it in
    # from this process (7.3 + 2.9 ms against 12.7 ms for a 2.5 M-value chunk).
    matrix, keep = _placed(block, "csr")
    start_s = np.zeros((len(pieces), n_genes))
    start_q = np.zeros((len(pieces), n_genes))
    for p, (b, k, continues, _) in enumerate(pieces):
        if continues:
            start_s[p], start_q[p] = carry[(b, k)]
    clip = np.stack([clips[b] for b, _, _, _ in pieces]).astype(np.float64, copy=False)
    got = get_client().call(msg(
        "HvgClippedSumsFrom", x=matrix, batches=piece_of_row.astype(np.uint64),
        n_batches=len(pieces), clip=clip.reshape(-1), sums=start_s.reshape(-1),
        squares=start_q.reshape(-1)))
    del keep
    sums = np.asarray(got.sums).reshape(len(pieces), n_genes)
    squares = np.asarray(got.squares).reshape(len(pieces), n_genes)
    return _chain_out(carry, pieces, sums, squares)


def _clip_chain_upstream(block, carry, piece_of_row, pieces, clips):
    """The same continued sums in upstream's order of operations (numba's
    ``_sum_and_sum_squares_clipped``: per stored value in row order,
    ``e = min(f64(v), clip)``, ``squares += e**2``, ``sums += e``), row by row
    with ``np.add.at`` (unbuffered, in index order)."""
    block = block if isinstance(block, np.ndarray) else block.tocsr()
    n_genes = block.shape[1]
    sums = np.zeros((len(pieces), n_genes))
    squares = np.zeros((len(pieces), n_genes))
    for p, (b, k, continues, _) in enumerate(pieces):
        if continues:
            sums[p], squares[p] = carry[(b, k)]
    clip_of = [np.asarray(clips[b], dtype=np.float64) for b, _, _, _ in pieces]
    indptr, indices, data = block.indptr, block.indices, block.data
    for r in range(block.shape[0]):
        p = piece_of_row[r]
        lo, hi = indptr[r], indptr[r + 1]
        idx = indices[lo:hi]
        v, c = data[lo:hi].astype(np.float64), clip_of[p][idx]
        e = np.where(v > c, c, v)
        np.add.at(squares[p], idx, e * e)
        np.add.at(sums[p], idx, e)
    return _chain_out(carry, pieces, sums, squares)


def _chain_out(carried, pieces, sums, squares):
    """({(b, k): finished block row (1, 2, genes)}, {(b, k): (sums, squares)} to
    carry into the next chunk: this chunk's unfinished blocks, and the blocks
    carried in that have no row here (they continue in a later chunk))."""
    done, carry = {}, dict(carried)
    for p, (b, k, _, ends) in enumerate(pieces):
        if ends:
            done[(b, k)] = np.vstack((squares[p], sums[p]))[None, ...]
            carry.pop((b, k), None)
        else:
            carry[(b, k)] = (sums[p], squares[p])
    return done, carry


def clip_chain_step(block, previous, *, piece_of_row, pieces, clips):
    """One chunk's step of the CSR clipped sums (a dask task)."""
    carry = previous[1] if previous is not None else {}
    return chunks.run(CALL, _clip_chain_fast, _clip_chain_upstream, block, carry,
                      piece_of_row, pieces, clips)


def _finished(step, key):
    return step[0][key]


def _clipped_sums_csr(data, masks, clips):
    """The chained CSR clipped sums (see ``clipped_sums``). The steps run one
    after another (each block's additions are one sequence through the chunks),
    each using all threads of its machine's daemon; on a cluster of several
    machines this step therefore does not spread over them as upstream's does."""
    import dask
    import dask.array as da

    n_genes = data.shape[1]
    piece_of_row, pieces, n_blocks = _pieces(data, masks)
    blocks = data.to_delayed().reshape(-1)
    clips = [np.asarray(c, dtype=np.float64) for c in clips]
    steps, ends_in = [], {}
    previous = None
    for i, block in enumerate(blocks):
        used = sorted({b for b, _, _, _ in pieces[i]})
        step = dask.delayed(clip_chain_step, pure=True)(
            block, previous, piece_of_row=piece_of_row[i], pieces=pieces[i],
            clips={b: clips[b] for b in used})
        for b, k, _, ends in pieces[i]:
            if ends:
                ends_in[(b, k)] = step
        steps.append(step)
        previous = step
    todo = []
    for b in range(len(masks)):
        rows = [
            da.from_delayed(dask.delayed(_finished, pure=True)(ends_in[(b, k)], (b, k)),
                            shape=(1, 2, n_genes), dtype=np.float64,
                            meta=np.array([], dtype=np.float64).reshape(0, 0, 0))
            for k in range(n_blocks[b])
        ]
        sq, s = da.concatenate(rows, axis=0).sum(axis=0)
        todo += [sq, s]
    got = da.compute(*todo)
    return [(got[2 * b], got[2 * b + 1]) for b in range(len(masks))]


# --- the call ------------------------------------------------------------------


def compute(adata, data, loess, *, up, flavor, batch_key, n_top_genes, check_values, span):
    """upstream's ``_highly_variable_genes_seurat_v3`` on a dask array, up to the
    result DataFrame (the patch writes it as upstream does)."""
    from scanpy._utils import raise_if_dask_feature_axis_chunked

    from ..patches import highly_variable_genes as hvg

    try:
        raise_if_dask_feature_axis_chunked(data)
    except ValueError as e:
        raise Delegate(str(e)) from None
    kind = _kind(data)
    batched = batch_key is not None
    codes, n_batches, sizes, labels = hvg._batches(adata, batch_key)
    if (np.asarray(sizes) < 2).any():
        # aggregate's NaN variance and the division by zero that follows warn from
        # dask's threads in upstream; left to upstream.
        raise Fallback("a batch of one cell")
    n_rows, n_genes = data.shape
    codes = np.zeros(n_rows, np.int64) if codes is None else codes.astype(np.int64)

    nonneg_integers, mean_all, var_all, batch_means, batch_vars = statistics(
        data, kind, codes, n_batches, batched)
    # upstream warns here; given once the loess fits have succeeded, since where a
    # fit fails upstream runs again and gives it itself (with its error).
    warn_non_integers = check_values and not nonneg_integers
    if not batched:
        batch_means, batch_vars = [mean_all], [var_all]

    # upstream's per-batch loess, verbatim in what it computes
    reg_stds, clips = [], []
    for b in range(n_batches):
        mean, var = batch_means[b], batch_vars[b]
        estimat_var = np.zeros(n_genes, dtype=np.float64)
        if (not_const := var > 0).any():
            y = np.log10(var[not_const])
            x = np.log10(mean[not_const])
            hvg._check_loess_input(int(np.count_nonzero(not_const)), span, labels[b])
            model = loess(x, y, span=span, degree=2)
            model.fit()
            estimat_var[not_const] = model.outputs.fitted_values
        reg_std = np.sqrt(10**estimat_var)
        clips.append(reg_std * np.sqrt(int(sizes[b])) + mean)
        reg_stds.append(reg_std)

    if warn_non_integers:
        hvg._warn_non_integers(up, flavor)
    masks = [codes == b for b in range(n_batches)]
    sums = clipped_sums(data, kind, masks, clips)
    norm_gene_vars = []
    for b in range(n_batches):
        n_obs = int(sizes[b])
        mean, reg_std = batch_means[b], reg_stds[b]
        squared_batch_counts_sum, batch_counts_sum = sums[b]
        norm_gene_var = (1 / ((n_obs - 1) * np.square(reg_std))) * (
            (n_obs * np.square(mean)) + squared_batch_counts_sum - 2 * batch_counts_sum * mean
        )
        norm_gene_vars.append(norm_gene_var.reshape(1, -1))
    return hvg._rank(mean_all, var_all, norm_gene_vars, flavor=flavor,
                     n_top_genes=n_top_genes, var_names=adata.var_names)
