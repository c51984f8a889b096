//! Per-row sums of a CSR matrix, as scanpy's `_normalize_csr` computes them.
//!
//! Upstream (numba, no fastmath) starts each row with `count = 0.0`, a float64, adds
//! the row's stored values in index order (each widened to float64) and stores the
//! total into an array of the data's dtype. We do exactly that: accumulate in f64,
//! in order, then round once to `T`.

use super::{for_each_in_waves, row_chunks, row_range, split_at_offsets_mut, Float, SparseIndex};

/// Sum of every stored value of each row, rounded to the data's dtype.
pub fn csr_row_sums<T: Float, P: SparseIndex>(indptr: &[P], data: &[T], n_rows: usize) -> Vec<T> {
    sum_rows(indptr, data, n_rows, |_, v: T| v.to_f64())
}

/// Like [`csr_row_sums`], but skipping stored values whose column is excluded
/// (`excluded[col]`). A column index outside `excluded` (or negative) can only come
/// from a client rewriting memory mid-call; such entries are skipped too.
///
/// A skipped value contributes `+0.0` instead, which is the same as skipping it:
/// the accumulator starts at `+0.0` and IEEE addition never turns it into `-0.0`
/// (`+0 + -0 = +0`, exact cancellation gives `+0`), and `x + 0.0 == x` for every
/// other `x`, NaN and infinities included. That keeps the inner loop branch-free.
pub fn csr_row_sums_excluding<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_rows: usize,
    excluded: &[bool],
) -> Vec<T> {
    let value = |j: usize, v: T| {
        let col = indices.get(j).and_then(|c| c.to_usize());
        match col.and_then(|c| excluded.get(c)) {
            Some(false) => v.to_f64(),
            _ => 0.0,
        }
    };
    sum_rows(indptr, data, n_rows, value)
}

/// Shared driver: rows are independent, so chunks of rows run in parallel and the
/// result does not depend on how they are split. `value(j, data[j])` is what stored
/// value `j` adds.
fn sum_rows<T: Float, P: SparseIndex>(
    indptr: &[P],
    data: &[T],
    n_rows: usize,
    value: impl Fn(usize, T) -> f64 + Sync,
) -> Vec<T> {
    let nnz = data.len();
    let chunks = row_chunks(indptr, n_rows, nnz);
    let mut sums = vec![T::from_f64(0.0); n_rows];
    let pieces = split_at_offsets_mut(&mut sums, chunks.iter().map(|c| c.end));
    for_each_in_waves(chunks.into_iter().zip(pieces), |(rows, out)| {
        let ranges = rows.map(|r| row_range(indptr, r, nnz));
        sum_ranges_interleaved(data, ranges, out, &value);
    });
    sums
}

/// Rows summed per pass in lockstep.
const LANES: usize = 4;

/// Each row's sum is one chain of dependent f64 additions, which must stay in index
/// order to match upstream bit for bit; a single chain runs at the adder's latency,
/// not its throughput. So `LANES` rows advance together, each still strictly in its
/// own order: the order of additions within a row is unchanged, only rows overlap.
/// A lane whose row ends takes the next row.
fn sum_ranges_interleaved<T: Float>(
    data: &[T],
    mut ranges: impl Iterator<Item = std::ops::Range<usize>>,
    out: &mut [T],
    value: &impl Fn(usize, T) -> f64,
) {
    let mut slot = [usize::MAX; LANES];
    let mut pos = [0usize; LANES];
    let mut end = [0usize; LANES];
    let mut acc = [0.0f64; LANES];
    let mut next_slot = 0usize;
    loop {
        for l in 0..LANES {
            while pos[l] == end[l] {
                if slot[l] != usize::MAX {
                    out[slot[l]] = T::from_f64(acc[l]);
                    slot[l] = usize::MAX;
                }
                let Some(range) = ranges.next() else { break };
                slot[l] = next_slot;
                next_slot += 1;
                (pos[l], end[l], acc[l]) = (range.start, range.end, 0.0);
            }
        }
        let active = (0..LANES).filter(|&l| pos[l] < end[l]).count();
        if active == 0 {
            return;
        }
        if active < LANES {
            // The last few rows: no lockstep partner left.
            for l in 0..LANES {
                for (j, &v) in (pos[l]..end[l]).zip(&data[pos[l]..end[l]]) {
                    acc[l] += value(j, v);
                }
                pos[l] = end[l];
            }
            continue;
        }
        let step = (0..LANES).map(|l| end[l] - pos[l]).min().unwrap_or(0);
        let lane = |l: usize| &data[pos[l]..pos[l] + step];
        let (d0, d1, d2, d3) = (lane(0), lane(1), lane(2), lane(3));
        let (mut a0, mut a1, mut a2, mut a3) = (acc[0], acc[1], acc[2], acc[3]);
        for k in 0..step {
            a0 += value(pos[0] + k, d0[k]);
            a1 += value(pos[1] + k, d1[k]);
            a2 += value(pos[2] + k, d2[k]);
            a3 += value(pos[3] + k, d3[k]);
        }
        acc = [a0, a1, a2, a3];
        for p in pos.iter_mut() {
            *p += step;
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // the reference loops mirror upstream's
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads};

    fn reference_sums<T: Float>(
        indptr: &[i64],
        data: &[T],
        skip: impl Fn(usize) -> bool,
    ) -> Vec<T> {
        (0..indptr.len() - 1)
            .map(|r| {
                let mut c = 0.0f64;
                for j in indptr[r] as usize..indptr[r + 1] as usize {
                    if !skip(j) {
                        c += data[j].to_f64();
                    }
                }
                T::from_f64(c)
            })
            .collect()
    }

    fn check<T: Float + std::fmt::Debug>(to_t: impl Fn(f64) -> T, bits: impl Fn(T) -> u64) {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(seed as u64, n_rows, n_cols, density);
            let data: Vec<T> = m.data.iter().map(|&v| to_t(v)).collect();
            let expected = reference_sums(&m.indptr, &data, |_| false);
            for threads in [1, 2] {
                let got = with_threads(threads, || csr_row_sums(&m.indptr, &data, n_rows));
                assert_eq!(got.len(), n_rows);
                let same = got.iter().zip(&expected).all(|(a, b)| bits(*a) == bits(*b));
                assert!(same, "shape {n_rows}x{n_cols}, {threads} threads");
            }

            let excluded: Vec<bool> = (0..n_cols).map(|c| c % 3 == 1).collect();
            let expected = reference_sums(&m.indptr, &data, |j| excluded[m.indices[j] as usize]);
            for threads in [1, 2] {
                let got = with_threads(threads, || {
                    csr_row_sums_excluding(&m.indptr, &m.indices, &data, n_rows, &excluded)
                });
                let same = got.iter().zip(&expected).all(|(a, b)| bits(*a) == bits(*b));
                assert!(
                    same,
                    "excluding, shape {n_rows}x{n_cols}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn matches_reference_f32() {
        check(|v| v as f32, |v: f32| v.to_bits() as u64);
    }

    #[test]
    fn matches_reference_f64() {
        check(|v| v, |v: f64| v.to_bits());
    }

    #[test]
    fn f32_accumulates_in_f64() {
        // 2^24 + 1 + 1 is not representable step by step in f32 but is in f64:
        // an f32 accumulator would return 2^24, upstream's f64 one 2^24 + 2.
        let data = [16_777_216.0f32, 1.0, 1.0];
        let sums = csr_row_sums(&[0i32, 3], &data, 1);
        assert_eq!(sums, vec![16_777_218.0f32]);
    }

    #[test]
    fn empty_and_all_zero_rows() {
        let indptr = [0i32, 0, 2, 2, 4];
        let data = [0.0f64, 0.0, 1.5, -0.5];
        assert_eq!(csr_row_sums(&indptr, &data, 4), vec![0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn out_of_range_columns_are_skipped_not_fatal() {
        let indptr = [0i32, 3];
        let indices = [0i32, 99, -4];
        let data = [1.0f32, 2.0, 4.0];
        let got = csr_row_sums_excluding(&indptr, &indices, &data, 1, &[false, false]);
        assert_eq!(got, vec![1.0]);
    }
}
