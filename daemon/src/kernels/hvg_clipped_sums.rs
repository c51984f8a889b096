//! Per batch and gene, the sums of the clipped values and of their squares, as
//! scanpy 1.11.5's `highly_variable_genes(flavor="seurat_v3")` computes them.
//!
//! Each value is widened to f64 and clipped to its gene's batch clip value: numba's
//! `min(value, clip)` and numpy's `putmask(x, x > clip, clip)` both give `clip`
//! exactly when `value > clip` (so a NaN stays a NaN, and a NaN clip clips
//! nothing).
//!
//! CSR (upstream's numba `_sum_and_sum_squares_clipped` on the batch's rows, in
//! their original order): per gene, starting from 0.0, add `e` and `e * e` for
//! every stored value in row order and index order within a row.
//!
//! Dense (numpy's `.sum(axis=0)` of the clipped f64 copy and of its square, on a
//! C-contiguous matrix with more than one column): per gene, the batch's rows in
//! order, starting from the first row's value.
//!
//! Parallel over (batch, column block) tasks; each sum is one task's, in the order
//! above, so results are identical for any thread count and any blocking.

use super::hvg_mean_var::DENSE_BLOCK;
use super::{row_range, Float, SparseIndex};
use rayon::prelude::*;

/// `value` clipped to `clip` the way upstream does it.
#[inline]
fn clipped(value: f64, clip: f64) -> f64 {
    if value > clip {
        clip
    } else {
        value
    }
}

/// Sums and sums of squares, each `groups × n_cols` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ClippedSums {
    pub sums: Vec<f64>,
    pub squares: Vec<f64>,
}

/// CSR: `groups[g]` lists batch g's rows in increasing order, `clip` holds
/// `groups × n_cols` clip values. `col_blocks` splits each batch's columns among
/// that many tasks (each scans the batch's rows; only speed depends on it).
/// Column indices at or beyond `n_cols` are skipped. With `from` (sums,
/// squares; `groups × n_cols` each), the sums continue from those values
/// instead of 0.0: a sequence of additions split over several calls, each
/// call's rows after the previous call's, is the one sequence.
pub fn csr_clipped_sums<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    groups: &[Vec<usize>],
    clip: &[f64],
    col_blocks: usize,
    from: Option<(&[f64], &[f64])>,
) -> ClippedSums {
    let nnz = data.len().min(indices.len());
    let (indices, data) = (&indices[..nnz], &data[..nnz]);
    let col_blocks = col_blocks.clamp(1, n_cols.max(1));
    let width = n_cols.div_ceil(col_blocks).max(1);
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..col_blocks).map(move |b| (g, b)))
        .collect();
    let results: Vec<Vec<[f64; 2]>> = tasks
        .par_iter()
        .map(|&(g, b)| {
            let lo = (b * width).min(n_cols);
            let hi = (lo + width).min(n_cols);
            let clip = clip.get(g * n_cols + lo..g * n_cols + hi).unwrap_or(&[]);
            let start = |v: &[f64], k: usize| v.get(g * n_cols + lo + k).copied().unwrap_or(0.0);
            // Each gene's clip value next to its two sums: one cache line per value.
            let mut acc: Vec<[f64; 4]> = clip
                .iter()
                .enumerate()
                .map(|(k, &c)| match from {
                    Some((sums, squares)) => [start(squares, k), start(sums, k), c, 0.0],
                    None => [0.0, 0.0, c, 0.0],
                })
                .collect();
            for &r in &groups[g] {
                let span = row_range(indptr, r, nnz);
                for (&c, &v) in indices[span.clone()].iter().zip(&data[span]) {
                    let k = c.to_usize().unwrap_or(usize::MAX).wrapping_sub(lo);
                    if let Some(a) = acc.get_mut(k) {
                        let e = clipped(v.to_f64(), a[2]);
                        a[0] += e * e;
                        a[1] += e;
                    }
                }
            }
            acc.into_iter().map(|a| [a[0], a[1]]).collect()
        })
        .collect();
    assemble(groups.len(), n_cols, width, &tasks, results)
}

/// Dense, C-contiguous `n_rows × n_cols`; rows at or beyond `n_rows` are skipped.
pub fn dense_clipped_sums<T: Float>(
    data: &[T],
    n_rows: usize,
    n_cols: usize,
    groups: &[Vec<usize>],
    clip: &[f64],
) -> ClippedSums {
    let blocks = n_cols.div_ceil(DENSE_BLOCK);
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..blocks).map(move |b| (g, b)))
        .collect();
    let results: Vec<Vec<[f64; 2]>> = tasks
        .par_iter()
        .map(|&(g, b)| {
            let lo = b * DENSE_BLOCK;
            let hi = (lo + DENSE_BLOCK).min(n_cols);
            let clip = clip.get(g * n_cols + lo..g * n_cols + hi).unwrap_or(&[]);
            let mut acc = vec![[0.0f64; 2]; clip.len()];
            let mut first = true;
            for &r in &groups[g] {
                if r >= n_rows {
                    continue;
                }
                let Some(row) = data.get(r * n_cols + lo..r * n_cols + lo + clip.len()) else {
                    continue;
                };
                for ((a, &v), &cv) in acc.iter_mut().zip(row).zip(clip) {
                    let e = clipped(v.to_f64(), cv);
                    if first {
                        *a = [e * e, e];
                    } else {
                        a[0] += e * e;
                        a[1] += e;
                    }
                }
                first = false;
            }
            acc
        })
        .collect();
    assemble(groups.len(), n_cols, DENSE_BLOCK, &tasks, results)
}

fn assemble(
    n_groups: usize,
    n_cols: usize,
    width: usize,
    tasks: &[(usize, usize)],
    results: Vec<Vec<[f64; 2]>>,
) -> ClippedSums {
    let mut squares = vec![0.0f64; n_groups * n_cols];
    let mut sums = vec![0.0f64; n_groups * n_cols];
    for (&(g, b), acc) in tasks.iter().zip(results) {
        let at = g * n_cols + b * width;
        for (k, a) in acc.iter().enumerate() {
            squares[at + k] = a[0];
            sums[at + k] = a[1];
        }
    }
    ClippedSums { sums, squares }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads};

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn csr_adds_in_row_order_for_any_blocking() {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(seed as u64 + 40, n_rows, n_cols, density);
            let groups = vec![
                (0..n_rows).filter(|r| r % 2 == 0).collect::<Vec<_>>(),
                (0..n_rows).filter(|r| r % 2 == 1).collect::<Vec<_>>(),
            ];
            let clip: Vec<f64> = (0..2 * n_cols).map(|k| 3.0 + (k % 17) as f64).collect();
            let mut want_s = vec![0.0f64; 2 * n_cols];
            let mut want_q = vec![0.0f64; 2 * n_cols];
            for (g, rows) in groups.iter().enumerate() {
                for &r in rows {
                    for j in m.indptr[r] as usize..m.indptr[r + 1] as usize {
                        let c = g * n_cols + m.indices[j] as usize;
                        let e = m.data[j].min(clip[c]);
                        want_q[c] += e * e;
                        want_s[c] += e;
                    }
                }
            }
            for blocks in [1, 2, 5] {
                for threads in [1, 3] {
                    let got = with_threads(threads, || {
                        csr_clipped_sums(
                            &m.indptr, &m.indices, &m.data, n_cols, &groups, &clip, blocks, None,
                        )
                    });
                    assert_eq!(bits(&got.sums), bits(&want_s));
                    assert_eq!(bits(&got.squares), bits(&want_q));
                }
            }
        }
    }

    #[test]
    fn csr_continued_over_two_calls_is_one_sequence() {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            if n_rows < 2 {
                continue;
            }
            let m = random_csr(seed as u64 + 70, n_rows, n_cols, density);
            let clip: Vec<f64> = (0..n_cols).map(|k| 2.0 + (k % 13) as f64 * 0.7).collect();
            let all = vec![(0..n_rows).collect::<Vec<_>>()];
            let whole =
                csr_clipped_sums(&m.indptr, &m.indices, &m.data, n_cols, &all, &clip, 2, None);
            let cut = n_rows / 2;
            let first = vec![(0..cut).collect::<Vec<_>>()];
            let second = vec![(cut..n_rows).collect::<Vec<_>>()];
            let a = csr_clipped_sums(
                &m.indptr, &m.indices, &m.data, n_cols, &first, &clip, 3, None,
            );
            let b = csr_clipped_sums(
                &m.indptr,
                &m.indices,
                &m.data,
                n_cols,
                &second,
                &clip,
                1,
                Some((&a.sums, &a.squares)),
            );
            assert_eq!(bits(&b.sums), bits(&whole.sums));
            assert_eq!(bits(&b.squares), bits(&whole.squares));
        }
    }

    #[test]
    fn dense_starts_from_the_first_row() {
        let (n_rows, n_cols) = (9, 2100);
        let data: Vec<f32> = (0..n_rows * n_cols)
            .map(|k| ((k * 31) % 23) as f32 * 0.37)
            .collect();
        let groups = vec![vec![0, 4, 8], vec![1, 2, 3, 5, 6, 7]];
        let clip: Vec<f64> = (0..2 * n_cols).map(|k| (k % 11) as f64).collect();
        let got = dense_clipped_sums(&data, n_rows, n_cols, &groups, &clip);
        for (g, rows) in groups.iter().enumerate() {
            for c in 0..n_cols {
                let cv = clip[g * n_cols + c];
                let e0 = (data[rows[0] * n_cols + c] as f64).min(cv);
                let (mut s, mut q) = (e0, e0 * e0);
                for &r in &rows[1..] {
                    let e = (data[r * n_cols + c] as f64).min(cv);
                    s += e;
                    q += e * e;
                }
                assert_eq!(got.sums[g * n_cols + c].to_bits(), s.to_bits());
                assert_eq!(got.squares[g * n_cols + c].to_bits(), q.to_bits());
            }
        }
    }

    #[test]
    fn nan_clip_clips_nothing() {
        assert_eq!(clipped(5.0, f64::NAN), 5.0);
        assert!(clipped(f64::NAN, 1.0).is_nan());
        assert_eq!(clipped(5.0, 2.0), 2.0);
    }
}
