//! `Fingerprint`: a 128-bit hash of a matrix's content, the key of the daemon's
//! derived-data cache (rank_genes_groups) and of results clients keep (hvg).

use crate::error::{Failure, Result};
use crate::kernels::content_hash::{bytes_of, ContentHash, PIECE};
use crate::server::state::Daemon;
use crate::shm::peer::PeerBuffer;
use crate::shm::{FloatSlice, IndexSlice, MatrixRegions, Peer, Region, Resolver};
use autozyme_protocol::{ArrayRef, DType, Location, Matrix, Response};

pub fn handle(daemon: &Daemon, peer: Peer, x: &Matrix) -> Result<Response> {
    let mut resolver = Resolver::new(&daemon.segments, peer);
    let key = fingerprint(&mut resolver, peer, x)?;
    Ok(Response::Fingerprint {
        lo: key as u64,
        hi: (key >> 64) as u64,
    })
}

fn dtype_tag(d: DType) -> u64 {
    match d {
        DType::F32 => 1,
        DType::F64 => 2,
        DType::I32 => 3,
        DType::I64 => 4,
    }
}

/// The fingerprint of a matrix: kind, shape, dtypes and every array's bytes.
pub fn fingerprint(resolver: &mut Resolver<'_>, peer: Peer, x: &Matrix) -> Result<u128> {
    fingerprint_by(x, |array, what, h| {
        hash_array(resolver, peer, array, what, h)
    })
}

/// [`fingerprint`] of a matrix whose arrays are resolved already: for a matrix
/// in the client's own memory that is about to be copied anyway, each array is
/// read across once and hashed from the copy.
pub fn fingerprint_resolved(x: &Matrix, regions: &MatrixRegions) -> Result<u128> {
    // In the order `fingerprint_by` hashes them.
    let resolved: Vec<Option<&Region>> = match regions {
        MatrixRegions::Csr(c) => vec![Some(&c.data), c.indices.as_ref(), Some(&c.indptr)],
        MatrixRegions::Dense(d) => vec![Some(&d.data)],
    };
    let mut next = resolved.into_iter();
    fingerprint_by(x, |_, what, h| match next.next().flatten() {
        Some(region) => hash_region(region, what, h),
        None => Err(Failure::bad_request(format!("{what}: not resolved"))),
    })
}

/// [`fingerprint`] of a CSR matrix whose data and indices were hashed piece by
/// piece as they were read (see [`crate::peer_csr`]), with its resolved indptr.
pub fn fingerprint_csr_pieces(
    x: &Matrix,
    data: &[(u64, u64)],
    indices: &[(u64, u64)],
    indptr: &Region,
) -> Result<u128> {
    // In the order `fingerprint_by` hashes them: data, indices, indptr.
    let mut next = 0;
    fingerprint_by(x, |array, what, h| {
        next += 1;
        let pieces = match next {
            1 => data,
            2 => indices,
            _ => return hash_region(indptr, what, h),
        };
        h.update_pieces(pieces, array.len * array.dtype.size() as u64);
        Ok(())
    })
}

fn fingerprint_by(
    x: &Matrix,
    mut hash: impl FnMut(&ArrayRef, &str, &mut ContentHash) -> Result<()>,
) -> Result<u128> {
    let mut h = ContentHash::new(0x5753_4353);
    let (kind, n_rows, n_cols) = match x {
        Matrix::Csr { n_rows, n_cols, .. } => (1, *n_rows, *n_cols),
        Matrix::Dense { n_rows, n_cols, .. } => (2, *n_rows, *n_cols),
    };
    let arrays = matrix_arrays(x)?;
    h.update_u64(kind);
    h.update_u64(n_rows);
    h.update_u64(n_cols);
    for (array, what) in arrays {
        h.update_u64(dtype_tag(array.dtype));
        h.update_u64(array.len);
        let mut part = ContentHash::new(dtype_tag(array.dtype));
        hash(array, what, &mut part)?;
        let p = part.finish();
        h.update_u64(p as u64);
        h.update_u64((p >> 64) as u64);
    }
    Ok(h.finish())
}

/// The arrays a fingerprint covers, in the order it hashes them.
pub fn matrix_arrays(x: &Matrix) -> Result<Vec<(&ArrayRef, &'static str)>> {
    Ok(match x {
        Matrix::Csr {
            data,
            indices,
            indptr,
            ..
        } => {
            let indices = indices
                .as_ref()
                .ok_or_else(|| Failure::bad_request("a fingerprint needs the CSR indices"))?;
            vec![
                (data, "CSR data"),
                (indices, "CSR indices"),
                (indptr, "CSR indptr"),
            ]
        }
        Matrix::Dense { data, .. } => vec![(data, "dense data")],
    })
}

fn hash_array(
    resolver: &mut Resolver<'_>,
    peer: Peer,
    array: &ArrayRef,
    what: &str,
    h: &mut ContentHash,
) -> Result<()> {
    let bytes = array
        .len
        .checked_mul(array.dtype.size() as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| Failure::bad_request(format!("{what}: too many elements")))?;
    match array.location {
        Location::Peer { address } => {
            // Streamed through one block-sized buffer: hashing a copy of a large
            // array would cost a page fault per fresh page.
            let block = 16 * PIECE;
            let mut at = 0usize;
            while at < bytes {
                let n = block.min(bytes - at);
                let mut buf = PeerBuffer::new(address + at as u64, n)?;
                buf.read_from(peer.pid)?;
                h.update(buf.as_bytes());
                at += n;
            }
        }
        Location::Segment { .. } => hash_region(&resolver.region(array, what)?, what, h)?,
    }
    Ok(())
}

fn hash_region(region: &Region, what: &str, h: &mut ContentHash) -> Result<()> {
    match (region.floats(), region.indices()) {
        (Some(FloatSlice::F32(v)), _) => h.update(bytes_of(v)),
        (Some(FloatSlice::F64(v)), _) => h.update(bytes_of(v)),
        (_, Some(IndexSlice::I32(v))) => h.update(bytes_of(v)),
        (_, Some(IndexSlice::I64(v))) => h.update(bytes_of(v)),
        _ => return Err(Failure::bad_request(format!("{what}: unexpected dtype"))),
    }
    Ok(())
}
