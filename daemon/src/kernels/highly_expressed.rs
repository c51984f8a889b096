//! Genes that are "highly expressed" in scanpy's `normalize_total` sense.
//!
//! Upstream (`_normalize_csr` with `exclude_highly_expressed`) flags gene `g` when
//! some stored entry `(r, g)` satisfies `data[j] > max_fraction * counts_per_cell[r]`,
//! where `counts_per_cell` already holds the row sums rounded to the data dtype and
//! numba evaluates the comparison in float64. Only whether a gene was flagged at
//! all matters, so per-task flag sets merged with OR give the same answer for every
//! thread count.

use super::{row_chunks, row_range, Float, SparseIndex, CHUNKS_PER_WAVE};
use rayon::prelude::*;

/// `flags[g]` is true when gene `g` holds more than `max_fraction` of some row's sum.
///
/// `row_sums` are the plain per-row sums in the data's dtype (as upstream keeps
/// them). A NaN anywhere compares false, as in upstream. Entries whose column index
/// is outside `0..n_cols` (only possible if the client rewrote memory after
/// validation) are ignored.
pub fn highly_expressed_genes<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    row_sums: &[T],
    n_cols: usize,
    max_fraction: f64,
) -> Vec<bool> {
    let nnz = data.len();
    let n_rows = row_sums.len();
    let chunks = row_chunks(indptr, n_rows, nnz);
    let mut flagged = vec![false; n_cols];
    // In waves of separate rayon jobs, as `for_each_in_waves` explains.
    for wave in chunks.chunks(CHUNKS_PER_WAVE) {
        let wave_flags = wave
            .par_iter()
            .fold(
                || vec![false; n_cols],
                |mut flags, rows| {
                    for r in rows.clone() {
                        let threshold = max_fraction * row_sums[r].to_f64();
                        let range = row_range(indptr, r, nnz);
                        for (j, v) in range.clone().zip(&data[range]) {
                            if v.to_f64() > threshold {
                                let col = indices.get(j).and_then(|c| c.to_usize());
                                if let Some(flag) = col.and_then(|c| flags.get_mut(c)) {
                                    *flag = true;
                                }
                            }
                        }
                    }
                    flags
                },
            )
            .reduce(|| vec![false; n_cols], or_into);
        flagged = or_into(flagged, wave_flags);
    }
    flagged
}

fn or_into(mut a: Vec<bool>, b: Vec<bool>) -> Vec<bool> {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= y;
    }
    a
}

/// The indices of the flagged genes, ascending.
pub fn flagged_indices(flags: &[bool]) -> Vec<u64> {
    flags
        .iter()
        .enumerate()
        .filter(|(_, &f)| f)
        .map(|(g, _)| g as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::row_sums::csr_row_sums;
    use crate::kernels::test_util::{random_csr, shapes, with_threads};

    /// Upstream's loop, written plainly.
    fn reference<T: Float>(
        indptr: &[i64],
        indices: &[i32],
        data: &[T],
        sums: &[T],
        n_cols: usize,
        f: f64,
    ) -> Vec<bool> {
        let mut counts = vec![0i32; n_cols];
        for r in 0..sums.len() {
            for j in indptr[r] as usize..indptr[r + 1] as usize {
                if data[j].to_f64() > f * sums[r].to_f64() {
                    counts[indices[j] as usize] += 1;
                }
            }
        }
        counts.iter().map(|&c| c != 0).collect()
    }

    fn check<T: Float>(to_t: impl Fn(f64) -> T) {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(100 + seed as u64, n_rows, n_cols, density);
            let data: Vec<T> = m.data.iter().map(|&v| to_t(v)).collect();
            let sums = csr_row_sums(&m.indptr, &data, n_rows);
            for f in [0.05, 0.3, 0.9, 1.0] {
                let expected = reference(&m.indptr, &m.indices, &data, &sums, n_cols, f);
                for threads in [1, 2] {
                    let got = with_threads(threads, || {
                        highly_expressed_genes(&m.indptr, &m.indices, &data, &sums, n_cols, f)
                    });
                    assert_eq!(got, expected, "{n_rows}x{n_cols} f={f} threads={threads}");
                }
            }
        }
    }

    #[test]
    fn matches_reference_f32() {
        check(|v| v as f32);
    }

    #[test]
    fn matches_reference_f64() {
        check(|v| v);
    }

    #[test]
    fn all_zero_rows_flag_nothing() {
        // 0 > f * 0 is false, as upstream.
        let indptr = [0i32, 2, 2];
        let indices = [0i32, 1];
        let data = [0.0f32, 0.0];
        let sums = [0.0f32, 0.0];
        let flags = highly_expressed_genes(&indptr, &indices, &data, &sums, 2, 0.05);
        assert_eq!(flags, vec![false, false]);
    }

    #[test]
    fn comparison_is_in_f64() {
        // 0.3f32 widened is 0.30000001192..., above 0.1 * 3.0 = 0.30000000000000004
        // in f64; an f32 comparison (0.1f32 * 3.0f32 == 0.3f32) would not flag it.
        let indptr = [0i32, 3];
        let indices = [0i32, 1, 2];
        let data = [0.3f32, 0.2, 2.5];
        let sums = [3.0f32];
        let flags = highly_expressed_genes(&indptr, &indices, &data, &sums, 3, 0.1);
        assert_eq!(flags, vec![true, false, true]);
        assert_eq!(flagged_indices(&flags), vec![0, 2]);
    }

    #[test]
    fn nan_never_flags() {
        let indptr = [0i32, 2];
        let indices = [0i32, 1];
        let data = [f64::NAN, 1.0];
        let sums = [f64::NAN];
        let flags = highly_expressed_genes(&indptr, &indices, &data, &sums, 2, 0.5);
        assert_eq!(flags, vec![false, false]);
    }
}
