//! Per-gene means and variances of groups of cells (all cells, and each batch), as
//! scanpy 1.11.5's `_get_mean_var` computes them for `highly_variable_genes`
//! (flavor `seurat_v3`), without copying any batch out of the matrix.
//!
//! CSR (upstream's numba `sparse_mean_var_minor_axis`, run on the batch's rows, which
//! boolean row indexing copies in their original order): the rows are dealt to
//! `partitions` accumulators (numba's thread count in the client), row `k` of the
//! group to accumulator `k % partitions`. Each accumulator adds, per column, every
//! stored value widened to f64 and the value's square computed in the data's dtype
//! and then widened, in row order and index order within a row, starting from 0.0.
//! The per-column totals add the accumulators in partition order, starting from
//! 0.0. Then `mean = sum / n` and `var = squares / n - mean * mean`.
//!
//! Dense (numpy's `x.mean(axis=0, dtype=np.float64)` on a C-contiguous matrix with
//! more than one column): per column, the values (and `x * x` in the data's dtype)
//! widened to f64 and added in row order, starting from the first row's value.
//!
//! Parallel over (group, partition) tasks for CSR and (group, column block) tasks
//! for dense; every sum is computed by one task in the order above, so the results
//! are identical for any thread count. The unbiased correction (`* n / (n - 1)`) is
//! left to the caller, as upstream does it in numpy.

use super::{place_group_blocks, row_range, Float, SparseIndex};
use rayon::prelude::*;

/// What a check of every stored value found (scanpy's `check_nonnegative_integers`
/// and whether the fast path may serve the call at all).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ValueFlags {
    /// Some value has its sign bit set (`np.signbit`, so -0.0 counts).
    pub negative: bool,
    /// Some finite value has a fractional part.
    pub non_integer: bool,
    /// Some value is NaN or infinite.
    pub non_finite: bool,
    /// The largest value (NaNs ignored; 0 for no values).
    pub largest: f64,
}

impl ValueFlags {
    /// One value's flags.
    #[inline]
    pub fn of<T: Float>(v: T) -> Self {
        ValueFlags {
            negative: v.is_sign_negative(),
            non_integer: v.has_fraction(),
            non_finite: !v.is_finite(),
            largest: v.abs_f64(),
        }
    }

    fn merge(&mut self, other: ValueFlags) {
        self.negative |= other.negative;
        self.non_integer |= other.non_integer;
        self.non_finite |= other.non_finite;
        self.largest = self.largest.max(other.largest);
    }

    /// Whether every sum of values and of their squares (each square rounded to
    /// the data's dtype, as upstream computes it) over up to `n_rows` values is
    /// exact in f64, whatever the order of additions: all values are non-negative
    /// integers, so every square is an integer too (a rounded f32 square of 2^24
    /// or more is one), and `n_rows * largest^2` (with headroom for the f32
    /// rounding) stays far below 2^53, so no partial sum is ever rounded.
    pub fn sums_are_exact(&self, n_rows: usize) -> bool {
        let bound = (n_rows as f64) * self.largest * self.largest * 2.0;
        !self.negative && !self.non_integer && !self.non_finite && bound < 4_503_599_627_370_496.0
    }
}

/// Means and (biased) variances, `groups × n_cols` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupMeanVar {
    pub means: Vec<f64>,
    pub variances: Vec<f64>,
}

/// Sums of values and of squares, `groups × n_cols` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSums {
    pub sums: Vec<f64>,
    pub squares: Vec<f64>,
}

impl GroupSums {
    /// Means and variances of groups of `sizes[g]` cells.
    pub fn mean_var(&self, sizes: &[usize], n_cols: usize) -> GroupMeanVar {
        let mut means = vec![0.0f64; self.sums.len()];
        let mut variances = vec![0.0f64; self.sums.len()];
        if n_cols > 0 {
            for (g, &n) in sizes.iter().enumerate() {
                let span = g * n_cols..(g + 1) * n_cols;
                if span.end > self.sums.len() {
                    break;
                }
                finish(
                    &self.sums[span.clone()],
                    &self.squares[span.clone()],
                    n,
                    &mut means[span.clone()],
                    &mut variances[span],
                );
            }
        }
        GroupMeanVar { means, variances }
    }

    /// One group holding every group's cells, its sums added group by group
    /// (exact, and so equal to any other order, only when
    /// [`ValueFlags::sums_are_exact`] holds).
    pub fn pooled(&self, n_cols: usize) -> GroupSums {
        let mut sums = vec![0.0f64; n_cols];
        let mut squares = vec![0.0f64; n_cols];
        if n_cols > 0 {
            for (s, q) in self.sums.chunks(n_cols).zip(self.squares.chunks(n_cols)) {
                for c in 0..n_cols.min(s.len()) {
                    sums[c] += s[c];
                    squares[c] += q[c];
                }
            }
        }
        GroupSums { sums, squares }
    }
}

/// Bytes of per-task accumulators alive at once; more tasks run in later waves.
const WAVE_BYTES: usize = 256 << 20;
/// Columns per dense task: a row's strip of this many values is a few KiB.
pub const DENSE_BLOCK: usize = 1024;

/// `mean = s / n`, `var = q / n - mean * mean` (numba's and numpy's expressions).
fn finish(sums: &[f64], squares: &[f64], n: usize, means: &mut [f64], variances: &mut [f64]) {
    let n = n as f64;
    for c in 0..sums.len() {
        let mean = sums[c] / n;
        means[c] = mean;
        variances[c] = squares[c] / n - mean * mean;
    }
}

/// Every stored value's flags, OR-ed (a separate streaming pass: it vectorises,
/// where checks inside the scattering loops would not).
pub fn value_flags<T: Float>(data: &[T]) -> ValueFlags {
    data.par_chunks(1 << 16)
        .map(|chunk| {
            let (mut neg, mut frac, mut inf, mut big) = (false, false, false, 0.0f64);
            for &v in chunk {
                let f = ValueFlags::of(v);
                neg |= f.negative;
                frac |= f.non_integer;
                inf |= f.non_finite;
                // A plain compare (NaNs are flagged apart): `f64::max` does not vectorise.
                big = if f.largest > big { f.largest } else { big };
            }
            ValueFlags {
                negative: neg,
                non_integer: frac,
                non_finite: inf,
                largest: big,
            }
        })
        .reduce(ValueFlags::default, |mut a, b| {
            a.merge(b);
            a
        })
}

/// CSR: `groups[g]` lists group g's rows in increasing order. Column indices
/// outside `0..n_cols` are skipped, as upstream's kernel skips those beyond it.
pub fn csr_group_mean_var<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    groups: &[Vec<usize>],
    partitions: usize,
) -> GroupMeanVar {
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    csr_group_sums(indptr, indices, data, n_cols, groups, partitions).mean_var(&sizes, n_cols)
}

/// The sums behind [`csr_group_mean_var`].
pub fn csr_group_sums<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    groups: &[Vec<usize>],
    partitions: usize,
) -> GroupSums {
    csr_group_sums_impl::<T, P, I, false>(indptr, indices, data, n_cols, groups, partitions).0
}

/// [`csr_group_sums`], also checking every value it adds ([`ValueFlags`]) and
/// counting column indices outside `0..n_cols` (skipped), in the same pass.
/// When the groups cover every row once, that is every stored value.
pub fn csr_group_sums_checked<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    groups: &[Vec<usize>],
    partitions: usize,
) -> (GroupSums, ValueFlags, usize) {
    csr_group_sums_impl::<T, P, I, true>(indptr, indices, data, n_cols, groups, partitions)
}

fn csr_group_sums_impl<T: Float, P: SparseIndex, I: SparseIndex, const CHECK: bool>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    groups: &[Vec<usize>],
    partitions: usize,
) -> (GroupSums, ValueFlags, usize) {
    let nnz = data.len().min(indices.len());
    let (indices, data) = (&indices[..nnz], &data[..nnz]);
    let partitions = partitions.max(1);
    let tasks: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, rows)| (0..partitions.min(rows.len())).map(move |i| (g, i)))
        .collect();
    let per_task = (2 * n_cols * std::mem::size_of::<f64>()).max(1);
    let wave = (WAVE_BYTES / per_task).max(1);
    let mut sums = vec![0.0f64; groups.len() * n_cols];
    let mut squares = vec![0.0f64; groups.len() * n_cols];
    let mut flags = ValueFlags::default();
    let mut bad = 0usize;
    // Tasks are ordered by (group, partition) and waves reduced in that order, so
    // each total adds its partitions in upstream's order.
    for chunk in tasks.chunks(wave) {
        let partials: Vec<(Vec<[f64; 2]>, ValueFlags, usize)> = chunk
            .par_iter()
            .map(|&(g, i)| {
                let mut acc = vec![[0.0f64; 2]; n_cols];
                let (mut neg, mut frac, mut inf, mut big, mut skipped) =
                    (false, false, false, 0.0f64, 0usize);
                for &r in groups[g].iter().skip(i).step_by(partitions) {
                    let span = row_range(indptr, r, nnz);
                    for (&c, &v) in indices[span.clone()].iter().zip(&data[span]) {
                        if CHECK {
                            let f = ValueFlags::of(v);
                            neg |= f.negative;
                            frac |= f.non_integer;
                            inf |= f.non_finite;
                            // A plain compare (NaNs are flagged apart): `f64::max` does not vectorise.
                            big = if f.largest > big { f.largest } else { big };
                        }
                        if let Some(a) = acc.get_mut(c.to_usize().unwrap_or(usize::MAX)) {
                            a[0] += v.to_f64();
                            a[1] += v.square_widened();
                        } else if CHECK {
                            skipped += 1;
                        }
                    }
                }
                let seen = ValueFlags {
                    negative: neg,
                    non_integer: frac,
                    non_finite: inf,
                    largest: big,
                };
                (acc, seen, skipped)
            })
            .collect();
        for (&(g, _), (acc, seen, skipped)) in chunk.iter().zip(partials) {
            let s = &mut sums[g * n_cols..(g + 1) * n_cols];
            let q = &mut squares[g * n_cols..(g + 1) * n_cols];
            for (c, a) in acc.iter().enumerate() {
                s[c] += a[0];
                q[c] += a[1];
            }
            flags.merge(seen);
            bad += skipped;
        }
    }
    (GroupSums { sums, squares }, flags, bad)
}

/// Dense, C-contiguous `n_rows × n_cols` (`data.len()` must be `n_rows * n_cols`;
/// rows at or beyond `n_rows` are skipped).
pub fn dense_group_mean_var<T: Float>(
    data: &[T],
    n_rows: usize,
    n_cols: usize,
    groups: &[Vec<usize>],
) -> GroupMeanVar {
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    dense_group_sums(data, n_rows, n_cols, groups).mean_var(&sizes, n_cols)
}

/// The sums behind [`dense_group_mean_var`].
pub fn dense_group_sums<T: Float>(
    data: &[T],
    n_rows: usize,
    n_cols: usize,
    groups: &[Vec<usize>],
) -> GroupSums {
    let blocks = n_cols.div_ceil(DENSE_BLOCK);
    let tasks: Vec<(usize, usize)> = (0..groups.len())
        .flat_map(|g| (0..blocks).map(move |b| (g, b)))
        .collect();
    let results: Vec<(Vec<f64>, Vec<f64>)> = tasks
        .par_iter()
        .map(|&(g, b)| {
            let lo = b * DENSE_BLOCK;
            let hi = (lo + DENSE_BLOCK).min(n_cols);
            let mut s = vec![0.0f64; hi - lo];
            let mut q = vec![0.0f64; hi - lo];
            let mut first = true;
            for &r in &groups[g] {
                if r >= n_rows {
                    continue;
                }
                let Some(row) = data.get(r * n_cols + lo..r * n_cols + hi) else {
                    continue;
                };
                if first {
                    for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                        *s = v.to_f64();
                        *q = v.square_widened();
                    }
                    first = false;
                } else {
                    for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                        *s += v.to_f64();
                        *q += v.square_widened();
                    }
                }
            }
            (s, q)
        })
        .collect();
    let starts = tasks.iter().map(|&(g, b)| (g, b * DENSE_BLOCK));
    let (sums, squares) = place_group_blocks(groups.len(), n_cols, starts, results);
    GroupSums { sums, squares }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads};

    /// Upstream's numba kernel, literally: per-thread accumulators over strided rows.
    fn reference_csr(
        indptr: &[i64],
        indices: &[i32],
        data: &[f32],
        n_cols: usize,
        rows: &[usize],
        t: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut s = vec![vec![0.0f64; n_cols]; t];
        let mut q = vec![vec![0.0f64; n_cols]; t];
        for i in 0..t {
            for k in (i..rows.len()).step_by(t) {
                let r = rows[k];
                for j in indptr[r] as usize..indptr[r + 1] as usize {
                    let c = indices[j] as usize;
                    s[i][c] += data[j] as f64;
                    q[i][c] += (data[j] * data[j]) as f64;
                }
            }
        }
        let n = rows.len() as f64;
        let mut means = vec![0.0; n_cols];
        let mut vars = vec![0.0; n_cols];
        for c in 0..n_cols {
            let (mut a, mut b) = (0.0f64, 0.0f64);
            for i in 0..t {
                a += s[i][c];
                b += q[i][c];
            }
            means[c] = a / n;
            vars[c] = b / n - (a / n) * (a / n);
        }
        (means, vars)
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn csr_matches_upstream_order_for_any_thread_count() {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(seed as u64, n_rows, n_cols, density);
            let data: Vec<f32> = m.data.iter().map(|&v| (v * 7.3) as f32).collect();
            let all: Vec<usize> = (0..n_rows).collect();
            let evens: Vec<usize> = (0..n_rows).filter(|r| r % 3 != 1).collect();
            let odds: Vec<usize> = (0..n_rows).filter(|r| r % 3 == 1).collect();
            let groups = vec![all, evens, odds];
            for t in [1usize, 2, 3, 7] {
                let want: Vec<_> = groups
                    .iter()
                    .map(|g| reference_csr(&m.indptr, &m.indices, &data, n_cols, g, t))
                    .collect();
                for threads in [1, 3] {
                    let got = with_threads(threads, || {
                        csr_group_mean_var(&m.indptr, &m.indices, &data, n_cols, &groups, t)
                    });
                    for (g, (wm, wv)) in want.iter().enumerate() {
                        if groups[g].is_empty() {
                            continue;
                        }
                        let span = g * n_cols..(g + 1) * n_cols;
                        assert_eq!(bits(&got.means[span.clone()]), bits(wm));
                        assert_eq!(bits(&got.variances[span]), bits(wv));
                    }
                }
            }
        }
    }

    #[test]
    fn dense_adds_rows_in_order_from_the_first() {
        let (n_rows, n_cols) = (37, 2500);
        let data: Vec<f64> = (0..n_rows * n_cols)
            .map(|k| ((k * 7919) % 1000) as f64 * 1e-3 * 10f64.powi((k % 9) as i32))
            .collect();
        let groups = vec![(0..n_rows).collect::<Vec<_>>(), vec![3, 5, 36]];
        let got = with_threads(2, || dense_group_mean_var(&data, n_rows, n_cols, &groups));
        for (g, rows) in groups.iter().enumerate() {
            for c in 0..n_cols {
                let mut s = data[rows[0] * n_cols + c];
                let mut q = s * s;
                for &r in &rows[1..] {
                    s += data[r * n_cols + c];
                    q += data[r * n_cols + c] * data[r * n_cols + c];
                }
                let n = rows.len() as f64;
                assert_eq!(got.means[g * n_cols + c].to_bits(), (s / n).to_bits());
                let var = q / n - (s / n) * (s / n);
                assert_eq!(got.variances[g * n_cols + c].to_bits(), var.to_bits());
            }
        }
    }

    #[test]
    fn flags_see_every_value() {
        for (data, want) in [
            ([1.0f32, 2.0, 3.0], ValueFlags::default()),
            (
                [1.0, -0.0, 3.0],
                ValueFlags {
                    negative: true,
                    ..Default::default()
                },
            ),
            (
                [1.0, 2.0, 3.5],
                ValueFlags {
                    non_integer: true,
                    ..Default::default()
                },
            ),
            (
                [f32::INFINITY, 2.0, 3.0],
                ValueFlags {
                    non_finite: true,
                    ..Default::default()
                },
            ),
            ([1.0, 2.0, 1e9], ValueFlags::default()),
            (
                [8_388_607.5, 2.0, 1.0],
                ValueFlags {
                    non_integer: true,
                    ..Default::default()
                },
            ),
            (
                [f32::NAN, 2.0, 0.25],
                ValueFlags {
                    non_integer: true,
                    non_finite: true,
                    ..Default::default()
                },
            ),
        ] {
            let strip = |f: ValueFlags| ValueFlags { largest: 0.0, ..f };
            assert_eq!(strip(value_flags(&data)), want, "{data:?}");
            let wide: Vec<f64> = data.iter().map(|&v| v as f64).collect();
            assert_eq!(strip(value_flags(&wide)), want, "{data:?}");
        }
        // 2^52 + 0.5 rounds to an integer: every f64 from 2^52 on is one.
        assert!(!value_flags(&[0.5f64 + 4_503_599_627_370_496.0]).non_integer);
        assert!(value_flags(&[4_503_599_627_370_495.5f64]).non_integer);
    }

    #[test]
    fn pooled_integer_sums_equal_the_all_cells_pass() {
        let m = random_csr(77, 400, 60, 0.3);
        let data: Vec<f32> = m.data.iter().map(|&v| (v * 3.0).floor() as f32).collect();
        let flags = value_flags(&data);
        assert!(flags.sums_are_exact(400));
        let batches: Vec<Vec<usize>> = (0..3)
            .map(|b| (0..400).filter(|r| (r * 7 + r / 5) % 3 == b).collect())
            .collect();
        let by_batch = csr_group_sums(&m.indptr, &m.indices, &data, 60, &batches, 2);
        let all = csr_group_sums(&m.indptr, &m.indices, &data, 60, &[(0..400).collect()], 2);
        assert_eq!(bits(&by_batch.pooled(60).sums), bits(&all.sums));
        assert_eq!(bits(&by_batch.pooled(60).squares), bits(&all.squares));
        let (checked, flags2, bad) =
            csr_group_sums_checked(&m.indptr, &m.indices, &data, 60, &batches, 2);
        assert_eq!((checked, flags2, bad), (by_batch.clone(), flags, 0));
        let (_, _, bad) = csr_group_sums_checked(&m.indptr, &m.indices, &data, 59, &batches, 3);
        assert!(bad > 0);
        let frac = [0.5f32, 1.0];
        assert!(!value_flags(&frac).sums_are_exact(2));
        assert!(!value_flags(&[1e9f32]).sums_are_exact(1 << 20));
    }

    #[test]
    fn bad_column_indices_are_skipped() {
        let indptr = [0i64, 3];
        let indices = [0i32, 9, -1];
        let data = [2.0f64, 5.0, 7.0];
        let got = csr_group_mean_var(&indptr, &indices, &data, 2, &[vec![0]], 2);
        assert_eq!(got.means, vec![2.0, 0.0]);
    }
}
