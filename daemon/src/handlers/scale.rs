//! `ScaleStats` and `ScaleApply`: scanpy's `sc.pp.scale` (see the kernels
//! `scale_stats` and `scale_apply` for the arithmetic and its order).

use crate::error::{Failure, Result};
use crate::kernels::scale_apply::{csr_to_dense, dense_in_place, dense_to_dense, Transform};
use crate::kernels::scale_stats::{
    csr_column_sums, csr_column_sums_wide, csr_row_sums_f64, dense_column_sums,
    dense_column_sums_wide, rows_in_range, Selection, Sums,
};
use crate::kernels::{Float, SparseIndex};
use crate::server::state::Daemon;
use crate::shm::{
    visit_csr, CsrRegions, CsrVisitor, DenseRegions, FloatSlice, FloatSliceMut, IndexSlice,
    MatrixRegions, Peer, Resolver,
};
use autozyme_protocol::{ArrayRef, DType, ErrorKind, Matrix, Response};

fn selection(rows: Option<&[u64]>, n_rows: usize) -> Result<Option<Vec<usize>>> {
    let Some(rows) = rows else {
        return Ok(None);
    };
    let rows: Vec<usize> = rows
        .iter()
        .map(|&r| usize::try_from(r).unwrap_or(usize::MAX))
        .collect();
    if !rows_in_range(&rows, n_rows) {
        return Err(Failure::bad_request(format!(
            "a selected row is outside 0..{n_rows}"
        )));
    }
    Ok(Some(rows))
}

fn reply(s: Sums) -> Response {
    Response::ScaleStats {
        sums: s.sums,
        sq_sums: s.sq_sums,
    }
}

pub fn stats(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    rows: Option<&[u64]>,
    partitions: u32,
    along_rows: bool,
) -> Result<Response> {
    if partitions == 0 {
        return Err(Failure::bad_request("partitions must be at least 1"));
    }
    let parts = partitions as usize;
    let mut resolver = Resolver::new(&daemon.segments, peer);
    match x {
        Matrix::Csr {
            n_rows,
            n_cols,
            data,
            indices,
            indptr,
        } => {
            let along = along_rows;
            let indices = if along { None } else { indices.as_ref() };
            let csr = CsrRegions::resolve(&mut resolver, *n_rows, *n_cols, data, indices, indptr)?;
            csr.validate_indptr()?;
            let indptr = csr.indptr.indices().expect("dtype checked");
            let data = csr.data.floats().expect("dtype checked");
            if along {
                if rows.is_some() {
                    return Err(Failure::bad_request("rows are not supported along rows"));
                }
                let n = csr.n_rows;
                return Ok(reply(match (indptr, data) {
                    (IndexSlice::I32(p), FloatSlice::F32(d)) => csr_row_sums_f64(p, d, n),
                    (IndexSlice::I32(p), FloatSlice::F64(d)) => csr_row_sums_f64(p, d, n),
                    (IndexSlice::I64(p), FloatSlice::F32(d)) => csr_row_sums_f64(p, d, n),
                    (IndexSlice::I64(p), FloatSlice::F64(d)) => csr_row_sums_f64(p, d, n),
                }));
            }
            let selected = selection(rows, csr.n_rows)?;
            let sel = match &selected {
                Some(r) => Selection::Rows(r),
                None => Selection::All(csr.n_rows),
            };
            let cols = csr.validated_column_indices()?;
            let n_cols = csr.n_cols;
            check_partials(parts.min(csr.n_rows.max(1)), n_cols)?;
            let job = ColumnJob { n_cols, sel, parts };
            Ok(reply(visit_csr(job, indptr, cols, data)))
        }
        Matrix::Dense {
            n_rows,
            n_cols,
            data,
        } => {
            if along_rows {
                return Err(Failure::new(
                    ErrorKind::Unsupported,
                    "row sums of a dense matrix are not a scale statistic",
                ));
            }
            let dense = DenseRegions::resolve(&mut resolver, *n_rows, *n_cols, data)?;
            let selected = selection(rows, dense.n_rows)?;
            let sel = match &selected {
                Some(r) => Selection::Rows(r),
                None => Selection::All(dense.n_rows),
            };
            let n_cols = dense.n_cols;
            check_partials(parts.min(dense.n_rows.max(1)), n_cols)?;
            Ok(reply(match dense.data.floats().expect("dtype checked") {
                FloatSlice::F32(d) => dense_column_sums(d, n_cols, sel, parts),
                FloatSlice::F64(d) => dense_column_sums(d, n_cols, sel, parts),
            }))
        }
    }
}

/// `ScaleChunkStats`: one dask chunk's per-column sums and sums of f64 squares
/// (all rows in order, one part; see `csr_column_sums_wide`).
pub fn chunk_stats(daemon: &Daemon, peer: Peer, x: &Matrix) -> Result<Response> {
    let mut resolver = Resolver::new(&daemon.segments, peer);
    match MatrixRegions::resolve(&mut resolver, x)? {
        MatrixRegions::Csr(csr) => {
            let indptr = csr.indptr.indices().expect("dtype checked");
            let data = csr.data.floats().expect("dtype checked");
            let cols = csr.validated_column_indices()?;
            check_partials(1, csr.n_cols)?;
            let job = WideColumnJob {
                n_cols: csr.n_cols,
                n_rows: csr.n_rows,
            };
            Ok(reply(visit_csr(job, indptr, cols, data)))
        }
        MatrixRegions::Dense(dense) => {
            let (n_rows, n_cols) = (dense.n_rows, dense.n_cols);
            check_partials(1, n_cols)?;
            Ok(reply(match dense.data.floats().expect("dtype checked") {
                FloatSlice::F32(d) => dense_column_sums_wide(d, n_cols, n_rows),
                FloatSlice::F64(d) => dense_column_sums_wide(d, n_cols, n_rows),
            }))
        }
    }
}

struct WideColumnJob {
    n_cols: usize,
    n_rows: usize,
}

impl CsrVisitor for WideColumnJob {
    type Out = Sums;

    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) -> Sums {
        csr_column_sums_wide(indptr, indices, data, self.n_cols, self.n_rows)
    }
}

/// The partial sums (two f64 per part and column) must fit the memory budget.
fn check_partials(parts: usize, n_cols: usize) -> Result<()> {
    let bytes = parts.saturating_mul(n_cols).saturating_mul(16);
    if bytes > crate::shm::peer::budget() {
        return Err(Failure::new(
            ErrorKind::TooLarge,
            format!("{parts} partitions of {n_cols} columns exceed the memory budget"),
        ));
    }
    Ok(())
}

struct ColumnJob<'a> {
    n_cols: usize,
    sel: Selection<'a>,
    parts: usize,
}

impl CsrVisitor for ColumnJob<'_> {
    type Out = Sums;

    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) -> Sums {
        csr_column_sums(indptr, indices, data, self.n_cols, self.sel, self.parts)
    }
}

/// The per-gene part of a `ScaleApply` request.
pub struct Stats<'a> {
    pub mean: Option<&'a [f64]>,
    pub std: &'a [f64],
    pub per_row: bool,
    pub max_value: Option<f64>,
}

pub fn apply(
    daemon: &Daemon,
    peer: Peer,
    x: &Matrix,
    rows: Option<&[u64]>,
    stats: Stats<'_>,
    out: &ArrayRef,
) -> Result<Response> {
    let mean = stats.mean;
    let t = Transform {
        mean,
        std: stats.std,
        per_row: stats.per_row,
        max_value: stats.max_value,
    };
    let mut resolver = Resolver::new(&daemon.segments, peer);
    match x {
        Matrix::Csr {
            n_rows,
            n_cols,
            data,
            indices,
            indptr,
        } => {
            if mean.is_none() || rows.is_some() {
                return Err(Failure::new(
                    ErrorKind::Unsupported,
                    "ScaleApply densifies CSR input only to centre all rows",
                ));
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
            check_stats(&t, csr.n_rows, csr.n_cols)?;
            if out.dtype != DType::F64 {
                return Err(Failure::bad_request(
                    "a densified CSR matrix's out must be F64",
                ));
            }
            let mut out_region = resolver.output(out, "out")?;
            check_out_len(out_region.len(), csr.n_rows, csr.n_cols)?;
            out_region.check_apart(&[
                (Some(&csr.data), "data"),
                (csr.indices.as_ref(), "indices"),
                (Some(&csr.indptr), "indptr"),
            ])?;
            let cols = csr.validated_column_indices()?;
            let indptr = csr.indptr.indices().expect("dtype checked");
            let data = csr.data.floats().expect("dtype checked");
            // SAFETY: `out` overlaps none of x's arrays (checked above).
            let Some(FloatSliceMut::F64(values)) = (unsafe { out_region.floats_mut() }) else {
                return Err(Failure::bad_request("out must be F64"));
            };
            let n_cols = csr.n_cols;
            visit_csr(
                Densify {
                    n_cols,
                    t,
                    out: values,
                },
                indptr,
                cols,
                data,
            );
            out_region.write_back(peer)?;
        }
        Matrix::Dense {
            n_rows,
            n_cols,
            data,
        } => {
            let mut dense = DenseRegions::resolve(&mut resolver, *n_rows, *n_cols, data)?;
            check_stats(&t, dense.n_rows, dense.n_cols)?;
            let selected = selection(rows, dense.n_rows)?.map(|rows| {
                let mut flags = vec![false; dense.n_rows];
                for r in rows {
                    flags[r] = true;
                }
                flags
            });
            let sel = selected.as_deref();
            let n_cols = dense.n_cols;
            if out.dtype != dense.data.dtype() {
                return Err(Failure::bad_request("out must have x's dtype"));
            }
            let mut out_region = resolver.output(out, "out")?;
            check_out_len(out_region.len(), dense.n_rows, dense.n_cols)?;
            if out_region.is_in_place_of(&dense.data)? {
                // SAFETY: `out` is x's data itself; no other view of it is alive.
                match unsafe { dense.data.floats_mut() }.expect("dtype checked") {
                    FloatSliceMut::F32(d) => dense_in_place(d, n_cols, t, sel),
                    FloatSliceMut::F64(d) => dense_in_place(d, n_cols, t, sel),
                }
                dense.data.write_back(peer)?;
            } else {
                // SAFETY: `out` does not overlap x's data (checked above).
                let values = unsafe { out_region.floats_mut() }.expect("dtype checked");
                match (dense.data.floats().expect("dtype checked"), values) {
                    (FloatSlice::F32(d), FloatSliceMut::F32(o)) => {
                        dense_to_dense(d, n_cols, t, sel, o)
                    }
                    (FloatSlice::F64(d), FloatSliceMut::F64(o)) => {
                        dense_to_dense(d, n_cols, t, sel, o)
                    }
                    _ => return Err(Failure::bad_request("out must have x's dtype")),
                }
                out_region.write_back(peer)?;
            }
        }
    }
    Ok(Response::Done)
}

/// A CSR matrix centred, scaled and clipped into the dense `out`.
struct Densify<'a, 'o> {
    n_cols: usize,
    t: Transform<'a>,
    out: &'o mut [f64],
}

impl CsrVisitor for Densify<'_, '_> {
    type Out = ();

    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) {
        csr_to_dense(indptr, indices, data, self.n_cols, self.t, self.out)
    }
}

fn check_stats(t: &Transform<'_>, n_rows: usize, n_cols: usize) -> Result<()> {
    if !t.fits(n_rows, n_cols) {
        return Err(Failure::bad_request(format!(
            "{} means and {} standard deviations for a {n_rows} x {n_cols} matrix{}",
            t.mean.map_or(0, |m| m.len()),
            t.std.len(),
            if t.per_row { " (per row)" } else { "" }
        )));
    }
    Ok(())
}

fn check_out_len(len: usize, n_rows: usize, n_cols: usize) -> Result<()> {
    if Some(len) != n_rows.checked_mul(n_cols) {
        return Err(Failure::bad_request(format!(
            "out has {len} elements for a {n_rows} x {n_cols} result"
        )));
    }
    Ok(())
}
