//! Maps each request to checks, views and kernels, and turns every failure (a bad
//! request, a malformed matrix, even a panic) into an error response: nothing a
//! client sends can bring the daemon down.

use crate::config::{BUILD_ID, VERSION};
use crate::error::{Failure, Result};
use crate::faults::{self, Phase};
use crate::kernels::divide_rows::{
    csr_divide_rows, csr_divide_rows_in_place, dense_divide_rows, dense_divide_rows_in_place,
};
use crate::kernels::highly_expressed::{flagged_indices, highly_expressed_genes};
use crate::kernels::row_sums::{csr_row_sums, csr_row_sums_excluding};
use crate::kernels::{Float, SparseIndex};
use crate::server::state::Daemon;
use crate::shm::{
    visit_csr, CsrRegions, CsrVisitor, DenseRegions, FloatSlice, FloatSliceMut, IndexSlice, Peer,
    Resolver,
};
use crate::streaming::{self, PeerArray};
use autozyme_protocol::{
    ArrayRef, DType, DaemonStatus, ErrorKind, Location, Matrix, Request, Response, PROTOCOL_VERSION,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod fingerprint;
mod hvg;
mod leiden;
mod rank_genes_groups;
mod scale;
mod umap;

/// What the connection should do after sending the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// The response was `ShuttingDown`: send it, then stop the daemon.
    Shutdown,
}

/// Handles one request from `peer`.
pub fn handle(daemon: &Daemon, peer: Peer, request: Request) -> (Response, After) {
    if daemon.config.test_hooks {
        faults::begin(crate::server::connection::variant_name(&request));
        faults::point(Phase::Received);
    }
    match catch_unwind(AssertUnwindSafe(|| dispatch(daemon, peer, request))) {
        Ok(Ok(reply)) => {
            faults::point(Phase::Reply);
            reply
        }
        Ok(Err(failure)) => (failure.into_response(), After::Continue),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            let message = format!("internal error (daemon bug), request abandoned: {what}");
            (
                Response::error(ErrorKind::Internal, message),
                After::Continue,
            )
        }
    }
}

/// The reply to a valid `Hello`.
pub fn hello(daemon: &Daemon) -> Response {
    Response::Hello {
        protocol_version: PROTOCOL_VERSION,
        build_id: BUILD_ID.to_string(),
        pid: daemon.pid,
        threads: daemon.config.threads as u32,
    }
}

fn dispatch(daemon: &Daemon, peer: Peer, request: Request) -> Result<(Response, After)> {
    let response = match request {
        Request::Hello {
            protocol_version, ..
        } => {
            // Greeting again is harmless; the version must still match.
            if protocol_version != PROTOCOL_VERSION {
                return Err(Failure::new(
                    ErrorKind::Handshake,
                    format!(
                        "protocol version {protocol_version}, daemon speaks {PROTOCOL_VERSION}"
                    ),
                ));
            }
            hello(daemon)
        }
        Request::Ping => Response::Pong,
        Request::Status => Response::Status(status(daemon)),
        Request::Shutdown => return Ok((Response::ShuttingDown, After::Shutdown)),
        Request::RowSums {
            x,
            exclude_max_fraction,
        } => row_sums(daemon, peer, &x, exclude_max_fraction)?,
        Request::DivideRows {
            x,
            factors,
            factors_dtype,
            out,
        } => divide_rows(daemon, peer, &x, &factors, factors_dtype, &out)?,
        Request::Prefault { segments } => prefault(daemon, peer, &segments)?,
        Request::Lease { bytes, create } => lease(daemon, peer, bytes, create)?,
        Request::Release { segments } => {
            daemon.pool.release(peer.pid, &segments);
            Response::Done
        }
        Request::Sleep { millis } => sleep(daemon, millis)?,
        Request::ScaleStats {
            x,
            rows,
            partitions,
            along_rows,
        } => scale::stats(daemon, peer, &x, rows.as_deref(), partitions, along_rows)?,
        Request::ScaleApply {
            x,
            rows,
            mean,
            std,
            per_row,
            max_value,
            out,
        } => {
            let stats = scale::Stats {
                mean: mean.as_deref(),
                std: &std,
                per_row,
                max_value,
            };
            scale::apply(daemon, peer, &x, rows.as_deref(), stats, &out)?
        }
        Request::HvgMeanVar {
            x,
            batches,
            n_batches,
            partitions,
            check,
            with_overall,
        } => hvg::mean_var(
            daemon,
            peer,
            &x,
            &batches,
            n_batches,
            partitions,
            check,
            with_overall,
        )?,
        Request::HvgClippedSums {
            x,
            batches,
            n_batches,
            clip,
            only,
        } => hvg::clipped_sums(daemon, peer, &x, &batches, n_batches, &clip, only)?,
        Request::RankGenesGroups {
            x,
            group_of_row,
            n_groups,
            reference,
            tie_correct,
            mean_slots,
        } => rank_genes_groups::rank_genes_groups(
            daemon,
            peer,
            &x,
            &group_of_row,
            n_groups,
            reference,
            tie_correct,
            mean_slots,
            true,
        )?,
        Request::Leiden {
            graph,
            use_weights,
            resolution,
            n_iterations,
            seed,
        } => leiden::handle(
            daemon,
            peer,
            &graph,
            use_weights,
            resolution,
            n_iterations,
            seed,
        )?,
        Request::Fingerprint { x } => fingerprint::handle(daemon, peer, &x)?,
        Request::RankGenesGroupsGroupSums {
            x,
            group_of_row,
            n_groups,
            reference,
            tie_correct,
        } => rank_genes_groups::rank_genes_groups(
            daemon,
            peer,
            &x,
            &group_of_row,
            n_groups,
            reference,
            tie_correct,
            1,
            false,
        )?,
        Request::HvgBatchWelford {
            x,
            batches,
            n_batches,
        } => hvg::batch_welford(daemon, peer, &x, &batches, n_batches)?,
        Request::ScaleChunkStats { x } => scale::chunk_stats(daemon, peer, &x)?,
        Request::HvgClippedSumsFrom {
            x,
            batches,
            n_batches,
            clip,
            sums,
            squares,
        } => hvg::clipped_sums_from(
            daemon, peer, &x, &batches, n_batches, &clip, &sums, &squares,
        )?,
        Request::UmapLayout {
            embedding,
            dim,
            head,
            tail,
            epochs_per_sample,
            a,
            b,
            gamma,
            initial_alpha,
            negative_sample_rate,
            n_epochs,
            rng_state,
        } => {
            let Ok(rng_state) = <[u64; 3]>::try_from(rng_state.as_slice()) else {
                return Err(Failure::bad_request("rng_state must hold 3 words"));
            };
            let params = crate::kernels::umap_layout::Params {
                a,
                b,
                gamma,
                initial_alpha,
                negative_sample_rate,
                n_epochs,
                rng_state: rng_state.map(|w| w as i64),
            };
            let request = umap::Layout {
                embedding: &embedding,
                dim,
                head: &head,
                tail: &tail,
                epochs_per_sample: &epochs_per_sample,
                params,
            };
            umap::handle(daemon, peer, request)?
        }
    };
    Ok((response, After::Continue))
}

/// `VmRSS` and `VmHWM` of this process, in bytes (0 if unavailable).
fn memory_usage() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn status(daemon: &Daemon) -> DaemonStatus {
    let (rss_bytes, peak_rss_bytes) = memory_usage();
    let (mapped_segments, mapped_bytes) = daemon.segments.stats();
    DaemonStatus {
        pid: daemon.pid,
        version: VERSION.to_string(),
        build_id: BUILD_ID.to_string(),
        protocol_version: PROTOCOL_VERSION,
        threads: daemon.config.threads as u32,
        uptime_ms: daemon.uptime().as_millis() as u64,
        rss_bytes,
        peak_rss_bytes,
        requests_served: daemon.requests_served.load(Ordering::SeqCst),
        requests_failed: daemon.requests_failed.load(Ordering::SeqCst),
        open_connections: daemon.open_connections(),
        mapped_segments,
        mapped_bytes,
        cache: daemon.cache.entries(),
        idle_timeout_s: daemon.config.idle_timeout_s,
        runtime_dir: daemon.config.runtime_dir.display().to_string(),
        cache_budget_bytes: daemon.cache.budget(),
        cache_hits: daemon.cache.counts().0,
        cache_misses: daemon.cache.counts().1,
    }
}

/// Maps the named segments now (the mapping cache keeps them), so the request
/// that later uses them pays no mapping cost. Names are validated as for any use.
fn prefault(daemon: &Daemon, peer: Peer, segments: &[String]) -> Result<Response> {
    for name in segments {
        daemon.segments.get(name, peer.uid)?;
    }
    Ok(Response::Done)
}

/// Lends a pooled segment (see `shm::pool`), within the daemon's memory budget.
fn lease(daemon: &Daemon, peer: Peer, bytes: u64, create: bool) -> Result<Response> {
    if create && bytes > crate::shm::peer::budget() as u64 {
        return Err(Failure::new(
            ErrorKind::TooLarge,
            format!("a segment of {bytes} bytes exceeds the daemon's memory budget"),
        ));
    }
    let lent = daemon.pool.lease(
        &daemon.segments,
        peer.uid,
        daemon.pid,
        peer.pid,
        bytes,
        create,
    )?;
    Ok(match lent {
        Some((name, size)) => Response::Leased {
            segment: Some(name),
            size,
        },
        None => Response::Leased {
            segment: None,
            size: 0,
        },
    })
}

/// Test hook: keeps this connection busy for `millis`, checking for shutdown every
/// 50 ms so a long sleep cannot hold the daemon's exit hostage.
fn sleep(daemon: &Daemon, millis: u64) -> Result<Response> {
    if !daemon.config.test_hooks {
        return Err(Failure::bad_request(
            "Sleep is a test hook; it needs AUTOZYME_TEST_HOOKS=1 when the daemon starts",
        ));
    }
    let end = Instant::now().checked_add(Duration::from_millis(millis));
    while !daemon.shutting_down() {
        let remaining = match end {
            Some(end) => end.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        if remaining.is_zero() {
            break;
        }
        std::thread::sleep(remaining.min(Duration::from_millis(50)));
    }
    Ok(Response::Done)
}

// ---- RowSums ---------------------------------------------------------------------

fn row_sums(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    exclude_max_fraction: Option<f64>,
) -> Result<Response> {
    let Matrix::Csr {
        n_rows,
        n_cols,
        data,
        indices,
        indptr,
    } = x
    else {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            "RowSums takes CSR matrices only (dense sums use numpy's pairwise summation)",
        ));
    };
    let mut resolver = Resolver::new(&daemon.segments, peer);
    if let (None, Some(data_at)) = (exclude_max_fraction, peer_array(data)?) {
        // Plain sums of data in the client's memory: streamed, not copied whole.
        let indptr =
            CsrRegions::resolve_indptr_only(&mut resolver, *n_rows, 0, data, None, indptr)?;
        let n = indptr.len() - 1;
        let sums = match (indptr.indices().expect("dtype checked"), data.dtype) {
            (IndexSlice::I32(p), DType::F32) => {
                widen(&streaming::row_sums::<f32, _>(peer, p, data_at, n)?)
            }
            (IndexSlice::I32(p), _) => widen(&streaming::row_sums::<f64, _>(peer, p, data_at, n)?),
            (IndexSlice::I64(p), DType::F32) => {
                widen(&streaming::row_sums::<f32, _>(peer, p, data_at, n)?)
            }
            (IndexSlice::I64(p), _) => widen(&streaming::row_sums::<f64, _>(peer, p, data_at, n)?),
        };
        return Ok(Response::RowSums {
            sums,
            highly_expressed: vec![],
        });
    }
    let csr = CsrRegions::resolve(
        &mut resolver,
        *n_rows,
        *n_cols,
        data,
        indices.as_ref(),
        indptr,
    )?;
    csr.validate_indptr()?;
    let data = csr.data.floats().expect("dtype checked");
    let indptr = csr.indptr.indices().expect("dtype checked");
    let Some(max_fraction) = exclude_max_fraction else {
        let sums = match (indptr, data) {
            (IndexSlice::I32(p), FloatSlice::F32(d)) => widen(&csr_row_sums(p, d, csr.n_rows)),
            (IndexSlice::I32(p), FloatSlice::F64(d)) => widen(&csr_row_sums(p, d, csr.n_rows)),
            (IndexSlice::I64(p), FloatSlice::F32(d)) => widen(&csr_row_sums(p, d, csr.n_rows)),
            (IndexSlice::I64(p), FloatSlice::F64(d)) => widen(&csr_row_sums(p, d, csr.n_rows)),
        };
        return Ok(Response::RowSums {
            sums,
            highly_expressed: vec![],
        });
    };
    let indices = csr.validated_column_indices()?;
    let job = ExcludingJob {
        n_rows: csr.n_rows,
        n_cols: csr.n_cols,
        max_fraction,
    };
    let (sums, highly_expressed) = visit_csr(job, indptr, indices, data);
    Ok(Response::RowSums {
        sums,
        highly_expressed,
    })
}

/// RowSums with exclusion of highly expressed genes, dispatched over the dtypes.
struct ExcludingJob {
    n_rows: usize,
    n_cols: usize,
    max_fraction: f64,
}

impl CsrVisitor for ExcludingJob {
    type Out = (Vec<f64>, Vec<u64>);

    /// Upstream's `_normalize_csr` with exclusion: plain sums, the flagged genes,
    /// then the sums recomputed without them.
    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) -> (Vec<f64>, Vec<u64>) {
        let sums = csr_row_sums(indptr, data, self.n_rows);
        let flags =
            highly_expressed_genes(indptr, indices, data, &sums, self.n_cols, self.max_fraction);
        if !flags.contains(&true) {
            // Nothing excluded: upstream's second pass adds the very same values in
            // the same order, so the plain sums are already its answer.
            return (widen(&sums), vec![]);
        }
        let sums = csr_row_sums_excluding(indptr, indices, data, self.n_rows, &flags);
        (widen(&sums), flagged_indices(&flags))
    }
}

/// Where an array lies in the peer's memory, if it does (else it is a segment).
fn peer_array(array: &ArrayRef) -> Result<Option<PeerArray>> {
    match array.location {
        Location::Peer { address } => Ok(Some(PeerArray {
            address,
            len: usize::try_from(array.len)
                .map_err(|_| Failure::bad_request("array length too large"))?,
        })),
        Location::Segment { .. } => Ok(None),
    }
}

/// Dispatches a streamed CSR division over the data and output dtypes.
#[allow(clippy::too_many_arguments)]
fn streamed_divide<P: SparseIndex>(
    peer: Peer,
    indptr: &[P],
    data_dtype: DType,
    out_dtype: DType,
    data: PeerArray,
    factors: &[f64],
    factors_are_f32: bool,
    out: PeerArray,
) -> Result<()> {
    use crate::streaming::divide_rows as div;
    let f = factors_are_f32;
    match (data_dtype, out_dtype) {
        (DType::F32, DType::F32) => div::<f32, f32, P>(peer, indptr, data, factors, f, out),
        (DType::F32, _) => div::<f32, f64, P>(peer, indptr, data, factors, f, out),
        (_, DType::F32) => div::<f64, f32, P>(peer, indptr, data, factors, f, out),
        (_, _) => div::<f64, f64, P>(peer, indptr, data, factors, f, out),
    }
}

fn widen<T: Float>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

// ---- DivideRows ------------------------------------------------------------------

fn divide_rows(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    factors: &[f64],
    factors_dtype: DType,
    out: &ArrayRef,
) -> Result<Response> {
    if !matches!(factors_dtype, DType::F32 | DType::F64) {
        return Err(Failure::bad_request(format!(
            "factors_dtype must be F32 or F64, not {factors_dtype:?}"
        )));
    }
    if !matches!(out.dtype, DType::F32 | DType::F64) {
        return Err(Failure::bad_request(format!(
            "out must be F32 or F64, not {:?}",
            out.dtype
        )));
    }
    let factors_are_f32 = factors_dtype == DType::F32;
    let mut resolver = Resolver::new(&daemon.segments, peer);
    if let Matrix::Csr {
        n_rows,
        data,
        indptr,
        ..
    } = x
    {
        if let (Some(data_at), Some(out_at)) = (peer_array(data)?, peer_array(out)?) {
            // Data and output in the client's memory: streamed block by block.
            let indptr =
                CsrRegions::resolve_indptr_only(&mut resolver, *n_rows, 0, data, None, indptr)?;
            check_factors_len(factors, indptr.len() - 1)?;
            check_out_len(out_at.len, data_at.len)?;
            let (lo, hi) = (data_at.address, out_at.address);
            let (data_bytes, out_bytes) = (
                data_at.len * data.dtype.size(),
                out_at.len * out.dtype.size(),
            );
            if data_at.len > 0 && lo < hi + out_bytes as u64 && hi < lo + data_bytes as u64 {
                return Err(Failure::bad_request(
                    "a streamed division needs an output apart from the data",
                ));
            }
            let f = factors_are_f32;
            let (d, o) = (data.dtype, out.dtype);
            match indptr.indices().expect("dtype checked") {
                IndexSlice::I32(p) => streamed_divide(peer, p, d, o, data_at, factors, f, out_at)?,
                IndexSlice::I64(p) => streamed_divide(peer, p, d, o, data_at, factors, f, out_at)?,
            }
            return Ok(Response::Done);
        }
    }
    match x {
        Matrix::Csr {
            n_rows,
            n_cols,
            data,
            indices,
            indptr,
        } => {
            let mut csr = CsrRegions::resolve(
                &mut resolver,
                *n_rows,
                *n_cols,
                data,
                indices.as_ref(),
                indptr,
            )?;
            check_factors_len(factors, csr.n_rows)?;
            csr.validate_indptr()?;
            let mut out = resolver.output(out, "out")?;
            check_out_len(out.len(), csr.data.len())?;
            out.check_apart(&[
                (csr.indices.as_ref(), "indices"),
                (Some(&csr.indptr), "indptr"),
            ])?;
            let indptr = csr.indptr.indices().expect("dtype checked");
            if out.is_in_place_of(&csr.data)? {
                // SAFETY: `out` is x's data itself, which overlaps neither indices nor
                // indptr (checked above); no other view of the data is alive.
                let data = unsafe { csr.data.floats_mut() }.expect("dtype checked");
                match indptr {
                    IndexSlice::I32(p) => csr_in_place(p, data, factors, factors_are_f32),
                    IndexSlice::I64(p) => csr_in_place(p, data, factors, factors_are_f32),
                }
                csr.data.write_back(peer)?;
            } else {
                // SAFETY: `out` overlaps none of x's arrays (checked above).
                let values = unsafe { out.floats_mut() }.expect("dtype checked");
                let data = csr.data.floats().expect("dtype checked");
                match indptr {
                    IndexSlice::I32(p) => csr_to_out(p, data, factors, factors_are_f32, values),
                    IndexSlice::I64(p) => csr_to_out(p, data, factors, factors_are_f32, values),
                }
                out.write_back(peer)?;
            }
        }
        Matrix::Dense {
            n_rows,
            n_cols,
            data,
        } => {
            let mut dense = DenseRegions::resolve(&mut resolver, *n_rows, *n_cols, data)?;
            check_factors_len(factors, dense.n_rows)?;
            let mut out = resolver.output(out, "out")?;
            check_out_len(out.len(), dense.data.len())?;
            let n_cols = dense.n_cols;
            if out.is_in_place_of(&dense.data)? {
                // SAFETY: `out` is x's data itself; no other view of it is alive.
                let data = unsafe { dense.data.floats_mut() }.expect("dtype checked");
                match data {
                    FloatSliceMut::F32(d) => {
                        dense_divide_rows_in_place(d, n_cols, factors, factors_are_f32)
                    }
                    FloatSliceMut::F64(d) => {
                        dense_divide_rows_in_place(d, n_cols, factors, factors_are_f32)
                    }
                }
                dense.data.write_back(peer)?;
            } else {
                // SAFETY: `out` does not overlap x's data (checked above).
                let values = unsafe { out.floats_mut() }.expect("dtype checked");
                let data = dense.data.floats().expect("dtype checked");
                dense_to_out(data, n_cols, factors, factors_are_f32, values);
                out.write_back(peer)?;
            }
        }
    }
    Ok(Response::Done)
}

fn check_factors_len(factors: &[f64], n_rows: usize) -> Result<()> {
    if factors.len() != n_rows {
        return Err(Failure::bad_request(format!(
            "{} factors for {n_rows} rows",
            factors.len()
        )));
    }
    Ok(())
}

fn check_out_len(out_len: usize, stored: usize) -> Result<()> {
    if out_len != stored {
        return Err(Failure::bad_request(format!(
            "out has {out_len} elements but x stores {stored} values"
        )));
    }
    Ok(())
}

fn csr_in_place<P: SparseIndex>(
    indptr: &[P],
    data: FloatSliceMut<'_>,
    factors: &[f64],
    factors_are_f32: bool,
) {
    match data {
        FloatSliceMut::F32(d) => csr_divide_rows_in_place(indptr, d, factors, factors_are_f32),
        FloatSliceMut::F64(d) => csr_divide_rows_in_place(indptr, d, factors, factors_are_f32),
    }
}

fn csr_to_out<P: SparseIndex>(
    indptr: &[P],
    data: FloatSlice<'_>,
    factors: &[f64],
    f32s: bool,
    out: FloatSliceMut<'_>,
) {
    match (data, out) {
        (FloatSlice::F32(d), FloatSliceMut::F32(o)) => csr_divide_rows(indptr, d, factors, f32s, o),
        (FloatSlice::F32(d), FloatSliceMut::F64(o)) => csr_divide_rows(indptr, d, factors, f32s, o),
        (FloatSlice::F64(d), FloatSliceMut::F32(o)) => csr_divide_rows(indptr, d, factors, f32s, o),
        (FloatSlice::F64(d), FloatSliceMut::F64(o)) => csr_divide_rows(indptr, d, factors, f32s, o),
    }
}

fn dense_to_out(
    data: FloatSlice<'_>,
    n_cols: usize,
    factors: &[f64],
    f32s: bool,
    out: FloatSliceMut<'_>,
) {
    match (data, out) {
        (FloatSlice::F32(d), FloatSliceMut::F32(o)) => {
            dense_divide_rows(d, n_cols, factors, f32s, o)
        }
        (FloatSlice::F32(d), FloatSliceMut::F64(o)) => {
            dense_divide_rows(d, n_cols, factors, f32s, o)
        }
        (FloatSlice::F64(d), FloatSliceMut::F32(o)) => {
            dense_divide_rows(d, n_cols, factors, f32s, o)
        }
        (FloatSlice::F64(d), FloatSliceMut::F64(o)) => {
            dense_divide_rows(d, n_cols, factors, f32s, o)
        }
    }
}
