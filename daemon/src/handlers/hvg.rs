//! highly_variable_genes (flavor `seurat_v3` / `seurat_v3_paper`): the
//! O(stored values) steps (statistics, then clipped sums), with the loess fits
//! between them done by the shim. Batch statistics come as scanpy 1.11.5 computes
//! them (`mean_var`: sums) or as 1.12.2 and later do (`batch_welford`).

use crate::error::{Failure, Result};
use crate::kernels::hvg_batch_welford::{csr_batch_welford, dense_batch_welford, BatchMeanVar};
use crate::kernels::hvg_clipped_sums::{csr_clipped_sums, dense_clipped_sums, ClippedSums};
use crate::kernels::hvg_mean_var::{
    csr_group_sums, csr_group_sums_checked, dense_group_sums, value_flags, GroupMeanVar, GroupSums,
    ValueFlags,
};
use crate::kernels::{Float, SparseIndex};
use crate::server::state::Daemon;
use crate::shm::{
    visit_csr, CsrRegions, CsrVisitor, FloatSlice, IndexSlice, MatrixRegions, Peer, Resolver,
};
use autozyme_protocol::{ErrorKind, Matrix, Response, MAX_FRAME_BYTES};

/// numba's thread count is at most a few hundred; more is a malformed request.
const MAX_PARTITIONS: u64 = 1 << 16;

/// Each batch's rows, in increasing order; `batches` empty means one batch of
/// every row.
fn batch_rows(batches: &[u64], n_batches: u64, n_rows: usize) -> Result<Vec<Vec<usize>>> {
    if batches.is_empty() {
        if n_batches != 1 {
            return Err(Failure::bad_request(format!(
                "no batches given, so n_batches must be 1, not {n_batches}"
            )));
        }
        return Ok(vec![(0..n_rows).collect()]);
    }
    if batches.len() != n_rows {
        return Err(Failure::bad_request(format!(
            "{} batch codes for {n_rows} cells",
            batches.len()
        )));
    }
    let n = usize::try_from(n_batches)
        .ok()
        .filter(|&n| n >= 1 && n <= n_rows)
        .ok_or_else(|| Failure::bad_request(format!("n_batches {n_batches} for {n_rows} cells")))?;
    let mut rows = vec![Vec::new(); n];
    for (r, &b) in batches.iter().enumerate() {
        let group = usize::try_from(b)
            .ok()
            .and_then(|b| rows.get_mut(b))
            .ok_or_else(|| {
                Failure::bad_request(format!("cell {r} has batch {b}, not below {n_batches}"))
            })?;
        group.push(r);
    }
    Ok(rows)
}

/// Two `groups × n_cols` f64 vectors must fit in one reply frame.
fn check_reply_size(groups: usize, n_cols: usize) -> Result<()> {
    let bytes = (groups as u128) * (n_cols as u128) * 16;
    if bytes + 4096 > MAX_FRAME_BYTES as u128 {
        return Err(Failure::new(
            ErrorKind::TooLarge,
            format!("{groups} batches x {n_cols} genes do not fit in one reply"),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn mean_var(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    batches: &[u64],
    n_batches: u64,
    partitions: u64,
    check: bool,
    with_overall: bool,
) -> Result<Response> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(Failure::bad_request(format!(
            "partitions must be in 1..={MAX_PARTITIONS}, not {partitions}"
        )));
    }
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let m = MatrixRegions::resolve(&mut resolver, x)?;
    let (n_rows, n_cols) = m.shape();
    let batch_groups = batch_rows(batches, n_batches, n_rows)?;
    check_reply_size(batch_groups.len() + usize::from(with_overall), n_cols)?;
    let job = MeanVarJob {
        batch_groups,
        n_rows,
        n_cols,
        partitions: partitions as usize,
        check,
        with_overall,
    };
    let (stats, flags) = match &m {
        MatrixRegions::Csr(csr) => {
            let work = CsrWork::MeanVar { job: &job };
            match run_csr(csr, &[], work) {
                CsrOut::MeanVar(stats) => stats?,
                _ => unreachable!("asked for means and variances"),
            }
        }
        MatrixRegions::Dense(dense) => {
            let (r, c) = (dense.n_rows, dense.n_cols);
            match dense.data.floats().expect("dtype checked") {
                FloatSlice::F32(d) => job.run(|g, check| dense_sums(d, r, c, g, check))?,
                FloatSlice::F64(d) => job.run(|g, check| dense_sums(d, r, c, g, check))?,
            }
        }
    };
    Ok(Response::HvgMeanVar {
        means: stats.means,
        variances: stats.variances,
        negative: flags.negative,
        non_integer: flags.non_integer,
        non_finite: flags.non_finite,
    })
}

/// A `HvgMeanVar` request's groups and how to get all cells' statistics.
struct MeanVarJob {
    batch_groups: Vec<Vec<usize>>,
    n_rows: usize,
    n_cols: usize,
    partitions: usize,
    check: bool,
    with_overall: bool,
}

impl MeanVarJob {
    /// `sums_of(groups, check)` computes the groups' sums in upstream's order and,
    /// with `check`, the flags of the values it added and how many column indices
    /// it skipped as out of range. All cells' sums come from adding the batches'
    /// sums when every sum is exact whatever the order (non-negative integer
    /// counts, far from 2^53), and from a pass of their own in upstream's order
    /// otherwise. The batches cover every cell once, so the first pass sees every
    /// stored value.
    fn run(
        &self,
        sums_of: impl Fn(&[Vec<usize>], bool) -> (GroupSums, ValueFlags, usize),
    ) -> Result<(GroupMeanVar, ValueFlags)> {
        let n_cols = self.n_cols;
        let checking = self.check || self.with_overall;
        let (by_batch, flags, bad) = sums_of(&self.batch_groups, checking);
        if checking && bad > 0 {
            return Err(Failure::bad_matrix(format!(
                "{bad} CSR column indices are outside 0..{n_cols}"
            )));
        }
        let mut sizes: Vec<usize> = self.batch_groups.iter().map(Vec::len).collect();
        let sums = if !self.with_overall {
            by_batch
        } else {
            let mut all = if flags.sums_are_exact(self.n_rows) {
                by_batch.pooled(n_cols)
            } else {
                sums_of(&[(0..self.n_rows).collect()], false).0
            };
            all.sums.extend_from_slice(&by_batch.sums);
            all.squares.extend_from_slice(&by_batch.squares);
            sizes.insert(0, self.n_rows);
            all
        };
        let flags = if self.check {
            flags
        } else {
            ValueFlags::default()
        };
        Ok((sums.mean_var(&sizes, n_cols), flags))
    }
}

pub(super) fn clipped_sums(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    batches: &[u64],
    n_batches: u64,
    clip: &[f64],
    only: Option<u64>,
) -> Result<Response> {
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let m = MatrixRegions::resolve(&mut resolver, x)?;
    let (n_rows, n_cols) = m.shape();
    let mut groups = batch_rows(batches, n_batches, n_rows)?;
    if let Some(b) = only {
        let b = usize::try_from(b)
            .ok()
            .filter(|&b| b < groups.len())
            .ok_or_else(|| Failure::bad_request(format!("no batch {b} of {n_batches}")))?;
        groups = vec![std::mem::take(&mut groups[b])];
    }
    check_reply_size(groups.len(), n_cols)?;
    if clip.len() as u128 != (groups.len() as u128) * (n_cols as u128) {
        return Err(Failure::bad_request(format!(
            "{} clip values for {} batches x {n_cols} genes",
            clip.len(),
            groups.len()
        )));
    }
    let sums = match &m {
        MatrixRegions::Csr(csr) => {
            // Enough column blocks to keep every thread busy with few batches; a
            // request for one batch of several gets one thread (each column block
            // reads all the batch's values): its client overlaps such requests
            // with work of its own.
            let blocks = match only {
                Some(_) => 1,
                None => rayon::current_num_threads().div_ceil(groups.len().max(1)),
            };
            let work = CsrWork::Clipped {
                clip,
                blocks,
                from: None,
            };
            match run_csr(csr, &groups, work) {
                CsrOut::Clipped(sums) => sums,
                _ => unreachable!("asked for clipped sums"),
            }
        }
        MatrixRegions::Dense(dense) => {
            let (r, c) = (dense.n_rows, dense.n_cols);
            match dense.data.floats().expect("dtype checked") {
                FloatSlice::F32(d) => dense_clipped_sums(d, r, c, &groups, clip),
                FloatSlice::F64(d) => dense_clipped_sums(d, r, c, &groups, clip),
            }
        }
    };
    let ClippedSums { sums, squares } = sums;
    Ok(Response::HvgClippedSums { sums, squares })
}

/// `Request::HvgClippedSumsFrom`: a CSR chunk's clipped sums per batch, each
/// continuing from the given sums.
#[allow(clippy::too_many_arguments)]
pub(super) fn clipped_sums_from(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    batches: &[u64],
    n_batches: u64,
    clip: &[f64],
    sums: &[f64],
    squares: &[f64],
) -> Result<Response> {
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let m = MatrixRegions::resolve(&mut resolver, x)?;
    let (n_rows, n_cols) = m.shape();
    let groups = batch_rows(batches, n_batches, n_rows)?;
    check_reply_size(groups.len(), n_cols)?;
    let want = (groups.len() as u128) * (n_cols as u128);
    for (what, v) in [("clip", clip), ("sums", sums), ("squares", squares)] {
        if v.len() as u128 != want {
            return Err(Failure::bad_request(format!(
                "{} {what} values for {} batches x {n_cols} genes",
                v.len(),
                groups.len()
            )));
        }
    }
    let MatrixRegions::Csr(csr) = &m else {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            "HvgClippedSumsFrom takes a CSR matrix",
        ));
    };
    let blocks = rayon::current_num_threads().div_ceil(groups.len().max(1));
    let work = CsrWork::Clipped {
        clip,
        blocks,
        from: Some((sums, squares)),
    };
    let ClippedSums { sums, squares } = match run_csr(csr, &groups, work) {
        CsrOut::Clipped(sums) => sums,
        _ => unreachable!("asked for clipped sums"),
    };
    Ok(Response::HvgClippedSums { sums, squares })
}

/// Per-batch Welford means and biased variances (`Request::HvgBatchWelford`).
pub(super) fn batch_welford(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    batches: &[u64],
    n_batches: u64,
) -> Result<Response> {
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let m = MatrixRegions::resolve(&mut resolver, x)?;
    let (n_rows, n_cols) = m.shape();
    let groups = batch_rows(batches, n_batches, n_rows)?;
    check_reply_size(groups.len(), n_cols)?;
    let stats = match &m {
        MatrixRegions::Csr(csr) => {
            let blocks = welford_blocks(csr, &groups);
            match run_csr(csr, &groups, CsrWork::Welford { blocks: &blocks }) {
                CsrOut::Welford(stats) => stats,
                _ => unreachable!("asked for Welford statistics"),
            }
        }
        MatrixRegions::Dense(dense) => {
            let (r, c) = (dense.n_rows, dense.n_cols);
            match dense.data.floats().expect("dtype checked") {
                FloatSlice::F32(d) => dense_batch_welford(d, r, c, &groups),
                FloatSlice::F64(d) => dense_batch_welford(d, r, c, &groups),
            }
        }
    };
    let BatchMeanVar { means, variances } = stats;
    Ok(Response::HvgBatchWelford { means, variances })
}

/// Column blocks per batch for the CSR Welford pass: about four tasks per
/// thread in all, shared out by the batches' stored values, so one large batch
/// among small ones does not leave threads idle (each block rescans its batch's
/// indices, which is cheap next to the divisions).
fn welford_blocks(csr: &CsrRegions, groups: &[Vec<usize>]) -> Vec<usize> {
    let target = 4 * rayon::current_num_threads().max(1);
    let indptr = csr.indptr.indices().expect("dtype checked");
    let stored = |rows: &[usize]| -> usize {
        match &indptr {
            IndexSlice::I32(p) => count_stored(p, rows),
            IndexSlice::I64(p) => count_stored(p, rows),
        }
    };
    let per_group: Vec<usize> = groups.iter().map(|g| stored(g)).collect();
    let total: usize = per_group.iter().sum::<usize>().max(1);
    per_group
        .iter()
        .map(|&s| ((s as u128 * target as u128).div_ceil(total as u128) as usize).max(1))
        .collect()
}

fn count_stored<P: SparseIndex>(indptr: &[P], rows: &[usize]) -> usize {
    let nnz = indptr.last().and_then(|v| v.to_usize()).unwrap_or(0);
    rows.iter()
        .map(|&r| crate::kernels::row_range(indptr, r, nnz).len())
        .sum()
}

/// Dense sums and, with `check`, the flags of every value (a separate pass).
fn dense_sums<T: Float>(
    data: &[T],
    n_rows: usize,
    n_cols: usize,
    groups: &[Vec<usize>],
    check: bool,
) -> (GroupSums, ValueFlags, usize) {
    let sums = dense_group_sums(data, n_rows, n_cols, groups);
    let flags = if check {
        value_flags(data)
    } else {
        ValueFlags::default()
    };
    (sums, flags, 0)
}

/// What a CSR request computes.
#[derive(Clone, Copy)]
enum CsrWork<'a> {
    MeanVar {
        job: &'a MeanVarJob,
    },
    Clipped {
        clip: &'a [f64],
        blocks: usize,
        from: Option<(&'a [f64], &'a [f64])>,
    },
    Welford {
        blocks: &'a [usize],
    },
}

enum CsrOut {
    MeanVar(Result<(GroupMeanVar, ValueFlags)>),
    Clipped(ClippedSums),
    Welford(BatchMeanVar),
}

/// Runs `work` on a CSR matrix, dispatched over the index and data dtypes.
struct CsrJob<'a> {
    n_cols: usize,
    groups: &'a [Vec<usize>],
    work: CsrWork<'a>,
}

impl CsrVisitor for CsrJob<'_> {
    type Out = CsrOut;

    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) -> CsrOut {
        let (n_cols, groups) = (self.n_cols, self.groups);
        match self.work {
            CsrWork::MeanVar { job } => CsrOut::MeanVar(job.run(|g, check| {
                if check {
                    csr_group_sums_checked(indptr, indices, data, n_cols, g, job.partitions)
                } else {
                    let sums = csr_group_sums(indptr, indices, data, n_cols, g, job.partitions);
                    (sums, ValueFlags::default(), 0)
                }
            })),
            CsrWork::Clipped { clip, blocks, from } => CsrOut::Clipped(csr_clipped_sums(
                indptr, indices, data, n_cols, groups, clip, blocks, from,
            )),
            CsrWork::Welford { blocks } => CsrOut::Welford(csr_batch_welford(
                indptr, indices, data, n_cols, groups, blocks,
            )),
        }
    }
}

/// Runs `work` on a resolved CSR matrix. Column indices are bounds-checked by
/// the kernels as they read them (`HvgMeanVar` with `check` reports bad ones as an
/// error, in the same pass).
fn run_csr(csr: &CsrRegions, groups: &[Vec<usize>], work: CsrWork<'_>) -> CsrOut {
    let indices = csr
        .indices
        .as_ref()
        .expect("MatrixRegions resolves CSR indices")
        .indices()
        .expect("dtype checked");
    let job = CsrJob {
        n_cols: csr.n_cols,
        groups,
        work,
    };
    visit_csr(
        job,
        csr.indptr.indices().expect("dtype checked"),
        indices,
        csr.data.floats().expect("dtype checked"),
    )
}
