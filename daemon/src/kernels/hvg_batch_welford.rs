//! Per batch and gene, the mean and the biased variance (M2 / n) by Welford's
//! online algorithm, as scanpy 1.12.2 and later compute them for
//! `highly_variable_genes(flavor="seurat_v3", batch_key=...)` through
//! `sc.get.aggregate(func=["mean", "var"])` (numba kernels `mean_var_csr` and
//! `mean_var_dense`, compiled without fastmath: plain IEEE operations, no fused
//! multiply-add, which Rust does not introduce either). Upstream's `dof`
//! scaling (`var *= n / (n - 1)`) is left to the caller, as it is done in numpy.
//!
//! Loess turns a last-bit difference in these values into a different gene
//! selection, so every operation is upstream's, in upstream's order:
//!
//! CSR (`mean_var_csr`): per gene, over the batch's stored values in row order
//! (rows increasing, as the indicator matrix lists them) and stored order within
//! a row, explicit zeros included, with `n` the count of stored values so far:
//! `delta = v - m; m = m + delta / n; m2 = m2 + delta * (v - m)`. Then, with
//! `k = n_obs - n_stored` implicit zeros (`k > 0` and `n_stored > 0`):
//! `mean = m * n_stored / n_obs` and `m2 = m2 + m * m * n_stored * k / n_obs`
//! (left to right, the integers as f64). Finally `var = m2 / n_obs`. A batch of
//! no cells keeps zeros.
//!
//! Dense (`mean_var_dense`): per gene, over every value of the batch's rows in
//! order, `n` the rows so far: `delta = v - m; m = m + delta / n;
//! m2 = m2 + delta * (v - m)`; then `var = m2 / n`.
//!
//! Parallel over (batch, column block) tasks; every gene's statistics are one
//! task's, in the order above, so results are identical for any thread count.

use super::hvg_mean_var::DENSE_BLOCK;
use super::{place_group_blocks, row_range, Float, SparseIndex};
use rayon::prelude::*;

/// Means and biased variances, `groups × n_cols` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMeanVar {
    pub means: Vec<f64>,
    pub variances: Vec<f64>,
}

/// One gene's running state: mean, M2 and the count of values seen.
#[derive(Clone, Copy, Default)]
struct Acc {
    mean: f64,
    m2: f64,
    n: u64,
}

impl Acc {
    #[inline]
    fn add(&mut self, value: f64) {
        self.n += 1;
        let delta = value - self.mean;
        self.mean += delta / (self.n as f64);
        self.m2 += delta * (value - self.mean);
    }
}

/// CSR: `groups[g]` lists batch g's rows in increasing order. `col_blocks[g]`
/// splits batch g's columns among that many tasks (each scans the batch's rows;
/// only speed depends on it). Column indices outside `0..n_cols` are skipped
/// (the client validated them before).
pub fn csr_batch_welford<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    groups: &[Vec<usize>],
    col_blocks: &[usize],
) -> BatchMeanVar {
    let nnz = data.len().min(indices.len());
    let (indices, data) = (&indices[..nnz], &data[..nnz]);
    let tasks: Vec<(usize, usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, _)| {
            let blocks = col_blocks
                .get(g)
                .copied()
                .unwrap_or(1)
                .clamp(1, n_cols.max(1));
            let width = n_cols.div_ceil(blocks).max(1);
            (0..blocks).map(move |b| (g, (b * width).min(n_cols), ((b + 1) * width).min(n_cols)))
        })
        .collect();
    let results: Vec<(Vec<f64>, Vec<f64>)> = tasks
        .par_iter()
        .map(|&(g, lo, hi)| {
            let mut acc = vec![Acc::default(); hi - lo];
            for &r in &groups[g] {
                let span = row_range(indptr, r, nnz);
                for (&c, &v) in indices[span.clone()].iter().zip(&data[span]) {
                    let k = c.to_usize().unwrap_or(usize::MAX).wrapping_sub(lo);
                    if let Some(a) = acc.get_mut(k) {
                        a.add(v.to_f64());
                    }
                }
            }
            merge_implicit_zeros(&acc, groups[g].len())
        })
        .collect();
    let starts = tasks.iter().map(|&(g, lo, _)| (g, lo));
    let (means, variances) = place_group_blocks(groups.len(), n_cols, starts, results);
    BatchMeanVar { means, variances }
}

/// Merges each gene's stored-value accumulator with the batch's implicit zeros
/// and divides M2 by the batch size, as `mean_var_csr` does.
fn merge_implicit_zeros(acc: &[Acc], n_obs: usize) -> (Vec<f64>, Vec<f64>) {
    let mut means = vec![0.0f64; acc.len()];
    let mut variances = vec![0.0f64; acc.len()];
    if n_obs == 0 {
        return (means, variances);
    }
    let n_obs_f = n_obs as f64;
    for (k, a) in acc.iter().enumerate() {
        let (mut mean, mut m2) = (a.mean, a.m2);
        let zeros = n_obs as i128 - a.n as i128;
        if zeros > 0 && a.n > 0 {
            let n_nz = a.n as f64;
            let mean_a = mean;
            mean = mean_a * n_nz / n_obs_f;
            m2 += mean_a * mean_a * n_nz * (zeros as f64) / n_obs_f;
        }
        means[k] = mean;
        variances[k] = m2 / n_obs_f;
    }
    (means, variances)
}

/// Dense, C-contiguous `n_rows × n_cols`; rows at or beyond `n_rows` are skipped.
pub fn dense_batch_welford<T: Float>(
    data: &[T],
    n_rows: usize,
    n_cols: usize,
    groups: &[Vec<usize>],
) -> BatchMeanVar {
    let blocks = n_cols.div_ceil(DENSE_BLOCK);
    let tasks: Vec<(usize, usize, usize)> = (0..groups.len())
        .flat_map(|g| {
            (0..blocks).map(move |b| (g, b * DENSE_BLOCK, ((b + 1) * DENSE_BLOCK).min(n_cols)))
        })
        .collect();
    let results: Vec<(Vec<f64>, Vec<f64>)> = tasks
        .par_iter()
        .map(|&(g, lo, hi)| {
            let mut mean = vec![0.0f64; hi - lo];
            let mut m2 = vec![0.0f64; hi - lo];
            let mut n = 0u64;
            for &r in &groups[g] {
                if r >= n_rows {
                    continue;
                }
                let Some(row) = data.get(r * n_cols + lo..r * n_cols + hi) else {
                    continue;
                };
                n += 1;
                let nf = n as f64;
                for ((m, q), &v) in mean.iter_mut().zip(m2.iter_mut()).zip(row) {
                    let value = v.to_f64();
                    let delta = value - *m;
                    *m += delta / nf;
                    *q += delta * (value - *m);
                }
            }
            if n > 0 {
                let nf = n as f64;
                for q in m2.iter_mut() {
                    *q /= nf;
                }
            }
            (mean, m2)
        })
        .collect();
    let starts = tasks.iter().map(|&(g, lo, _)| (g, lo));
    let (means, variances) = place_group_blocks(groups.len(), n_cols, starts, results);
    BatchMeanVar { means, variances }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads};

    /// Upstream's `mean_var_csr` for one category, literally.
    fn reference_csr(
        indptr: &[i64],
        indices: &[i32],
        data: &[f32],
        n_cols: usize,
        rows: &[usize],
    ) -> (Vec<f64>, Vec<f64>) {
        let mut mean = vec![0.0f64; n_cols];
        let mut var = vec![0.0f64; n_cols];
        let mut nnz = vec![0i64; n_cols];
        let n_obs = rows.len() as i64;
        if n_obs == 0 {
            return (mean, var);
        }
        for &r in rows {
            for j in indptr[r] as usize..indptr[r + 1] as usize {
                let col = indices[j] as usize;
                let value = data[j] as f64;
                let n = nnz[col] + 1;
                nnz[col] = n;
                let mut m = mean[col];
                let delta = value - m;
                m += delta / n as f64;
                mean[col] = m;
                var[col] += delta * (value - m);
            }
        }
        for col in 0..n_cols {
            let n_nz = nnz[col];
            let k = n_obs - n_nz;
            if k > 0 && n_nz > 0 {
                let mean_a = mean[col];
                mean[col] = mean_a * n_nz as f64 / n_obs as f64;
                var[col] += mean_a * mean_a * n_nz as f64 * k as f64 / n_obs as f64;
            }
            var[col] /= n_obs as f64;
        }
        (mean, var)
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn csr_matches_upstream_for_any_blocking_and_thread_count() {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(seed as u64 + 40, n_rows, n_cols, density);
            let data: Vec<f32> = m.data.iter().map(|&v| (v * 7.3) as f32).collect();
            let groups: Vec<Vec<usize>> = vec![
                (0..n_rows).filter(|r| r % 5 == 0).collect(),
                (0..n_rows).filter(|r| r % 5 != 0).collect(),
                Vec::new(),
            ];
            let want: Vec<_> = groups
                .iter()
                .map(|g| reference_csr(&m.indptr, &m.indices, &data, n_cols, g))
                .collect();
            for (threads, blocks) in [(1, vec![1, 1, 1]), (3, vec![2, 5, 1]), (2, vec![64, 3, 9])] {
                let got = with_threads(threads, || {
                    csr_batch_welford(&m.indptr, &m.indices, &data, n_cols, &groups, &blocks)
                });
                for (g, (wm, wv)) in want.iter().enumerate() {
                    let span = g * n_cols..(g + 1) * n_cols;
                    assert_eq!(bits(&got.means[span.clone()]), bits(wm));
                    assert_eq!(bits(&got.variances[span]), bits(wv));
                }
            }
        }
    }

    #[test]
    fn dense_matches_upstream_row_order() {
        let (n_rows, n_cols) = (41, 2300);
        let data: Vec<f64> = (0..n_rows * n_cols)
            .map(|k| ((k * 7919) % 1000) as f64 * 1e-3 * 10f64.powi((k % 9) as i32))
            .collect();
        let groups = vec![(0..n_rows).collect::<Vec<_>>(), vec![3, 5, 40], vec![7]];
        let got = with_threads(2, || dense_batch_welford(&data, n_rows, n_cols, &groups));
        for (g, rows) in groups.iter().enumerate() {
            for c in 0..n_cols {
                let (mut m, mut q) = (0.0f64, 0.0f64);
                for (i, &r) in rows.iter().enumerate() {
                    let v = data[r * n_cols + c];
                    let delta = v - m;
                    m += delta / (i + 1) as f64;
                    let delta2 = v - m;
                    q += delta * delta2;
                }
                q /= rows.len() as f64;
                assert_eq!(got.means[g * n_cols + c].to_bits(), m.to_bits());
                assert_eq!(got.variances[g * n_cols + c].to_bits(), q.to_bits());
            }
        }
    }

    #[test]
    fn explicit_zeros_count_as_stored_and_bad_columns_are_skipped() {
        // One row with an explicit zero in column 0 and a value in column 1; a
        // second, empty row: column 0 saw one stored value (0), so no merge.
        let indptr = [0i64, 3, 3];
        let indices = [0i32, 1, 7];
        let data = [0.0f64, 3.0, 5.0];
        let got = csr_batch_welford(&indptr, &indices, &data, 2, &[vec![0, 1]], &[1]);
        assert_eq!(got.means, vec![0.0, 1.5]);
        assert_eq!(got.variances, vec![0.0, 2.25]);
    }
}
