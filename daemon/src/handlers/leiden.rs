//! `Request::Leiden`: the parallel-mode Leiden of `crate::kernels::leiden` on a
//! placed CSR graph.

use crate::error::{Failure, Result};
use crate::kernels::leiden::{leiden, symmetrized, Graph};
use crate::kernels::{Float, SparseIndex};
use crate::server::state::Daemon;
use crate::shm::{CsrRegions, FloatSlice, IndexSlice, Peer, Resolver};
use autozyme_protocol::{ErrorKind, Matrix, Response};

pub fn handle(
    daemon: &Daemon,
    peer: Peer,
    graph: &Matrix,
    use_weights: bool,
    resolution: f64,
    n_iterations: Option<u64>,
    seed: u64,
) -> Result<Response> {
    let Matrix::Csr {
        n_rows,
        n_cols,
        data,
        indices,
        indptr,
    } = graph
    else {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            "Leiden takes a CSR graph",
        ));
    };
    if n_rows != n_cols {
        return Err(Failure::bad_matrix(format!(
            "a graph's adjacency must be square, not {n_rows} x {n_cols}"
        )));
    }
    if !resolution.is_finite() || resolution < 0.0 {
        return Err(Failure::new(
            ErrorKind::Unsupported,
            format!("resolution {resolution}"),
        ));
    }
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let csr = CsrRegions::resolve(
        &mut resolver,
        *n_rows,
        *n_cols,
        data,
        indices.as_ref(),
        indptr,
    )?;
    csr.validate_indptr()?;
    let columns = csr.validated_column_indices()?;
    let values = csr.data.floats().expect("dtype checked");
    let pointers = csr.indptr.indices().expect("dtype checked");
    let n = csr.n_rows;
    let g = match pointers {
        IndexSlice::I32(p) => with_indices(p, columns, values, n, use_weights),
        IndexSlice::I64(p) => with_indices(p, columns, values, n, use_weights),
    }
    .map_err(|e| Failure::new(ErrorKind::Unsupported, e))?;
    let n_iterations = match n_iterations {
        None => -1,
        Some(k) => i64::try_from(k).unwrap_or(i64::MAX),
    };
    let membership = leiden(&g, resolution, n_iterations, seed);
    Ok(Response::Leiden {
        membership: membership.into_iter().map(u64::from).collect(),
    })
}

fn with_indices<P: SparseIndex>(
    indptr: &[P],
    indices: IndexSlice<'_>,
    data: FloatSlice<'_>,
    n: usize,
    use_weights: bool,
) -> std::result::Result<Graph, String> {
    match indices {
        IndexSlice::I32(i) => with_data(indptr, i, data, n, use_weights),
        IndexSlice::I64(i) => with_data(indptr, i, data, n, use_weights),
    }
}

fn with_data<P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: FloatSlice<'_>,
    n: usize,
    use_weights: bool,
) -> std::result::Result<Graph, String> {
    match data {
        FloatSlice::F32(d) => run(indptr, indices, d, n, use_weights),
        FloatSlice::F64(d) => run(indptr, indices, d, n, use_weights),
    }
}

fn run<P: SparseIndex, I: SparseIndex, T: Float>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n: usize,
    use_weights: bool,
) -> std::result::Result<Graph, String> {
    symmetrized(indptr, indices, data, n, use_weights)
}
