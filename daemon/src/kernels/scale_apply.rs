//! The fused pass of scanpy's `sc.pp.scale`: centre, divide by the per-gene
//! standard deviation and clip, writing dense rows, in one read of the input.
//!
//! Upstream's arithmetic, step by step (numpy then numba):
//! - sparse input: `x.todense() - mean` (the densified matrix in the data's
//!   dtype, duplicates added in index order onto 0.0, then widened and centred
//!   in f64: an f64 result), `np.true_divide(x, std, out=x)` in f64, then the
//!   clip.
//! - dense input of dtype T: `x -= mean` (f64 arithmetic rounded to T),
//!   `true_divide(x, std, out=x)` (f64 rounded to T), then the clip.
//! - clip (numba `clip_array`): compared in f64, `v > max` becomes `max`, else,
//!   when centring, `v < -max` becomes `-max`; NaN stays NaN.
//!
//! Rows are independent, so parallel row blocks give identical results for every
//! thread count.

use super::{dense_rows_per_chunk, for_each_in_waves, row_range, Float, SparseIndex};

/// What to do with each value after densifying.
#[derive(Debug, Clone, Copy)]
pub struct Transform<'a> {
    /// Subtract (`zero_center`); also makes the clip symmetric.
    pub mean: Option<&'a [f64]>,
    pub std: &'a [f64],
    /// `mean` and `std` are per row (the matrix is a transpose), not per column.
    pub per_row: bool,
    pub max_value: Option<f64>,
}

/// One gene's statistics: the mean to subtract (if centring) and the std.
#[derive(Debug, Clone, Copy)]
struct Gene {
    mean: Option<f64>,
    std: f64,
}

impl Transform<'_> {
    /// Statistics of gene `i` (a column, or with `per_row` a row); NaN if the
    /// index is out of range (impossible after the handler's length checks).
    #[inline]
    fn gene(&self, i: usize) -> Gene {
        Gene {
            mean: self.mean.map(|m| m.get(i).copied().unwrap_or(f64::NAN)),
            std: self.std.get(i).copied().unwrap_or(f64::NAN),
        }
    }

    /// The clip bounds in f64: values above `hi` become `hi`, else values below
    /// `lo` become `lo` (numba's `clip_array`; the lower bound only when
    /// centring). Infinite bounds never clip, and a NaN bound never compares.
    #[inline]
    fn bounds(&self) -> (f64, f64) {
        match self.max_value {
            None => (f64::INFINITY, f64::NEG_INFINITY),
            Some(max) if self.mean.is_some() => (max, -max),
            Some(max) => (max, f64::NEG_INFINITY),
        }
    }

    /// Clips `v` (already of the output dtype) as numba's `clip_array` does.
    #[inline]
    fn clip<U: Float>(&self, v: U) -> U {
        let (hi, lo) = self.bounds();
        clip_to(v, hi, lo, U::from_f64(hi), U::from_f64(lo))
    }

    /// Sparse input: the densified value `v` (dtype T), centred and divided in
    /// f64 (the centred dense matrix is f64).
    #[inline]
    fn sparse_value<T: Float>(&self, v: T, g: Gene) -> f64 {
        let centred = match g.mean {
            Some(mean) => v.to_f64() - mean,
            None => v.to_f64(),
        };
        self.clip(centred / g.std)
    }

    /// Whether `mean` and `std` have one value per gene of an `n_rows` x
    /// `n_cols` matrix.
    pub fn fits(&self, n_rows: usize, n_cols: usize) -> bool {
        let n = if self.per_row { n_rows } else { n_cols };
        self.std.len() == n && self.mean.is_none_or(|m| m.len() == n)
    }
}

/// `v` compared in f64: above `hi` gives `hi_t`, else below `lo` gives `lo_t`.
/// Selects, not branches, so row loops vectorise.
#[inline(always)]
fn clip_to<U: Float>(v: U, hi: f64, lo: f64, hi_t: U, lo_t: U) -> U {
    let f = v.to_f64();
    let below = if f < lo { lo_t } else { v };
    if f > hi {
        hi_t
    } else {
        below
    }
}

/// Calls `f(row, out_row)` for every row of a dense `out` with `n_cols`
/// columns, in parallel row blocks.
fn for_each_out_row<U: Send>(n_cols: usize, out: &mut [U], f: impl Fn(usize, &mut [U]) + Sync) {
    if n_cols == 0 {
        return;
    }
    let rows_per_chunk = dense_rows_per_chunk(n_cols);
    let tasks = out.chunks_mut(rows_per_chunk * n_cols).enumerate();
    for_each_in_waves(tasks, |(chunk, part)| {
        for (i, row) in part.chunks_exact_mut(n_cols).enumerate() {
            f(chunk * rows_per_chunk + i, row);
        }
    });
}

/// CSR (dtype T) to a dense f64 `out` of `n_rows * n_cols` values, centred (the
/// caller passes `mean`: upstream only densifies when centring) and scaled.
///
/// Every row starts as the image of an all-zero row (one template, copied), then
/// the stored columns are overwritten: their values are first added up in T onto
/// 0.0 in index order (scipy's `todense`), so duplicates and -0.0 come out as
/// upstream's.
pub fn csr_to_dense<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_cols: usize,
    t: Transform<'_>,
    out: &mut [f64],
) {
    let nnz = data.len().min(indices.len());
    let zero = T::from_f64(0.0);
    let template: Vec<f64> = if t.per_row {
        vec![]
    } else {
        (0..n_cols)
            .map(|c| t.sparse_value(zero, t.gene(c)))
            .collect()
    };
    if n_cols == 0 {
        return;
    }
    let rows_per_chunk = dense_rows_per_chunk(n_cols);
    let tasks = out.chunks_mut(rows_per_chunk * n_cols).enumerate();
    for_each_in_waves(tasks, |(chunk, part)| {
        // The row densified in T; kept all zero between rows.
        let mut dense = vec![zero; n_cols];
        for (i, row) in part.chunks_exact_mut(n_cols).enumerate() {
            let r = chunk * rows_per_chunk + i;
            let row_gene = t.gene(r);
            if t.per_row {
                row.fill(t.sparse_value(zero, row_gene));
            } else {
                row.copy_from_slice(&template);
            }
            let stored = row_range(indptr, r, nnz);
            let columns = || {
                indices[stored.clone()]
                    .iter()
                    .filter_map(|c| c.to_usize())
                    .filter(|&c| c < n_cols)
            };
            for (c, &v) in indices[stored.clone()].iter().zip(&data[stored.clone()]) {
                if let Some(c) = c.to_usize().filter(|&c| c < n_cols) {
                    dense[c] = T::from_f64(dense[c].to_f64() + v.to_f64());
                }
            }
            for c in columns() {
                let g = if t.per_row { row_gene } else { t.gene(c) };
                row[c] = t.sparse_value(dense[c], g);
            }
            for c in columns() {
                dense[c] = zero;
            }
        }
    });
}

/// One dense row, transformed from `values` into `row` (the same buffer for
/// the in-place variant, passed as `None`).
///
/// The loop is compiled for AVX-512 and AVX2 as well and picked at run time:
/// wider lanes run the same IEEE operations on each element (Rust never fuses
/// or reorders floating-point operations), so the bits do not change.
#[inline]
fn dense_row<T: Float>(t: &Transform<'_>, r: usize, values: Option<&[T]>, row: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { dense_row_avx512(t, r, values, row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { dense_row_avx2(t, r, values, row) };
        }
    }
    dense_row_body(t, r, values, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dense_row_avx512<T: Float>(
    t: &Transform<'_>,
    r: usize,
    values: Option<&[T]>,
    row: &mut [T],
) {
    dense_row_body(t, r, values, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dense_row_avx2<T: Float>(
    t: &Transform<'_>,
    r: usize,
    values: Option<&[T]>,
    row: &mut [T],
) {
    dense_row_body(t, r, values, row)
}

#[inline(always)]
fn dense_row_body<T: Float>(t: &Transform<'_>, r: usize, values: Option<&[T]>, row: &mut [T]) {
    let (hi, lo) = t.bounds();
    let (hi_t, lo_t) = (T::from_f64(hi), T::from_f64(lo));
    let one = |v: T, m: Option<f64>, s: f64| -> T {
        let centred = match m {
            Some(m) => T::from_f64(v.to_f64() - m),
            None => v,
        };
        clip_to(T::from_f64(centred.to_f64() / s), hi, lo, hi_t, lo_t)
    };
    if t.per_row {
        let g = t.gene(r);
        match values {
            Some(values) => {
                for (o, &v) in row.iter_mut().zip(values) {
                    *o = one(v, g.mean, g.std);
                }
            }
            None => {
                for o in row.iter_mut() {
                    *o = one(*o, g.mean, g.std);
                }
            }
        }
        return;
    }
    // Per column: the statistics zipped in (lengths checked by the caller), and
    // the centring decided once per row, so the loops are branch-free.
    if let Some(values) = values {
        row.copy_from_slice(values);
    }
    match t.mean {
        Some(mean) => {
            for (o, (&m, &s)) in row.iter_mut().zip(mean.iter().zip(t.std)) {
                let centred = T::from_f64(o.to_f64() - m);
                *o = clip_to(T::from_f64(centred.to_f64() / s), hi, lo, hi_t, lo_t);
            }
        }
        None => {
            for (o, &s) in row.iter_mut().zip(t.std) {
                *o = clip_to(T::from_f64(o.to_f64() / s), hi, lo, hi_t, lo_t);
            }
        }
    }
}

/// Dense (dtype T, C-contiguous) to `out` of the same shape and dtype. With
/// `selected`, only those rows are transformed and the others copied.
pub fn dense_to_dense<T: Float>(
    data: &[T],
    n_cols: usize,
    t: Transform<'_>,
    selected: Option<&[bool]>,
    out: &mut [T],
) {
    for_each_out_row(n_cols, out, |r, row| {
        let start = r * n_cols;
        let Some(values) = data.get(start..start + n_cols) else {
            return;
        };
        if selected.is_some_and(|s| !s.get(r).copied().unwrap_or(false)) {
            row.copy_from_slice(values);
            return;
        }
        dense_row(&t, r, Some(values), row);
    });
}

/// Dense, in place. With `selected`, only those rows.
pub fn dense_in_place<T: Float>(
    data: &mut [T],
    n_cols: usize,
    t: Transform<'_>,
    selected: Option<&[bool]>,
) {
    for_each_out_row(n_cols, data, |r, row| {
        if selected.is_some_and(|s| !s.get(r).copied().unwrap_or(false)) {
            return;
        }
        dense_row(&t, r, None, row);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads, Lcg};

    fn bits<U: Float>(v: &[U]) -> Vec<u64> {
        v.iter().map(|x| x.to_f64().to_bits()).collect()
    }

    fn stats(n_cols: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = Lcg(seed);
        let mean = (0..n_cols).map(|_| rng.unit() * 5.0 - 1.0).collect();
        let std = (0..n_cols)
            .map(|c| {
                if c % 5 == 0 {
                    1.0
                } else {
                    rng.unit() * 3.0 + 0.01
                }
            })
            .collect();
        (mean, std)
    }

    fn clip_ref(v: f64, max: Option<f64>, centre: bool) -> f64 {
        match max {
            Some(m) if v > m => m,
            Some(m) if centre && v < -m => -m,
            _ => v,
        }
    }

    #[test]
    fn csr_matches_densify_then_numpy_order() {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(700 + seed as u64, n_rows, n_cols, density);
            let data: Vec<f32> = m.data.iter().map(|&v| (v * 0.3) as f32).collect();
            let (mean, std) = stats(n_cols, seed as u64);
            for max in [None, Some(2.5)] {
                let mut dense = vec![0.0f32; n_rows * n_cols];
                for r in 0..n_rows {
                    for j in m.indptr[r] as usize..m.indptr[r + 1] as usize {
                        dense[r * n_cols + m.indices[j] as usize] += data[j];
                    }
                }
                let want: Vec<f64> = dense
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let c = i % n_cols.max(1);
                        clip_ref((v as f64 - mean[c]) / std[c], max, true)
                    })
                    .collect();
                let t = Transform {
                    mean: Some(&mean),
                    std: &std,
                    per_row: false,
                    max_value: max,
                };
                for threads in [1, 2, 3] {
                    let mut out = vec![-7.0f64; n_rows * n_cols];
                    with_threads(threads, || {
                        csr_to_dense(&m.indptr, &m.indices, &data, n_cols, t, &mut out)
                    });
                    assert_eq!(bits(&out), bits(&want), "{n_rows}x{n_cols} t={threads}");
                }
            }
        }
    }

    #[test]
    fn csr_duplicates_add_in_data_dtype() {
        // Two entries of column 1 in row 0: added in f32 first.
        let indptr = [0i64, 3];
        let indices = [1i32, 1, 0];
        let data = [16_777_216.0f32, 1.0, -0.0];
        let mean = [0.0, 0.0];
        let std = [1.0, 1.0];
        let mut out = [9.0f64; 2];
        let t = Transform {
            mean: Some(&mean),
            std: &std,
            per_row: false,
            max_value: None,
        };
        csr_to_dense(&indptr, &indices, &data, 2, t, &mut out);
        assert_eq!(out[1], (16_777_216.0f32 + 1.0f32) as f64);
        assert_eq!(out[0].to_bits(), 0.0f64.to_bits());
    }

    fn dense_reference_f32(
        data: &[f32],
        n_cols: usize,
        mean: Option<&[f64]>,
        std: &[f64],
        max: Option<f64>,
    ) -> Vec<f32> {
        data.iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = i % n_cols;
                let v = match mean {
                    Some(m) => (v as f64 - m[c]) as f32,
                    None => v,
                };
                let v = (v as f64 / std[c]) as f32;
                clip_ref(v as f64, max, mean.is_some()) as f32
            })
            .collect()
    }

    #[test]
    fn dense_double_rounding_and_selection() {
        let mut rng = Lcg(3);
        for &(n_rows, n_cols) in &[(0usize, 3usize), (1, 1), (7, 5), (400, 33)] {
            let data: Vec<f32> = (0..n_rows * n_cols)
                .map(|i| {
                    if i % 3 == 0 {
                        0.0
                    } else {
                        (rng.unit() * 9.0) as f32
                    }
                })
                .collect();
            let (mean, std) = stats(n_cols, 11);
            let selected: Vec<bool> = (0..n_rows).map(|r| r % 4 != 2).collect();
            for centre in [false, true] {
                for max in [None, Some(0.7), Some(f64::NAN)] {
                    let m = centre.then_some(&mean[..]);
                    let full = dense_reference_f32(&data, n_cols.max(1), m, &std, max);
                    let want_sel: Vec<f32> = full
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| if selected[i / n_cols] { v } else { data[i] })
                        .collect();
                    let t = Transform {
                        mean: m,
                        std: &std,
                        per_row: false,
                        max_value: max,
                    };
                    for threads in [1, 2] {
                        let mut out = vec![5.0f32; data.len()];
                        with_threads(threads, || dense_to_dense(&data, n_cols, t, None, &mut out));
                        assert_eq!(bits(&out), bits(&full));
                        let mut out = vec![5.0f32; data.len()];
                        with_threads(threads, || {
                            dense_to_dense(&data, n_cols, t, Some(&selected), &mut out)
                        });
                        assert_eq!(bits(&out), bits(&want_sel));
                        let mut inplace = data.clone();
                        with_threads(threads, || {
                            dense_in_place(&mut inplace, n_cols, t, Some(&selected))
                        });
                        assert_eq!(bits(&inplace), bits(&want_sel));
                        let mut inplace = data.clone();
                        with_threads(threads, || dense_in_place(&mut inplace, n_cols, t, None));
                        assert_eq!(bits(&inplace), bits(&full));
                    }
                }
            }
        }
    }

    #[test]
    fn bad_indices_never_panic() {
        let mean = [0.0, 0.0];
        let std = [1.0, 1.0];
        for per_row in [false, true] {
            let t = Transform {
                mean: Some(&mean),
                std: &std,
                per_row,
                max_value: Some(1.0),
            };
            let mut out = [0.0f64; 4];
            csr_to_dense(
                &[0i64, 9, -3],
                &[5i32, -1, 0],
                &[1.0f32, 2.0, 3.0],
                2,
                t,
                &mut out,
            );
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn per_row_statistics_give_the_transposed_result() {
        // A CSC matrix's transpose (genes x cells) with per-row statistics gives
        // the transpose of the CSR result with per-column statistics.
        let m = random_csr(77, 30, 12, 0.3);
        let data: Vec<f32> = m.data.iter().map(|&v| v as f32).collect();
        let (mean, std) = stats(12, 5);
        let t = Transform {
            mean: Some(&mean),
            std: &std,
            per_row: false,
            max_value: Some(1.5),
        };
        let mut by_col = vec![0.0f64; 30 * 12];
        csr_to_dense(&m.indptr, &m.indices, &data, 12, t, &mut by_col);
        // Transpose the CSR (12 x 30), stable in row order.
        let mut indptr = vec![0i64; 13];
        for &c in &m.indices {
            indptr[c as usize + 1] += 1;
        }
        for g in 0..12 {
            indptr[g + 1] += indptr[g];
        }
        let mut next = indptr.clone();
        let mut indices = vec![0i32; data.len()];
        let mut tdata = vec![0.0f32; data.len()];
        for r in 0..30 {
            for j in m.indptr[r] as usize..m.indptr[r + 1] as usize {
                let g = m.indices[j] as usize;
                let at = next[g] as usize;
                indices[at] = r as i32;
                tdata[at] = data[j];
                next[g] += 1;
            }
        }
        let t = Transform { per_row: true, ..t };
        for threads in [1, 2] {
            let mut by_row = vec![0.0f64; 12 * 30];
            with_threads(threads, || {
                csr_to_dense(&indptr, &indices, &tdata, 30, t, &mut by_row)
            });
            for r in 0..30 {
                for g in 0..12 {
                    assert_eq!(by_row[g * 30 + r].to_bits(), by_col[r * 12 + g].to_bits());
                }
            }
            let dense32: Vec<f32> = (0..12 * 30).map(|i| (i % 7) as f32 * 0.5).collect();
            let mut a = vec![0.0f32; dense32.len()];
            with_threads(threads, || dense_to_dense(&dense32, 30, t, None, &mut a));
            let mut b = dense32.clone();
            with_threads(threads, || dense_in_place(&mut b, 30, t, None));
            assert_eq!(bits(&a), bits(&b));
            for g in 0..12 {
                for r in 0..30 {
                    let v = dense32[g * 30 + r];
                    let c = ((v as f64 - mean[g]) as f32 as f64 / std[g]) as f32;
                    assert_eq!(a[g * 30 + r], clip_ref(c as f64, Some(1.5), true) as f32);
                }
            }
        }
    }
}
