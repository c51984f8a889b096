//! CSR kernels over arrays that live in the peer's own memory, streamed through
//! block-sized buffers instead of copied whole.
//!
//! A fresh notebook process has its data in ordinary memory. Copying a 600 MB
//! array into the daemon costs, besides the copy, a page fault for every fresh
//! page of the copy; streaming row blocks of about [`BLOCK_VALUES`] values through
//! a few pooled buffers costs only the copy. Blocks never split a row, and each
//! block runs the same kernel as a whole array would, so results are identical.

use crate::error::{Failure, Result};
use crate::kernels::divide_rows::csr_divide_rows;
use crate::kernels::row_sums::csr_row_sums;
use crate::kernels::{row_range, split_rows, Float, SparseIndex};
use crate::shm::peer::PeerBuffer;
use crate::shm::Peer;
use std::ops::Range;

/// Stored values per block: large enough that the kernel's own parallel split
/// keeps both cores busy, small enough that the buffers stay warm in the pool.
const BLOCK_VALUES: usize = 4 << 20;

/// An array in the peer's memory: its address and element count.
#[derive(Debug, Clone, Copy)]
pub struct PeerArray {
    pub address: u64,
    pub len: usize,
}

/// Consecutive row ranges whose stored values total about `BLOCK_VALUES`; a row
/// larger than that is a block of its own.
fn row_blocks<P: SparseIndex>(indptr: &[P], n_rows: usize, nnz: usize) -> Vec<Range<usize>> {
    split_rows(indptr, n_rows, nnz, BLOCK_VALUES, usize::MAX)
}

/// The block's stored-value range and its indptr rebased to start at 0.
fn block_layout<P: SparseIndex>(
    indptr: &[P],
    rows: &Range<usize>,
    nnz: usize,
) -> (Range<usize>, Vec<i64>) {
    let first = row_range(indptr, rows.start, nnz).start;
    let mut local = Vec::with_capacity(rows.len() + 1);
    local.push(0i64);
    let mut end = first;
    for r in rows.clone() {
        end = row_range(indptr, r, nnz).end.max(end);
        local.push((end - first) as i64);
    }
    (first..end, local)
}

/// Reads `values` elements of `T` (a plain number type: only its size is used)
/// starting at element `start` of `array`.
pub(crate) fn read_block<T>(
    peer: Peer,
    array: PeerArray,
    values: &Range<usize>,
) -> Result<PeerBuffer> {
    let size = std::mem::size_of::<T>();
    if values.end > array.len {
        return Err(Failure::bad_matrix(
            "indptr points past the end of the data",
        ));
    }
    let mut buf = PeerBuffer::new(
        array.address + (values.start * size) as u64,
        values.len() * size,
    )?;
    buf.read_from(peer.pid)?;
    Ok(buf)
}

/// Per-row sums (see [`csr_row_sums`]) of a CSR matrix whose data is in the peer's
/// memory; `indptr` has been copied and validated.
pub fn row_sums<T: Float, P: SparseIndex>(
    peer: Peer,
    indptr: &[P],
    data: PeerArray,
    n_rows: usize,
) -> Result<Vec<T>> {
    let mut sums = Vec::with_capacity(n_rows);
    for rows in row_blocks(indptr, n_rows, data.len) {
        let (values, local) = block_layout(indptr, &rows, data.len);
        let buf = read_block::<T>(peer, data, &values)?;
        sums.extend(csr_row_sums(&local, buf.as_slice::<T>(), rows.len()));
    }
    Ok(sums)
}

/// Row division (see [`csr_divide_rows`]) of a CSR matrix whose data and output
/// are in the peer's memory: each block is read, divided, and written back.
pub fn divide_rows<T: Float, U: Float, P: SparseIndex>(
    peer: Peer,
    indptr: &[P],
    data: PeerArray,
    factors: &[f64],
    factors_are_f32: bool,
    out: PeerArray,
) -> Result<()> {
    let out_size = std::mem::size_of::<U>();
    for rows in row_blocks(indptr, factors.len(), data.len) {
        let (values, local) = block_layout(indptr, &rows, data.len);
        let buf = read_block::<T>(peer, data, &values)?;
        let mut result = PeerBuffer::new(
            out.address + (values.start * out_size) as u64,
            values.len() * out_size,
        )?;
        csr_divide_rows(
            &local,
            buf.as_slice::<T>(),
            &factors[rows.clone()],
            factors_are_f32,
            result.as_mut_slice::<U>(),
        );
        result.write_to(peer.pid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes};

    /// Streaming over this process's own memory gives the whole-array results.
    #[test]
    fn streamed_results_equal_whole_array_kernels() {
        let peer = Peer {
            uid: 0,
            pid: std::process::id() as i32,
        };
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(700 + seed as u64, n_rows, n_cols, density);
            let data: Vec<f32> = m.data.iter().map(|&v| v as f32).collect();
            let arr = PeerArray {
                address: data.as_ptr() as u64,
                len: data.len(),
            };
            let got: Vec<f32> = row_sums(peer, &m.indptr, arr, n_rows).unwrap();
            assert_eq!(got, csr_row_sums(&m.indptr, &data, n_rows));

            let factors: Vec<f64> = (0..n_rows).map(|r| 1.0 + r as f64 / 7.0).collect();
            let mut want = vec![0f64; data.len()];
            csr_divide_rows(&m.indptr, &data, &factors, false, &mut want);
            let mut out = vec![0f64; data.len()];
            let out_arr = PeerArray {
                address: out.as_mut_ptr() as u64,
                len: out.len(),
            };
            divide_rows::<f32, f64, _>(peer, &m.indptr, arr, &factors, false, out_arr).unwrap();
            let out = std::hint::black_box(&out);
            assert_eq!(out, &want, "{n_rows}x{n_cols}");
        }
    }

    #[test]
    fn blocks_cover_every_row_once_and_keep_big_rows_whole() {
        let indptr: Vec<i64> = vec![
            0,
            10,
            10,
            BLOCK_VALUES as i64 * 2,
            BLOCK_VALUES as i64 * 2 + 1,
        ];
        let blocks = row_blocks(&indptr, 4, BLOCK_VALUES * 2 + 1);
        let rows: Vec<usize> = blocks.iter().flat_map(|b| b.clone()).collect();
        assert_eq!(rows, vec![0, 1, 2, 3]);
        assert!(blocks.iter().any(|b| b.contains(&2)));
    }
}
