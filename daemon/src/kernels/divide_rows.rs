//! Divides every stored value of row `i` by `factors[i]`: step 2 of scanpy's
//! `normalize_total`, which calls `np.true_divide(x.data, np.repeat(factors, ...))`
//! for CSR and `np.true_divide(x, factors[:, None], out=x)` for dense data.
//!
//! numpy's type promotion decides the arithmetic: the division runs in f32 only
//! when the data and the factors are both float32, otherwise in f64 (an f32 operand
//! widened exactly), and the quotient is then cast to the output's dtype. Division
//! is correctly rounded in IEEE arithmetic, so this matches numpy's SIMD loops bit
//! for bit.

use super::{
    dense_rows_per_chunk, for_each_in_waves, row_chunks, row_range, split_at_offsets_mut, Float,
    SparseIndex,
};

/// One quotient with numpy's promotion. `factor` is a value of the factors' dtype
/// widened to f64 (so the cast back to f32 below is exact when `factors_are_f32`).
#[inline]
fn quotient<T: Float, U: Float>(v: T, factor: f64, factors_are_f32: bool) -> U {
    if T::IS_F32 && factors_are_f32 {
        U::from_f32(v.to_f32() / factor as f32)
    } else {
        U::from_f64(v.to_f64() / factor)
    }
}

/// CSR: `out[j] = data[j] / factors[row of j]` for every stored value `j`.
/// `out` must have `data.len()` elements (the caller checks).
pub fn csr_divide_rows<T: Float, U: Float, P: SparseIndex>(
    indptr: &[P],
    data: &[T],
    factors: &[f64],
    factors_are_f32: bool,
    out: &mut [U],
) {
    for_each_csr_row_mut(indptr, factors.len(), out, |row, offset, out_row| {
        let Some(&factor) = factors.get(row) else {
            return;
        };
        let Some(values) = data.get(offset..offset + out_row.len()) else {
            return;
        };
        for (o, &v) in out_row.iter_mut().zip(values) {
            *o = quotient(v, factor, factors_are_f32);
        }
    });
}

/// CSR, in place: `data[j] /= factors[row of j]` (the output is the data array).
pub fn csr_divide_rows_in_place<T: Float, P: SparseIndex>(
    indptr: &[P],
    data: &mut [T],
    factors: &[f64],
    factors_are_f32: bool,
) {
    for_each_csr_row_mut(indptr, factors.len(), data, |row, _, values| {
        let Some(&factor) = factors.get(row) else {
            return;
        };
        for v in values.iter_mut() {
            *v = quotient(*v, factor, factors_are_f32);
        }
    });
}

/// Dense, C-contiguous with `n_cols` columns: `out[i, :] = data[i, :] / factors[i]`.
/// `out` must have `data.len()` elements (the caller checks).
pub fn dense_divide_rows<T: Float, U: Float>(
    data: &[T],
    n_cols: usize,
    factors: &[f64],
    factors_are_f32: bool,
    out: &mut [U],
) {
    for_each_dense_row_mut(n_cols, out, |row, out_row| {
        let Some(&factor) = factors.get(row) else {
            return;
        };
        let start = row * n_cols;
        let Some(values) = data.get(start..start + out_row.len()) else {
            return;
        };
        for (o, &v) in out_row.iter_mut().zip(values) {
            *o = quotient(v, factor, factors_are_f32);
        }
    });
}

/// Dense, in place.
pub fn dense_divide_rows_in_place<T: Float>(
    data: &mut [T],
    n_cols: usize,
    factors: &[f64],
    factors_are_f32: bool,
) {
    for_each_dense_row_mut(n_cols, data, |row, values| {
        let Some(&factor) = factors.get(row) else {
            return;
        };
        for v in values.iter_mut() {
            *v = quotient(*v, factor, factors_are_f32);
        }
    });
}

/// Calls `f(row, offset, &mut values[offset..end])` for every CSR row in parallel,
/// where `offset..end` is the row's stored-value range. Chunks of rows own disjoint
/// parts of `values`; a row whose range falls outside its chunk's part (only
/// possible if indptr changed after validation) is skipped rather than trusted.
fn for_each_csr_row_mut<U: Send>(
    indptr: &[impl SparseIndex],
    n_rows: usize,
    values: &mut [U],
    f: impl Fn(usize, usize, &mut [U]) + Sync,
) {
    let nnz = values.len();
    let chunks = row_chunks(indptr, n_rows, nnz);
    // Each chunk's part ends where its last row ends; kept non-decreasing so the
    // parts tile `values` even if indptr is inconsistent.
    let mut ends = Vec::with_capacity(chunks.len());
    let mut last_end = 0;
    for rows in &chunks {
        last_end = row_range(indptr, rows.end - 1, nnz).end.max(last_end);
        ends.push(last_end);
    }
    let starts: Vec<usize> = std::iter::once(0).chain(ends.iter().copied()).collect();
    let parts = split_at_offsets_mut(values, ends);
    let tasks = chunks.into_iter().zip(parts).zip(starts);
    for_each_in_waves(tasks, |((rows, part), part_start)| {
        for row in rows {
            let range = row_range(indptr, row, nnz);
            let (Some(lo), Some(hi)) = (
                range.start.checked_sub(part_start),
                range.end.checked_sub(part_start),
            ) else {
                continue;
            };
            if let Some(row_values) = part.get_mut(lo..hi) {
                f(row, range.start, row_values);
            }
        }
    });
}

/// Calls `f(row, &mut values[row * n_cols..][..n_cols])` for every dense row in
/// parallel. A trailing partial row (impossible after validation) is skipped.
fn for_each_dense_row_mut<U: Send>(
    n_cols: usize,
    values: &mut [U],
    f: impl Fn(usize, &mut [U]) + Sync,
) {
    if n_cols == 0 {
        return;
    }
    let rows_per_chunk = dense_rows_per_chunk(n_cols);
    let tasks = values.chunks_mut(rows_per_chunk * n_cols).enumerate();
    for_each_in_waves(tasks, |(chunk, part)| {
        for (i, row_values) in part.chunks_exact_mut(n_cols).enumerate() {
            f(chunk * rows_per_chunk + i, row_values);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, shapes, with_threads, Lcg};

    /// Factors as upstream produces them: row sums / target, zeros replaced by 1,
    /// rounded to the factors' dtype; a few awkward values mixed in.
    fn factors(n_rows: usize, seed: u64, as_f32: bool) -> Vec<f64> {
        let mut rng = Lcg(seed);
        (0..n_rows)
            .map(|r| {
                let f = match r % 5 {
                    0 => 1.0,
                    1 => 3.0,
                    _ => rng.unit() * 7.0 + 1e-3,
                };
                if as_f32 {
                    f as f32 as f64
                } else {
                    f
                }
            })
            .collect()
    }

    /// Reference: the plain loop, with numpy's promotion spelled out per case.
    fn reference<T: Float, U: Float>(
        row_of: &[usize],
        data: &[T],
        factors: &[f64],
        factors_are_f32: bool,
    ) -> Vec<U> {
        data.iter()
            .zip(row_of)
            .map(|(&v, &r)| {
                if T::IS_F32 && factors_are_f32 {
                    U::from_f32(v.to_f32() / (factors[r] as f32))
                } else {
                    U::from_f64(v.to_f64() / factors[r])
                }
            })
            .collect()
    }

    /// The row of every stored value.
    fn row_of(indptr: &[i64]) -> Vec<usize> {
        indptr
            .windows(2)
            .enumerate()
            .flat_map(|(r, w)| std::iter::repeat_n(r, (w[1] - w[0]) as usize))
            .collect()
    }

    fn bits<U: Float>(v: &[U]) -> Vec<u64> {
        v.iter().map(|x| x.to_f64().to_bits()).collect()
    }

    fn check_csr<T: Float, U: Float>(to_t: impl Fn(f64) -> T) {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(200 + seed as u64, n_rows, n_cols, density);
            let data: Vec<T> = m.data.iter().map(|&v| to_t(v)).collect();
            let row_of = row_of(&m.indptr);
            for factors_are_f32 in [false, true] {
                let f = factors(n_rows, seed as u64, factors_are_f32);
                let expected: Vec<U> = reference(&row_of, &data, &f, factors_are_f32);
                for threads in [1, 2] {
                    let mut out = vec![U::from_f64(-1.0); data.len()];
                    with_threads(threads, || {
                        csr_divide_rows(&m.indptr, &data, &f, factors_are_f32, &mut out)
                    });
                    assert_eq!(bits(&out), bits(&expected), "{n_rows}x{n_cols} t={threads}");
                }
            }
        }
    }

    fn check_csr_in_place<T: Float>(to_t: impl Fn(f64) -> T) {
        for (seed, &(n_rows, n_cols, density)) in shapes().iter().enumerate() {
            let m = random_csr(300 + seed as u64, n_rows, n_cols, density);
            let data: Vec<T> = m.data.iter().map(|&v| to_t(v)).collect();
            let row_of = row_of(&m.indptr);
            for factors_are_f32 in [false, true] {
                let f = factors(n_rows, seed as u64, factors_are_f32);
                let expected: Vec<T> = reference(&row_of, &data, &f, factors_are_f32);
                for threads in [1, 2] {
                    let mut values = data.clone();
                    with_threads(threads, || {
                        csr_divide_rows_in_place(&m.indptr, &mut values, &f, factors_are_f32)
                    });
                    assert_eq!(bits(&values), bits(&expected));
                }
            }
        }
    }

    fn check_dense<T: Float, U: Float>(to_t: impl Fn(f64) -> T) {
        for (seed, &(n_rows, n_cols, _)) in shapes().iter().enumerate() {
            let mut rng = Lcg(400 + seed as u64);
            let data: Vec<T> = (0..n_rows * n_cols)
                .map(|i| to_t(if i % 4 == 0 { 0.0 } else { rng.unit() * 50.0 }))
                .collect();
            let row_of: Vec<usize> = (0..n_rows * n_cols).map(|i| i / n_cols.max(1)).collect();
            for factors_are_f32 in [false, true] {
                let f = factors(n_rows, seed as u64, factors_are_f32);
                let expected: Vec<U> = reference(&row_of, &data, &f, factors_are_f32);
                let expected_in_place: Vec<T> = reference(&row_of, &data, &f, factors_are_f32);
                for threads in [1, 2] {
                    let mut out = vec![U::from_f64(-1.0); data.len()];
                    with_threads(threads, || {
                        dense_divide_rows(&data, n_cols, &f, factors_are_f32, &mut out)
                    });
                    assert_eq!(bits(&out), bits(&expected));
                    let mut values = data.clone();
                    with_threads(threads, || {
                        dense_divide_rows_in_place(&mut values, n_cols, &f, factors_are_f32)
                    });
                    assert_eq!(bits(&values), bits(&expected_in_place));
                }
            }
        }
    }

    #[test]
    fn csr_all_dtype_combinations() {
        check_csr::<f32, f32>(|v| v as f32);
        check_csr::<f32, f64>(|v| v as f32);
        check_csr::<f64, f32>(|v| v);
        check_csr::<f64, f64>(|v| v);
    }

    #[test]
    fn csr_in_place() {
        check_csr_in_place::<f32>(|v| v as f32);
        check_csr_in_place::<f64>(|v| v);
    }

    #[test]
    fn dense_all_dtype_combinations() {
        check_dense::<f32, f32>(|v| v as f32);
        check_dense::<f32, f64>(|v| v as f32);
        check_dense::<f64, f32>(|v| v);
        check_dense::<f64, f64>(|v| v);
    }

    #[test]
    fn f32_by_f32_divides_in_f32() {
        // 1/3 in f32 directly versus rounding the f64 quotient: identical here, but
        // with f64 factors the quotient of an f32 value is an f64 one.
        let data = [1.0f32];
        let mut out = [0.0f64];
        csr_divide_rows(&[0i32, 1], &data, &[3.0], true, &mut out);
        assert_eq!(out[0], (1.0f32 / 3.0f32) as f64);
        csr_divide_rows(&[0i32, 1], &data, &[3.0], false, &mut out);
        assert_eq!(out[0], 1.0f64 / 3.0);
    }

    #[test]
    fn inconsistent_indptr_never_panics() {
        let indptr = [0i64, 5, 2, 99, -1];
        let data = [1.0f64, 2.0, 3.0];
        let mut out = [0.0f64; 3];
        csr_divide_rows(&indptr, &data, &[1.0, 2.0, 3.0, 4.0], false, &mut out);
        let mut values = data;
        csr_divide_rows_in_place(&indptr, &mut values, &[1.0, 2.0, 3.0, 4.0], false);
    }
}
