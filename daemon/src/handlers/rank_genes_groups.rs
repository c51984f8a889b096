//! `RankGenesGroups` and `RankGenesGroupsGroupSums` (the same without the rest
//! statistics): fingerprint the matrix, get (or build and cache) its
//! value-sorted per-gene structure, run the Wilcoxon kernel for this grouping.

use super::fingerprint::{
    fingerprint, fingerprint_csr_pieces, fingerprint_resolved, matrix_arrays,
};
use crate::cache::Sorted;
use crate::error::{Failure, Result};
use crate::kernels::content_hash::{bytes_of, ContentHash};
use crate::kernels::sorted_csc::{self, BuildError, SortedCsc};
use crate::kernels::wilcoxon::{wilcoxon_stats, Query, Stats, NO_GROUP};
use crate::kernels::{Float, SparseIndex};
use crate::peer_csr::{PeerCsr, PieceHashes};
use crate::server::state::Daemon;
use crate::shm::{CsrRegions, FloatSlice, IndexSlice, MatrixRegions, Peer, Resolver};
use crate::streaming::PeerArray;
use autozyme_protocol::{DType, ErrorKind, Location, Matrix, Response};
use std::sync::Arc;

/// Largest `cells x groups` table the rest statistics may need.
const MAX_CELL_GROUPS: u64 = 1 << 31;
/// Most cells ranked: every rank sum (a multiple of 1/2 up to about n^2 / 2) is
/// then exact in f64, so the order of its additions cannot change it.
const MAX_RANKED_CELLS: u64 = 1 << 26;

#[allow(clippy::too_many_arguments)]
pub fn rank_genes_groups(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    group_of_row: &[u64],
    n_groups: u64,
    reference: Option<u64>,
    tie_correct: bool,
    mean_slots: u64,
    rest_stats: bool,
) -> Result<Response> {
    let (n_rows, n_cols) = match x {
        Matrix::Csr { n_rows, n_cols, .. } | Matrix::Dense { n_rows, n_cols, .. } => {
            (*n_rows, *n_cols)
        }
    };
    if group_of_row.len() as u64 != n_rows {
        return Err(Failure::bad_request(format!(
            "{} group entries for {n_rows} rows",
            group_of_row.len()
        )));
    }
    if n_groups == 0 || n_groups.saturating_mul(n_rows.max(1)) > MAX_CELL_GROUPS {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            format!("{n_groups} groups over {n_rows} cells"),
        ));
    }
    if n_rows > MAX_RANKED_CELLS {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            format!("{n_rows} cells: rank sums are exact only up to {MAX_RANKED_CELLS}"),
        ));
    }
    if reference.is_some_and(|r| r >= n_groups) {
        return Err(Failure::bad_request("reference group out of range"));
    }
    if !(1..=255).contains(&mean_slots) {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            format!("{mean_slots} partial sums per group (1 to 255 supported)"),
        ));
    }
    let mut groups = Vec::with_capacity(group_of_row.len());
    for &g in group_of_row {
        groups.push(match g {
            u64::MAX => NO_GROUP,
            g if g < n_groups => g as u32,
            g => return Err(Failure::bad_request(format!("group {g} out of range"))),
        });
    }

    debug_lap("start");
    let mut resolver = Resolver::new(&daemon.segments, peer);
    // When no cached structure has the matrix's shape, it is certainly new: a
    // CSR matrix in the client's memory is built from at once, read across in
    // blocks and hashed as it is read (`peer_csr`); a dense one is copied first
    // and hashed from the copy. Otherwise it is hashed where it lies, and read
    // again only on a miss.
    let in_client_memory = matrix_arrays(x)?
        .iter()
        .all(|(a, _)| matches!(a.location, Location::Peer { .. }));
    let streamable = in_client_memory && matches!(x, Matrix::Csr { .. });
    let mut regions = None;
    let mut built_now = None;
    let key = if in_client_memory && !daemon.cache.may_hold(n_rows as usize, n_cols as usize) {
        check_room(x)?;
        if streamable {
            let (built, key) = build_from_client(&mut resolver, peer, x)?;
            built_now = Some(Arc::new(built));
            key
        } else {
            let resolved = MatrixRegions::resolve(&mut resolver, x)?;
            let key = fingerprint_resolved(x, &resolved)?;
            regions = Some(resolved);
            key
        }
    } else {
        fingerprint(&mut resolver, peer, x)?
    };
    debug_lap("hash");
    let mut params = ContentHash::new(0x5041_5241);
    params.update_u64(key as u64);
    params.update_u64((key >> 64) as u64);
    params.update_u64(n_groups);
    params.update_u64(reference.map_or(u64::MAX, |r| r));
    params.update_u64(tie_correct as u64);
    params.update_u64(mean_slots);
    params.update_u64(rest_stats as u64);
    params.update(bytes_of(group_of_row));
    let result_key = params.finish();
    if let Some(built) = &built_now {
        daemon.cache.insert(key, Arc::clone(built));
    }
    if let Some(kept) = daemon.cache.result::<(Stats, bool)>(result_key) {
        // The same matrix (by content) and the same request: the same answer.
        let (stats, nonneg_integers) = (&kept.0, kept.1);
        let _ = daemon.cache.get(key); // counted as a hit of the structure it came from
        return Ok(response(n_cols, stats.clone(), true, nonneg_integers));
    }
    let (sorted, cache_hit) = match (built_now, daemon.cache.get(key)) {
        (Some(built), _) => (built, false),
        (None, Some(s)) => (s, true),
        (None, None) => {
            let built = match regions.take() {
                Some(r) => build(r)?, // room checked before the copy
                None if streamable => {
                    check_room(x)?;
                    let (built, read_key) = build_from_client(&mut resolver, peer, x)?;
                    if read_key != key {
                        return Err(Failure::bad_matrix("the matrix changed while it was read"));
                    }
                    built
                }
                None => {
                    check_room(x)?;
                    build(MatrixRegions::resolve(&mut resolver, x)?)?
                }
            };
            let built = Arc::new(built);
            daemon.cache.insert(key, Arc::clone(&built));
            (built, false)
        }
    };
    let query = Query {
        group_of_row: &groups,
        n_groups: n_groups as usize,
        reference: reference.map(|r| r as usize),
        tie_correct,
        slots: mean_slots as usize,
        rest_stats,
    };
    debug_lap("build");
    let (stats, nonneg_integers) = match &*sorted {
        Sorted::F32(m) => (run(m, &query)?, m.nonneg_integers),
        Sorted::F64(m) => (run(m, &query)?, m.nonneg_integers),
    };
    debug_lap("query");
    daemon
        .cache
        .keep_result(result_key, Arc::new((stats.clone(), nonneg_integers)));
    Ok(response(n_cols, stats, cache_hit, nonneg_integers))
}

fn response(n_cols: u64, stats: Stats, cache_hit: bool, nonneg_integers: bool) -> Response {
    Response::RankGenesGroups {
        n_genes: n_cols,
        rank_sums: stats.rank_sums,
        tie: stats.tie,
        sums: stats.sums,
        nnz: stats.nnz,
        rest_sums: stats.rest_sums,
        rest_nnz: stats.rest_nnz,
        cache_hit,
        nonneg_integers,
    }
}

fn run<T: Float>(m: &SortedCsc<T>, q: &Query<'_>) -> Result<Stats> {
    if q.group_of_row.len() != m.n_rows {
        return Err(Failure::bad_request(
            "group entries do not match the cached matrix",
        ));
    }
    Ok(wilcoxon_stats(m, q))
}

/// Refuses a structure larger than the daemon's memory budget (the shim then
/// runs upstream) rather than risk the OOM killer.
fn check_room(x: &Matrix) -> Result<()> {
    let (values, item) = match x {
        Matrix::Csr { data, .. } => (data.len, data.dtype.size() as u64),
        // A dense matrix's non-zeros are not known before the scan: assume all.
        Matrix::Dense { data, .. } => (data.len, data.dtype.size() as u64),
    };
    let need = values.saturating_mul(8 + item);
    let room = crate::shm::peer::budget() as u64;
    if need > room {
        return Err(Failure::new(
            ErrorKind::TooLarge,
            format!("a sorted copy of {values} values needs {need} bytes; the budget is {room}"),
        ));
    }
    Ok(())
}

fn build_failure(e: BuildError) -> Failure {
    let kind = match e {
        BuildError::Malformed(_) => ErrorKind::BadMatrix,
        _ => ErrorKind::Unsupported,
    };
    Failure::new(kind, format!("cannot rank this matrix: {e}"))
}

fn build(regions: MatrixRegions) -> Result<Sorted> {
    match regions {
        MatrixRegions::Csr(csr) => {
            // Not `validated_column_indices`: the build's count pass checks every
            // column index itself (a bad one is a BadMatrix failure as there), so
            // a separate pass over the indices would only repeat it.
            let indices = csr.column_indices()?;
            let indptr = csr.indptr.indices().expect("dtype checked");
            let data = csr.data.floats().expect("dtype checked");
            let (n, m) = (csr.n_rows, csr.n_cols);
            match indptr {
                IndexSlice::I32(p) => csr_with_indices(p, indices, data, n, m),
                IndexSlice::I64(p) => csr_with_indices(p, indices, data, n, m),
            }
        }
        MatrixRegions::Dense(dense) => {
            let (n, m) = (dense.n_rows, dense.n_cols);
            match dense.data.floats().expect("dtype checked") {
                FloatSlice::F32(d) => sorted_csc::from_dense(d, n, m).map(Sorted::F32),
                FloatSlice::F64(d) => sorted_csc::from_dense(d, n, m).map(Sorted::F64),
            }
            .map_err(build_failure)
        }
    }
}

/// Builds the structure of a CSR matrix whose arrays are all in the client's
/// memory, reading them across in blocks (see [`crate::peer_csr`]), and returns
/// it with the matrix's fingerprint, taken from the same reads.
fn build_from_client(
    resolver: &mut Resolver<'_>,
    peer: Peer,
    x: &Matrix,
) -> Result<(Sorted, u128)> {
    let Matrix::Csr {
        n_rows,
        n_cols,
        data,
        indices: Some(indices),
        indptr,
    } = x
    else {
        return Err(Failure::bad_request(
            "a CSR matrix with its indices is needed",
        ));
    };
    let indptr_region =
        CsrRegions::resolve_indptr_only(resolver, *n_rows, *n_cols, data, Some(indices), indptr)?;
    // Only called with every array in the client's memory (`streamable`).
    let in_client = |a| {
        super::peer_array(a)?
            .ok_or_else(|| Failure::bad_request("an array not in the client's memory"))
    };
    let (data_at, indices_at) = (in_client(data)?, in_client(indices)?);
    let n_cols = *n_cols as usize;
    let (data, indices) = ((data.dtype, data_at), (indices.dtype, indices_at));
    let (built, (data_pieces, index_pieces)) = match indptr_region.indices().expect("dtype checked")
    {
        IndexSlice::I32(p) => from_client_indptr(peer, p, data, indices, n_cols),
        IndexSlice::I64(p) => from_client_indptr(peer, p, data, indices, n_cols),
    }?;
    let key = fingerprint_csr_pieces(x, &data_pieces, &index_pieces, &indptr_region)?;
    Ok((built, key))
}

/// [`build_from_client`] for one indptr type, dispatching on the other two.
fn from_client_indptr<P: SparseIndex>(
    peer: Peer,
    indptr: &[P],
    (data, data_at): (DType, PeerArray),
    (indices, indices_at): (DType, PeerArray),
    n_cols: usize,
) -> Result<(Sorted, PieceHashes)> {
    fn run<T: Float, I: SparseIndex, P: SparseIndex>(
        peer: Peer,
        indptr: &[P],
        data: PeerArray,
        indices: PeerArray,
        n_cols: usize,
    ) -> Result<(SortedCsc<T>, PieceHashes)> {
        let src = PeerCsr::<T, I, P>::new(peer, indptr, data, indices);
        let built = sorted_csc::from_bands(&src, n_cols);
        // A failed read is the reply's reason, not the build error it caused.
        if let Some(failure) = src.failure() {
            return Err(failure);
        }
        Ok((built.map_err(build_failure)?, src.piece_hashes()?))
    }
    let (d, i) = (data_at, indices_at);
    match (data, indices) {
        (DType::F32, DType::I32) => {
            run::<f32, i32, P>(peer, indptr, d, i, n_cols).map(|(m, h)| (Sorted::F32(m), h))
        }
        (DType::F32, DType::I64) => {
            run::<f32, i64, P>(peer, indptr, d, i, n_cols).map(|(m, h)| (Sorted::F32(m), h))
        }
        (DType::F64, DType::I32) => {
            run::<f64, i32, P>(peer, indptr, d, i, n_cols).map(|(m, h)| (Sorted::F64(m), h))
        }
        (DType::F64, DType::I64) => {
            run::<f64, i64, P>(peer, indptr, d, i, n_cols).map(|(m, h)| (Sorted::F64(m), h))
        }
        _ => Err(Failure::bad_matrix(
            "CSR data must be F32 or F64 and indices I32 or I64",
        )),
    }
}

fn csr_with_indices<P: SparseIndex>(
    indptr: &[P],
    indices: IndexSlice<'_>,
    data: FloatSlice<'_>,
    n_rows: usize,
    n_cols: usize,
) -> Result<Sorted> {
    match indices {
        IndexSlice::I32(i) => csr_with_data(indptr, i, data, n_rows, n_cols),
        IndexSlice::I64(i) => csr_with_data(indptr, i, data, n_rows, n_cols),
    }
}

fn csr_with_data<P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: FloatSlice<'_>,
    n_rows: usize,
    n_cols: usize,
) -> Result<Sorted> {
    match data {
        FloatSlice::F32(d) => {
            sorted_csc::from_csr(indptr, indices, d, n_rows, n_cols).map(Sorted::F32)
        }
        FloatSlice::F64(d) => {
            sorted_csc::from_csr(indptr, indices, d, n_rows, n_cols).map(Sorted::F64)
        }
    }
    .map_err(build_failure)
}

/// With `AUTOZYME_DEBUG_TIMING` set: the wall and process CPU time (user, and
/// system, where fresh memory shows) since the previous step, on the daemon's
/// stderr (`daemon.log`). Concurrent requests mix their steps; it is a
/// measuring aid, not a report.
fn debug_lap(what: &str) {
    use std::sync::Mutex;
    static LAST: Mutex<(f64, f64, Option<std::time::Instant>)> = Mutex::new((0.0, 0.0, None));
    if std::env::var_os("AUTOZYME_DEBUG_TIMING").is_none() {
        return;
    }
    // SAFETY: rusage is plain data; getrusage writes only the struct passed.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let user = u.ru_utime.tv_sec as f64 + u.ru_utime.tv_usec as f64 * 1e-6;
    let sys = u.ru_stime.tv_sec as f64 + u.ru_stime.tv_usec as f64 * 1e-6;
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    let wall = last.2.map_or(0.0, |t| (now - t).as_secs_f64());
    eprintln!(
        "  {what:<10} wall {:6.0} ms user {:6.0} sys {:6.0}",
        wall * 1e3,
        (user - last.0) * 1e3,
        (sys - last.1) * 1e3
    );
    *last = (user, sys, Some(now));
}
