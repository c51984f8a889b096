//! `Request::Leiden`: the parallel-mode Leiden of `crate::kernels::leiden` on a
//! placed CSR graph.

use crate::error::{Failure, Result};
use crate::kernels::leiden::{leiden, symmetrized, Graph};
use crate::kernels::{Float, SparseIndex};
use crate::server::state::Daemon;
use crate::shm::{visit_csr, CsrRegions, CsrVisitor, Peer, Resolver};
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
    let g = visit_csr(Symmetrize { n, use_weights }, pointers, columns, values)
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

/// The graph of a CSR adjacency matrix, made symmetric (A + Aᵀ) as upstream's
/// undirected igraph graph is.
struct Symmetrize {
    n: usize,
    use_weights: bool,
}

impl CsrVisitor for Symmetrize {
    type Out = std::result::Result<Graph, String>;

    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) -> Self::Out {
        symmetrized(indptr, indices, data, self.n, self.use_weights)
    }
}
