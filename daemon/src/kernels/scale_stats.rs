//! Per-gene sums and sums of squares for scanpy's `sc.pp.scale` (its
//! `_get_mean_var`), each accumulated in f64 in exactly upstream's order, so the
//! mean and variance the shim derives from them are bit-identical to upstream's.
//!
//! Upstream's orders:
//! - CSR, per column (numba `sparse_mean_var_minor_axis`): the rows are dealt
//!   round-robin to `n_threads` parts (row `k` of the selection goes to part
//!   `k % n_threads`); each part adds its rows' values in row order, then index
//!   order, starting from 0.0; a value is widened to f64, its square is taken in
//!   the data's dtype and then widened. The parts are then added in part order,
//!   starting from 0.0.
//! - dense, per column (numpy `x.mean(axis=0, dtype=float64)` on a C-contiguous
//!   matrix with more than one column): the rows in order, from 0.0; the squares
//!   (`x * x`, the data's dtype) likewise. That is the CSR order with one part.
//! - per row (numba `sparse_mean_var_major_axis`, which upstream runs on the
//!   columns of a CSC matrix): the row's values in index order, each widened to
//!   f64 before squaring, from 0.0.
//!
//! Parallel work splits parts and column blocks (or rows), never one sum, so the
//! results are identical for every thread count.

use super::{for_each_in_waves, row_chunks, row_range, split_at_offsets_mut, Float, SparseIndex};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Mutex;

/// Sums and sums of squares, one pair per column (or per row).
#[derive(Debug, Clone, PartialEq)]
pub struct Sums {
    pub sums: Vec<f64>,
    pub sq_sums: Vec<f64>,
}

/// Which rows, in which order: all of `0..n`, or a selection (validated by the
/// caller to lie in `0..n_rows`; an out-of-range row is skipped, never trusted).
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    All(usize),
    Rows(&'a [usize]),
}

impl Selection<'_> {
    fn len(&self) -> usize {
        match self {
            Selection::All(n) => *n,
            Selection::Rows(r) => r.len(),
        }
    }

    fn get(&self, k: usize) -> usize {
        match self {
            Selection::All(_) => k,
            Selection::Rows(r) => r[k],
        }
    }
}

/// Column blocks per part: enough tasks to keep every worker busy. The blocking
/// never changes a column's order of additions, only who computes it.
fn column_blocks(n_cols: usize, parts: usize) -> Vec<Range<usize>> {
    let threads = rayon::current_num_threads().max(1);
    let blocks = threads.div_ceil(parts.max(1)).clamp(1, n_cols.max(1));
    let width = n_cols.div_ceil(blocks).max(1);
    (0..n_cols)
        .step_by(width)
        .map(|c| c..(c + width).min(n_cols))
        .collect()
}

/// One task's partial sums and sums of squares.
type Partial = (Vec<f64>, Vec<f64>);

/// Runs `part_sums(part, columns)` for every part and column block in parallel,
/// then adds the parts in order (from 0.0) per column.
fn combine_parts(
    n_cols: usize,
    parts: usize,
    part_sums: impl Fn(usize, Range<usize>) -> Partial + Sync,
) -> Sums {
    let blocks = column_blocks(n_cols, parts);
    let tasks: Vec<(usize, Range<usize>)> = (0..parts)
        .flat_map(|p| blocks.iter().map(move |b| (p, b.clone())))
        .collect();
    // Per task its block's partial sums, stored by task index.
    let results: Vec<Mutex<Option<Partial>>> = tasks.iter().map(|_| Mutex::new(None)).collect();
    for_each_in_waves(tasks.iter().enumerate(), |(i, (p, cols))| {
        let r = part_sums(*p, cols.clone());
        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    });
    let mut sums = vec![0.0f64; n_cols];
    let mut sq_sums = vec![0.0f64; n_cols];
    // Tasks are ordered part-major, so this adds part 0, then part 1, ... per column.
    for ((_, cols), result) in tasks.iter().zip(results) {
        let (s, q) = result
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_default();
        for ((c, ps), pq) in cols.clone().zip(s).zip(q) {
            sums[c] += ps;
            sq_sums[c] += pq;
        }
    }
    Sums { sums, sq_sums }
}

/// CSR, per column, rows dealt round-robin into `parts` parts (numba's order).
pub fn csr_column_sums<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    rows: Selection<'_>,
    parts: usize,
) -> Sums {
    csr_column_sums_by(
        indptr,
        indices,
        data,
        n_cols,
        rows,
        parts,
        T::square_widened,
    )
}

/// CSR, per column, all rows in order (one part), each value widened to f64
/// before it is squared: what fast-array-utils' dask `mean_var` leaf sums for
/// one chunk (scipy's `ones @ chunk` of the values, then of
/// `np.power(values, 2, dtype=float64)`).
pub fn csr_column_sums_wide<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    n_rows: usize,
) -> Sums {
    csr_column_sums_by(
        indptr,
        indices,
        data,
        n_cols,
        Selection::All(n_rows),
        1,
        |v: T| {
            let w = v.to_f64();
            w * w
        },
    )
}

fn csr_column_sums_by<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    rows: Selection<'_>,
    parts: usize,
    square: impl Fn(T) -> f64 + Sync,
) -> Sums {
    let nnz = data.len().min(indices.len());
    // Parts beyond the row count would add only zeros, which leave a sum that
    // starts from +0.0 unchanged: bound them (and the memory they take).
    let parts = parts.clamp(1, rows.len().max(1));
    combine_parts(n_cols, parts, |part, cols| {
        let width = cols.len();
        let mut s = vec![0.0f64; width];
        let mut q = vec![0.0f64; width];
        let whole = width == n_cols;
        let mut k = part;
        while k < rows.len() {
            let r = rows.get(k);
            for j in row_range(indptr, r, nnz) {
                let Some(c) = indices[j].to_usize() else {
                    continue;
                };
                let Some(at) = c.checked_sub(cols.start) else {
                    continue;
                };
                if !whole && at >= width {
                    continue;
                }
                if let (Some(ps), Some(pq)) = (s.get_mut(at), q.get_mut(at)) {
                    let v = data[j];
                    *ps += v.to_f64();
                    *pq += square(v);
                }
            }
            k += parts;
        }
        (s, q)
    })
}

/// Dense (C-contiguous, `n_cols` columns), per column, rows dealt into `parts`.
pub fn dense_column_sums<T: Float>(
    data: &[T],
    n_cols: usize,
    rows: Selection<'_>,
    parts: usize,
) -> Sums {
    dense_column_sums_by(data, n_cols, rows, parts, T::square_widened)
}

/// Dense, per column, all rows in order, each value widened to f64 before it
/// is squared: the dask `mean_var` leaf on a dense chunk (numpy's
/// `sum(axis=0, dtype=float64)` of the values and of
/// `np.power(values, 2, dtype=float64)`, more than one column).
pub fn dense_column_sums_wide<T: Float>(data: &[T], n_cols: usize, n_rows: usize) -> Sums {
    dense_column_sums_by(data, n_cols, Selection::All(n_rows), 1, |v: T| {
        let w = v.to_f64();
        w * w
    })
}

fn dense_column_sums_by<T: Float>(
    data: &[T],
    n_cols: usize,
    rows: Selection<'_>,
    parts: usize,
    square: impl Fn(T) -> f64 + Sync,
) -> Sums {
    let parts = parts.clamp(1, rows.len().max(1));
    combine_parts(n_cols, parts, |part, cols| {
        let width = cols.len();
        let mut s = vec![0.0f64; width];
        let mut q = vec![0.0f64; width];
        let row = |k: usize| {
            let start = rows.get(k) * n_cols;
            data.get(start + cols.start..start + cols.end)
        };
        // Four rows per sweep over the block: each column still adds them one
        // after the other, in row order, but its running sums stay in registers.
        let mut k = part;
        while k + 3 * parts < rows.len() {
            let (Some(a), Some(b), Some(c), Some(d)) = (
                row(k),
                row(k + parts),
                row(k + 2 * parts),
                row(k + 3 * parts),
            ) else {
                break;
            };
            let it = s.iter_mut().zip(q.iter_mut());
            for ((((ps, pq), &va), &vb), (&vc, &vd)) in it.zip(a).zip(b).zip(c.iter().zip(d)) {
                let (mut x, mut y) = (*ps, *pq);
                for v in [va, vb, vc, vd] {
                    x += v.to_f64();
                    y += square(v);
                }
                *ps = x;
                *pq = y;
            }
            k += 4 * parts;
        }
        while k < rows.len() {
            if let Some(values) = row(k) {
                for ((ps, pq), &v) in s.iter_mut().zip(q.iter_mut()).zip(values) {
                    *ps += v.to_f64();
                    *pq += square(v);
                }
            }
            k += parts;
        }
        (s, q)
    })
}

/// CSR, per row: values widened to f64, then squared (numba's major-axis kernel).
pub fn csr_row_sums_f64<T: Float, P: SparseIndex>(indptr: &[P], data: &[T], n_rows: usize) -> Sums {
    let nnz = data.len();
    let mut sums = vec![0.0f64; n_rows];
    let mut sq_sums = vec![0.0f64; n_rows];
    let chunks = row_chunks(indptr, n_rows, nnz);
    let ends: Vec<usize> = chunks.iter().map(|c| c.end).collect();
    let s_parts = split_at_offsets_mut(&mut sums, ends.iter().copied());
    let q_parts = split_at_offsets_mut(&mut sq_sums, ends.iter().copied());
    let tasks = chunks.into_iter().zip(s_parts).zip(q_parts);
    for_each_in_waves(tasks, |((rows, s), q)| {
        for (i, r) in rows.enumerate() {
            let (mut a, mut b) = (0.0f64, 0.0f64);
            for &v in &data[row_range(indptr, r, nnz)] {
                let v = v.to_f64();
                a += v;
                b += v * v;
            }
            s[i] = a;
            q[i] = b;
        }
    });
    Sums { sums, sq_sums }
}

/// Whether every selected row lies in `0..n_rows`.
pub fn rows_in_range(rows: &[usize], n_rows: usize) -> bool {
    rows.par_iter().all(|&r| r < n_rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads, Lcg};

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The plain sequential reference, as numba runs it.
    fn reference_csr<T: Float>(
        indptr: &[i64],
        indices: &[i32],
        data: &[T],
        n_cols: usize,
        rows: &[usize],
        parts: usize,
    ) -> Sums {
        let mut ps = vec![vec![0.0f64; n_cols]; parts];
        let mut pq = vec![vec![0.0f64; n_cols]; parts];
        for p in 0..parts {
            let mut k = p;
            while k < rows.len() {
                let r = rows[k];
                for j in indptr[r] as usize..indptr[r + 1] as usize {
                    let c = indices[j] as usize;
                    ps[p][c] += data[j].to_f64();
                    pq[p][c] += data[j].square_widened();
                }
                k += parts;
            }
        }
        let mut sums = vec![0.0; n_cols];
        let mut sq_sums = vec![0.0; n_cols];
        for p in 0..parts {
            for c in 0..n_cols {
                sums[c] += ps[p][c];
                sq_sums[c] += pq[p][c];
            }
        }
        Sums { sums, sq_sums }
    }

    #[test]
    fn csr_column_sums_match_reference_for_every_thread_count() {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(500 + seed as u64, n_rows, n_cols, density);
            let data32: Vec<f32> = m.data.iter().map(|&v| (v * 0.37) as f32).collect();
            let all: Vec<usize> = (0..n_rows).collect();
            let some: Vec<usize> = (0..n_rows).filter(|r| r % 3 != 1).collect();
            for parts in [1usize, 2, 3, 8] {
                for rows in [&all, &some] {
                    let want64 = reference_csr(&m.indptr, &m.indices, &m.data, n_cols, rows, parts);
                    let want32 = reference_csr(&m.indptr, &m.indices, &data32, n_cols, rows, parts);
                    for threads in [1, 2, 3] {
                        let sel = Selection::Rows(rows);
                        let got64 = with_threads(threads, || {
                            csr_column_sums(&m.indptr, &m.indices, &m.data, n_cols, sel, parts)
                        });
                        let got32 = with_threads(threads, || {
                            csr_column_sums(&m.indptr, &m.indices, &data32, n_cols, sel, parts)
                        });
                        assert_eq!(bits(&got64.sums), bits(&want64.sums));
                        assert_eq!(bits(&got64.sq_sums), bits(&want64.sq_sums));
                        assert_eq!(bits(&got32.sums), bits(&want32.sums));
                        assert_eq!(bits(&got32.sq_sums), bits(&want32.sq_sums));
                    }
                }
            }
        }
    }

    #[test]
    fn dense_column_sums_are_sequential_per_column() {
        let mut rng = Lcg(7);
        for &(n_rows, n_cols) in &[(0usize, 3usize), (1, 1), (5, 2), (300, 17), (2000, 40)] {
            let data: Vec<f32> = (0..n_rows * n_cols)
                .map(|_| (rng.unit() * 100.0) as f32)
                .collect();
            let rows: Vec<usize> = (0..n_rows).rev().collect();
            let mut sums = vec![0.0f64; n_cols];
            let mut sq = vec![0.0f64; n_cols];
            for &r in &rows {
                for c in 0..n_cols {
                    let v = data[r * n_cols + c];
                    sums[c] += v as f64;
                    sq[c] += (v * v) as f64;
                }
            }
            for threads in [1, 2, 4] {
                let got = with_threads(threads, || {
                    dense_column_sums(&data, n_cols, Selection::Rows(&rows), 1)
                });
                assert_eq!(bits(&got.sums), bits(&sums));
                assert_eq!(bits(&got.sq_sums), bits(&sq));
            }
        }
    }

    #[test]
    fn negative_zero_columns_sum_to_positive_zero() {
        let data = [-0.0f64, -0.0, -0.0, -0.0];
        let got = dense_column_sums(&data, 2, Selection::All(2), 1);
        assert_eq!(bits(&got.sums), bits(&[0.0, 0.0]));
        let got = csr_column_sums(
            &[0i64, 1, 2],
            &[0i32, 0],
            &data[..2],
            2,
            Selection::All(2),
            2,
        );
        assert_eq!(bits(&got.sums), bits(&[0.0, 0.0]));
    }

    #[test]
    fn wide_column_sums_square_in_f64() {
        // 3e20 squared overflows f32 but not f64; 1.1f32 squared rounds in f32.
        let data = [3.0e20f32, 1.1, 1.1, 2.0];
        let (a, b) = (3.0e20f32 as f64, 1.1f32 as f64);
        let got = dense_column_sums_wide(&data, 2, 2);
        assert_eq!(bits(&got.sq_sums), bits(&[a * a + b * b, b * b + 4.0]));
        let got = csr_column_sums_wide(&[0i32, 2, 4], &[0i32, 1, 0, 1], &data, 2, 2);
        assert_eq!(bits(&got.sq_sums), bits(&[a * a + b * b, b * b + 4.0]));
        assert_eq!(bits(&got.sums), bits(&[a + b, b + 2.0]));
    }

    #[test]
    fn row_sums_square_in_f64() {
        let data = [3.0e20f32, 1.5];
        let got = csr_row_sums_f64(&[0i32, 2, 2], &data, 2);
        let v = 3.0e20f32 as f64;
        assert_eq!(got.sq_sums[0], v * v + 2.25);
        assert_eq!(got.sums[1], 0.0);
    }

    #[test]
    fn bad_indices_never_panic() {
        let got = csr_column_sums(
            &[0i64, 2, 3],
            &[5i32, -1, 1],
            &[1.0f64, 2.0, 3.0],
            2,
            Selection::All(2),
            2,
        );
        assert_eq!(got.sums, vec![0.0, 3.0]);
    }
}
