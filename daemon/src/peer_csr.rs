//! A CSR matrix in the client's own memory as a source for the Wilcoxon
//! structure's build ([`sorted_csc::Bands`]): read across in blocks, never
//! copied whole, and hashed on the way.
//!
//! A whole copy of a large matrix costs a page fault for every fresh page of the
//! copy, more than the copy itself on this kind of machine (see `streaming`). The
//! build reads the matrix twice, once to count and once to place the values, so
//! here each band is read from the client twice, through small buffers that stay
//! in cache. Bands are runs of whole hash pieces ([`PIECE`] bytes of each array),
//! so the first read also hashes every piece: the fingerprint comes out of the
//! build without a pass of its own, equal to [`fingerprint`]'s.
//!
//! [`fingerprint`]: crate::handlers::fingerprint::fingerprint

use crate::error::{Failure, Result};
use crate::kernels::content_hash::{piece_hash, PIECE};
use crate::kernels::sorted_csc::{Bands, BuildError, Pass};
use crate::kernels::{Float, SparseIndex};
use crate::shm::peer::PeerBuffer;
use crate::shm::Peer;
use crate::streaming::{read_block, PeerArray};
use std::sync::Mutex;

/// Stored values per block read at a time: one piece of 4-byte arrays, two of
/// 8-byte ones, so blocks (and bands of whole blocks) never split a piece.
const BLOCK: usize = PIECE / 4;
/// Bands at most (the build counts per band and column).
const MAX_BANDS: usize = 32;

pub struct PeerCsr<'a, T, I, P> {
    peer: Peer,
    /// Copied and validated: starts at 0, never decreases, ends at `nnz`.
    indptr: &'a [P],
    nnz: usize,
    data: PeerArray,
    indices: PeerArray,
    /// Hash of each piece of the data and of the indices, set by the count pass.
    data_pieces: Mutex<Vec<Option<(u64, u64)>>>,
    index_pieces: Mutex<Vec<Option<(u64, u64)>>>,
    /// The first read that failed, for the reply (the build only learns that one did).
    failure: Mutex<Option<Failure>>,
    _types: std::marker::PhantomData<(T, I)>,
}

/// The hash of each [`PIECE`] of the data, and of the indices, in order.
pub type PieceHashes = (Vec<(u64, u64)>, Vec<(u64, u64)>);

fn pieces_of(values: usize, item: usize) -> usize {
    (values * item).div_ceil(PIECE)
}

impl<'a, T: Float, I: SparseIndex, P: SparseIndex> PeerCsr<'a, T, I, P> {
    /// `indptr` validated against `data.len` (the stored-value count), which
    /// `indices.len` equals.
    pub fn new(peer: Peer, indptr: &'a [P], data: PeerArray, indices: PeerArray) -> Self {
        let nnz = data.len;
        PeerCsr {
            peer,
            indptr,
            nnz,
            data,
            indices,
            data_pieces: Mutex::new(vec![None; pieces_of(nnz, std::mem::size_of::<T>())]),
            index_pieces: Mutex::new(vec![None; pieces_of(nnz, std::mem::size_of::<I>())]),
            failure: Mutex::new(None),
            _types: std::marker::PhantomData,
        }
    }

    /// The failed read behind a failed build, if that was the cause.
    pub fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The piece hashes of the data and of the indices, once the count pass
    /// has read every band.
    pub fn piece_hashes(&self) -> Result<PieceHashes> {
        let all = |m: &Mutex<Vec<Option<(u64, u64)>>>| {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Failure::bad_request("the matrix was not read whole"))
        };
        Ok((all(&self.data_pieces)?, all(&self.index_pieces)?))
    }

    fn n_blocks(&self) -> usize {
        self.nnz.div_ceil(BLOCK)
    }

    fn record(&self, f: Failure) -> BuildError {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(f);
        BuildError::Malformed("reading the client's memory failed".into())
    }
}

/// Hashes `bytes`, the pieces from `first` on, into `hashes`.
fn hash_pieces(bytes: &[u8], first: usize, hashes: &Mutex<Vec<Option<(u64, u64)>>>) {
    let done: Vec<(u64, u64)> = bytes.chunks(PIECE).map(piece_hash).collect();
    let mut hashes = hashes.lock().unwrap_or_else(|e| e.into_inner());
    for (k, h) in done.into_iter().enumerate() {
        hashes[first + k] = Some(h);
    }
}

/// A buffer's values as indices (i32 or i64: any bit pattern is a value; the
/// buffer is 8-byte aligned and holds `n` of them).
fn indices_of<I: SparseIndex>(buf: &PeerBuffer, n: usize) -> &[I] {
    assert!(n * std::mem::size_of::<I>() <= buf.bytes);
    // SAFETY: as above; the buffer outlives the slice.
    unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const I, n) }
}

impl<T: Float, I: SparseIndex, P: SparseIndex> Bands<T> for PeerCsr<'_, T, I, P> {
    fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    fn n_bands(&self) -> usize {
        self.n_blocks().clamp(1, MAX_BANDS)
    }

    fn for_band(
        &self,
        b: usize,
        pass: Pass,
        mut f: impl FnMut(usize, usize, T) -> bool,
    ) -> std::result::Result<(), BuildError> {
        let (n_blocks, n_bands) = (self.n_blocks(), self.n_bands());
        let blocks = (b * n_blocks / n_bands)..((b + 1) * n_blocks / n_bands);
        let end_of = |r: usize| self.indptr[r + 1].to_usize().unwrap_or(usize::MAX);
        for block in blocks {
            let start = block * BLOCK;
            let n = BLOCK.min(self.nnz - start);
            let values = start..start + n;
            let data =
                read_block::<T>(self.peer, self.data, &values).map_err(|e| self.record(e))?;
            let indices =
                read_block::<I>(self.peer, self.indices, &values).map_err(|e| self.record(e))?;
            if pass == Pass::Count {
                let (dp, ip) = (std::mem::size_of::<T>() / 4, std::mem::size_of::<I>() / 4);
                hash_pieces(data.as_bytes(), block * dp, &self.data_pieces);
                hash_pieces(indices.as_bytes(), block * ip, &self.index_pieces);
            }
            // The row of the block's first value: the first row ending after it
            // (empty rows before it end at or before it).
            let mut r = self.indptr[1..].partition_point(|&p| p.to_usize().unwrap_or(0) <= start);
            let mut row_end = end_of(r);
            for (k, (&c, &v)) in indices_of::<I>(&indices, n)
                .iter()
                .zip(data.as_slice::<T>())
                .enumerate()
            {
                while start + k >= row_end {
                    r += 1;
                    row_end = end_of(r);
                }
                if !f(r, c.to_usize().unwrap_or(usize::MAX), v) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::content_hash::{bytes_of, ContentHash};
    use crate::kernels::sorted_csc::{from_bands, from_csr};
    use crate::kernels::test_util::{with_threads, Lcg};

    fn me() -> Peer {
        Peer {
            uid: unsafe { libc::getuid() },
            pid: std::process::id() as i32,
        }
    }

    fn at<U>(v: &[U]) -> PeerArray {
        PeerArray {
            address: v.as_ptr() as u64,
            len: v.len(),
        }
    }

    fn pieces<U: Copy>(v: &[U]) -> Vec<(u64, u64)> {
        bytes_of(v).chunks(PIECE).map(piece_hash).collect()
    }

    /// A matrix over several blocks and bands (rows that straddle blocks, empty
    /// rows, explicit zeros), read from this process's own memory: the same
    /// structure as built from the arrays in place, and every piece hashed as
    /// `ContentHash` hashes it.
    fn check<T: Float + std::fmt::Debug, I: SparseIndex>(
        to_t: impl Fn(f64) -> T,
        to_i: impl Fn(usize) -> I,
    ) {
        let (n_rows, n_cols) = (3000usize, 700usize);
        let mut rng = Lcg(3);
        let (mut indptr, mut indices, mut data) = (vec![0i64], Vec::new(), Vec::new());
        for r in 0..n_rows {
            if r % 7 != 3 {
                for c in 0..n_cols {
                    if rng.below(100) < 30 {
                        indices.push(to_i(c));
                        data.push(to_t(rng.below(50) as f64 * 0.25));
                    }
                }
            }
            indptr.push(indices.len() as i64);
        }
        assert!(data.len() > 2 * BLOCK);
        let csr_indices: Vec<i64> = (0..indices.len())
            .map(|j| indices[j].to_usize().unwrap() as i64)
            .collect();
        let want = from_csr(&indptr, &csr_indices, &data, n_rows, n_cols).unwrap();
        for threads in [1, 2] {
            let src = PeerCsr::<T, I, i64>::new(me(), &indptr, at(&data), at(&indices));
            let got = with_threads(threads, || from_bands(&src, n_cols)).unwrap();
            assert_eq!(got.colptr, want.colptr);
            assert_eq!(got.by_value, want.by_value);
            assert_eq!(
                (got.n_neg.clone(), got.exact.clone()),
                (want.n_neg.clone(), want.exact.clone())
            );
            let (dp, ip) = src.piece_hashes().unwrap();
            assert_eq!(dp, pieces(&data));
            assert_eq!(ip, pieces(&indices));
            let mut h = ContentHash::new(1);
            h.update_pieces(&dp, std::mem::size_of_val(&data[..]) as u64);
            let mut whole = ContentHash::new(1);
            whole.update(bytes_of(&data));
            assert_eq!(h.finish(), whole.finish());
        }
    }

    #[test]
    fn reads_build_and_hash_like_arrays_in_place() {
        check::<f32, i32>(|v| v as f32, |c| c as i32);
        check::<f64, i64>(|v| v, |c| c as i64);
        check::<f32, i64>(|v| v as f32, |c| c as i64);
    }

    #[test]
    fn an_unreadable_array_fails_with_the_read_error() {
        let indptr = vec![0i64, 2];
        let indices = vec![0i32, 1];
        let src = PeerCsr::<f32, i32, i64>::new(
            me(),
            &indptr,
            PeerArray { address: 8, len: 2 },
            at(&indices),
        );
        assert!(from_bands(&src, 2).is_err());
        assert!(src.failure().is_some());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::kernels::sorted_csc::from_bands;
    use crate::kernels::wilcoxon::{nine_groups_query, wilcoxon_stats};

    /// The first call's daemon work (build from the client's memory, then the
    /// query) on a saved CSR matrix (see `test_util::saved_csr`) read from this
    /// process's own memory as from a client's, 9 unequal groups, scanpy 1.12's
    /// request: `RGG_BIN=DIR cargo test --release -p autozymed timing_first_call
    /// -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_first_call() {
        let (indptr, indices, data, m) = crate::kernels::test_util::saved_csr();
        let n = indptr.len() - 1;
        let groups = crate::kernels::test_util::unequal_groups(n);
        let q = nine_groups_query(&groups);
        let me = Peer {
            uid: unsafe { libc::getuid() },
            pid: std::process::id() as i32,
        };
        let arr = |address: u64, len: usize| PeerArray { address, len };
        for _ in 0..4 {
            let src = PeerCsr::<f32, i32, i32>::new(
                me,
                &indptr,
                arr(data.as_ptr() as u64, data.len()),
                arr(indices.as_ptr() as u64, indices.len()),
            );
            let t = std::time::Instant::now();
            let built = from_bands(&src, m).unwrap();
            let b = t.elapsed();
            let st = wilcoxon_stats(&built, &q);
            eprintln!(
                "build {b:?} query {:?} ({})",
                t.elapsed() - b,
                st.rank_sums[3]
            );
        }
    }
}
