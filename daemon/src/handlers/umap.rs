//! `Request::UmapLayout`: umap's layout optimisation (`crate::kernels::umap_layout`)
//! on a placed embedding and edge list; the result replaces the embedding.

use crate::error::{Failure, Result};
use crate::kernels::umap_layout::{optimize, Params};
use crate::server::state::Daemon;
use crate::shm::{FloatSlice, FloatSliceMut, IndexSlice, Peer, Resolver};
use autozyme_protocol::{ArrayRef, ErrorKind, Response};

/// The request's arrays and scalars, as the protocol carries them.
pub struct Layout<'r> {
    pub embedding: &'r ArrayRef,
    pub dim: u64,
    pub head: &'r ArrayRef,
    pub tail: &'r ArrayRef,
    pub epochs_per_sample: &'r ArrayRef,
    pub params: Params,
}

pub fn handle(daemon: &Daemon, peer: Peer, request: Layout<'_>) -> Result<Response> {
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let head = resolver.region(request.head, "head")?;
    let tail = resolver.region(request.tail, "tail")?;
    let epochs = resolver.region(request.epochs_per_sample, "epochs_per_sample")?;
    // Read in, rewritten, written back: the embedding is input and output.
    let mut embedding = resolver.region(request.embedding, "embedding")?;
    embedding.check_apart(&[
        (Some(&head), "head"),
        (Some(&tail), "tail"),
        (Some(&epochs), "epochs_per_sample"),
    ])?;
    let Some(FloatSlice::F64(epochs)) = epochs.floats() else {
        return Err(Failure::bad_request("epochs_per_sample must be F64"));
    };
    let dim = usize::try_from(request.dim).unwrap_or(usize::MAX);
    let threads = rayon::current_num_threads();
    let params = request.params;
    // SAFETY: the embedding overlaps none of the other arrays (checked above).
    let Some(FloatSliceMut::F32(coordinates)) = (unsafe { embedding.floats_mut() }) else {
        return Err(Failure::bad_request("the embedding must be F32"));
    };
    let served = match (head.indices(), tail.indices()) {
        (Some(IndexSlice::I32(h)), Some(IndexSlice::I32(t))) => {
            optimize(coordinates, dim, h, t, epochs, &params, threads)
        }
        (Some(IndexSlice::I64(h)), Some(IndexSlice::I64(t))) => {
            optimize(coordinates, dim, h, t, epochs, &params, threads)
        }
        _ => {
            return Err(Failure::bad_request(
                "head and tail must be both I32 or both I64",
            ))
        }
    };
    served.map_err(|why| Failure::new(ErrorKind::Unsupported, why))?;
    embedding.write_back(peer)?;
    Ok(Response::Done)
}
