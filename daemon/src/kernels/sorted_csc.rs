//! A per-gene structure for rank statistics: the matrix's stored non-zeros by
//! column, in row order (values and row ids) and, separately, the row ids in
//! value order with every tie block's first entry flagged.
//!
//! Built once per matrix (the daemon caches it by content) and shared by every
//! Wilcoxon request on that matrix, whatever the grouping.
//!
//! Zeros are never stored (upstream eliminates explicit zeros before ranking; a
//! zero here is skipped). NaN, and a row stored twice in one column, make the
//! build fail: upstream's results for those depend on details we do not
//! reproduce, so the shim runs upstream.

use super::{row_range, Float, SparseIndex};
use rayon::prelude::*;

/// Set on the value-order entry that starts a tie block.
pub const TIE_START: u32 = 1 << 31;
/// Largest row count (row ids share their u32 with [`TIE_START`]).
pub const MAX_ROWS: usize = (TIE_START - 1) as usize;

#[derive(Debug)]
pub struct SortedCsc<T> {
    pub n_rows: usize,
    pub n_cols: usize,
    /// Column `c`'s entries are `colptr[c]..colptr[c + 1]` in every array below.
    pub colptr: Vec<usize>,
    /// Row ids in increasing order within each column.
    pub rows: Vec<u32>,
    /// Values, in the order of `rows`.
    pub vals: Vec<T>,
    /// Row ids in increasing order of value, `TIE_START` on each tie block's first.
    pub by_value: Vec<u32>,
    /// Negative values per column (they come first in value order, before the zeros).
    pub n_neg: Vec<u32>,
    /// Per column: every sum of a subset of its values, and every difference of
    /// two such sums, is exact in f64, so such sums do not depend on the order of
    /// the additions (all values are multiples of one power of two, and the sum of
    /// their magnitudes is below 2^53 of it).
    pub exact: Vec<bool>,
    /// Every value read (stored values of a CSR matrix, every element of a dense
    /// one) is a finite integer without a sign bit: upstream's
    /// `check_nonnegative_integers` on the same matrix.
    pub nonneg_integers: bool,
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildError {
    TooManyRows(usize),
    NotANumber {
        row: usize,
    },
    DuplicateEntry {
        row: usize,
        col: usize,
    },
    /// Column index out of range, or the arrays changed while being read.
    Malformed(String),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::TooManyRows(n) => write!(f, "{n} rows exceed the supported {MAX_ROWS}"),
            BuildError::NotANumber { row } => write!(f, "NaN in row {row}"),
            BuildError::DuplicateEntry { row, col } => {
                write!(f, "row {row} stores column {col} more than once")
            }
            BuildError::Malformed(m) => write!(f, "{m}"),
        }
    }
}

impl<T: Float> SortedCsc<T> {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.colptr.len() * 8
            + self.rows.len() * 4
            + self.vals.len() * std::mem::size_of::<T>()
            + self.by_value.len() * 4
            + self.n_neg.len() * 4
            + self.exact.len()
    }

    pub fn nnz(&self) -> usize {
        self.rows.len()
    }
}

/// A source of rows: `for_row(r, f)` calls `f(col, value)` for each stored value of
/// row `r` in storage order.
trait Rows<T>: Sync {
    fn n_rows(&self) -> usize;
    fn for_row(&self, r: usize, f: impl FnMut(usize, T));
}

struct CsrRows<'a, T, P, I> {
    indptr: &'a [P],
    indices: &'a [I],
    data: &'a [T],
    n_rows: usize,
}

impl<T: Float, P: SparseIndex, I: SparseIndex> Rows<T> for CsrRows<'_, T, P, I> {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn for_row(&self, r: usize, mut f: impl FnMut(usize, T)) {
        let nnz = self.data.len().min(self.indices.len());
        for j in row_range(self.indptr, r, nnz) {
            // A negative index maps to usize::MAX, which every caller rejects.
            f(
                self.indices[j].to_usize().unwrap_or(usize::MAX),
                self.data[j],
            );
        }
    }
}

struct DenseRows<'a, T> {
    data: &'a [T],
    n_rows: usize,
    n_cols: usize,
}

impl<T: Float> Rows<T> for DenseRows<'_, T> {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn for_row(&self, r: usize, mut f: impl FnMut(usize, T)) {
        let row = &self.data[r * self.n_cols..(r + 1) * self.n_cols];
        for (c, &v) in row.iter().enumerate() {
            f(c, v);
        }
    }
}

/// From a CSR matrix whose indptr has been validated (column indices are checked here).
pub fn from_csr<T: Float, P: SparseIndex, I: SparseIndex>(
    indptr: &[P],
    indices: &[I],
    data: &[T],
    n_rows: usize,
    n_cols: usize,
) -> Result<SortedCsc<T>, BuildError> {
    build(
        &CsrRows {
            indptr,
            indices,
            data,
            n_rows,
        },
        n_cols,
    )
}

/// From a C-contiguous dense matrix of `n_rows * n_cols` values.
pub fn from_dense<T: Float>(
    data: &[T],
    n_rows: usize,
    n_cols: usize,
) -> Result<SortedCsc<T>, BuildError> {
    if n_rows.checked_mul(n_cols) != Some(data.len()) {
        return Err(BuildError::Malformed(
            "dense shape does not match its data".into(),
        ));
    }
    build(
        &DenseRows {
            data,
            n_rows,
            n_cols,
        },
        n_cols,
    )
}

/// Raw pointer that parallel tasks write through at disjoint positions.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

fn is_zero<T: Float>(v: T) -> bool {
    v.to_f64() == 0.0
}

fn build<T: Float>(src: &impl Rows<T>, n_cols: usize) -> Result<SortedCsc<T>, BuildError> {
    let n_rows = src.n_rows();
    if n_rows > MAX_ROWS {
        return Err(BuildError::TooManyRows(n_rows));
    }
    // Rows are cut into bands; each band counts its values per column, so every
    // band knows where its entries go and all bands fill in parallel. Positions
    // depend only on row order, never on the banding.
    let n_bands = n_rows.clamp(1, 32);
    let band = |b: usize| (b * n_rows / n_bands)..((b + 1) * n_rows / n_bands);
    let counts: Vec<Result<(Vec<usize>, bool), BuildError>> = (0..n_bands)
        .into_par_iter()
        .map(|b| {
            let mut counts = vec![0usize; n_cols];
            let mut integers = true;
            let mut bad = None;
            for r in band(b) {
                src.for_row(r, |c, v| {
                    let f = v.to_f64();
                    integers &= f.is_finite() && !f.is_sign_negative() && f.fract() == 0.0;
                    if f.is_nan() {
                        bad.get_or_insert(BuildError::NotANumber { row: r });
                    } else if c >= n_cols {
                        bad.get_or_insert(BuildError::Malformed(format!(
                            "column index out of range in row {r}"
                        )));
                    } else if !is_zero(v) {
                        counts[c] += 1;
                    }
                });
            }
            bad.map_or(Ok((counts, integers)), Err)
        })
        .collect();
    let counts: Vec<(Vec<usize>, bool)> = counts.into_iter().collect::<Result<_, _>>()?;
    let nonneg_integers = counts.iter().all(|(_, i)| *i);
    let counts: Vec<Vec<usize>> = counts.into_iter().map(|(c, _)| c).collect();
    let mut colptr = vec![0usize; n_cols + 1];
    for c in 0..n_cols {
        colptr[c + 1] = colptr[c] + counts.iter().map(|k| k[c]).sum::<usize>();
    }
    let nnz = colptr[n_cols];
    // cursor[b][c] = (next, end): where band b's entries of column c go.
    let mut cursors = vec![vec![(0usize, 0usize); n_cols]; n_bands];
    for c in 0..n_cols {
        let mut at = colptr[c];
        for b in 0..n_bands {
            cursors[b][c] = (at, at + counts[b][c]);
            at += counts[b][c];
        }
    }
    let mut rows = vec![0u32; nnz];
    let mut vals = vec![T::from_f64(0.0); nnz];
    huge_pages(&mut rows);
    huge_pages(&mut vals);
    let (rows_at, vals_at) = (SharedMut(rows.as_mut_ptr()), SharedMut(vals.as_mut_ptr()));
    let filled: Vec<bool> = cursors
        .into_par_iter()
        .enumerate()
        .map(|(b, mut cursor)| {
            let (rows_at, vals_at) = (rows_at, vals_at);
            let mut ok = true;
            for r in band(b) {
                src.for_row(r, |c, v| {
                    if c >= n_cols || is_zero(v) || v.to_f64().is_nan() {
                        return;
                    }
                    let (next, end) = &mut cursor[c];
                    // The count pass bounds each band's share of each column; data
                    // rewritten meanwhile by the client must not write outside it.
                    if *next >= *end {
                        ok = false;
                        return;
                    }
                    // SAFETY: `next` lies in band b's own range of column c (checked
                    // above), which no other band writes; both vectors hold nnz items.
                    unsafe {
                        *rows_at.0.add(*next) = r as u32;
                        *vals_at.0.add(*next) = v;
                    }
                    *next += 1;
                });
            }
            ok && cursor.iter().all(|(next, end)| next == end)
        })
        .collect();
    if filled.contains(&false) {
        return Err(BuildError::Malformed(
            "the matrix changed while it was read".into(),
        ));
    }

    let mut by_value = vec![0u32; nnz];
    huge_pages(&mut by_value);
    let mut n_neg = vec![0u32; n_cols];
    let mut exact = vec![false; n_cols];
    let per_col: Vec<(&mut [u32], (&mut u32, &mut bool))> = {
        let pieces = super::split_at_offsets_mut(&mut by_value, colptr[1..].iter().copied());
        pieces
            .into_iter()
            .zip(n_neg.iter_mut().zip(exact.iter_mut()))
            .collect()
    };
    let dup: Vec<Option<BuildError>> = per_col
        .into_par_iter()
        .enumerate()
        .with_min_len(64)
        .map_init(
            Vec::new,
            |scratch: &mut Vec<(u64, u32)>, (c, (out, (neg, ex)))| {
                let range = colptr[c]..colptr[c + 1];
                let (rs, vs) = (&rows[range.clone()], &vals[range]);
                if let Some(w) = rs.windows(2).position(|w| w[0] >= w[1]) {
                    return Some(BuildError::DuplicateEntry {
                        row: rs[w + 1] as usize,
                        col: c,
                    });
                }
                // Sorting plain integers: an order-preserving map of the value's bits,
                // then the row (for f32 both fit one u64).
                scratch.clear();
                if T::IS_F32 {
                    let mut keys: Vec<u64> = vs
                        .iter()
                        .zip(rs)
                        .map(|(&v, &r)| ((order_key32(v.to_f32()) as u64) << 32) | r as u64)
                        .collect();
                    keys.sort_unstable();
                    scratch.extend(keys.iter().map(|&k| (k >> 32 << 32, k as u32)));
                } else {
                    scratch.extend(vs.iter().zip(rs).map(|(&v, &r)| (order_key(v.to_f64()), r)));
                    scratch.sort_unstable();
                }
                let mut prev = None;
                for (slot, &(key, r)) in out.iter_mut().zip(scratch.iter()) {
                    *slot = if Some(key) == prev { r } else { r | TIE_START };
                    prev = Some(key);
                }
                *neg = vs.iter().filter(|&&v| v.to_f64() < 0.0).count() as u32;
                *ex = sums_are_exact::<T>(vs);
                None
            },
        )
        .collect();
    if let Some(e) = dup.into_iter().flatten().next() {
        return Err(e);
    }

    Ok(SortedCsc {
        n_rows,
        n_cols,
        colptr,
        rows,
        vals,
        by_value,
        n_neg,
        exact,
        nonneg_integers,
    })
}

/// A u32 whose unsigned order is the numeric order of non-NaN `v`.
fn order_key32(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | (1 << 31)
    }
}

/// A u64 whose unsigned order is the numeric order of non-NaN `v`.
fn order_key(v: f64) -> u64 {
    let bits = v.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// Asks for transparent huge pages behind a large, not yet touched vector: its
/// first touch then takes a fault per 2 MiB instead of per 4 KiB (fresh memory
/// is the build's main cost here), and the column scatter misses the TLB less.
/// Only a hint; nothing changes where the kernel declines.
fn huge_pages<T>(v: &mut [T]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < 4 * HUGE {
        return;
    }
    let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside the vector's own allocation; MADV_HUGEPAGE
        // changes no contents and no mapping semantics.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Exponent of the lowest set significand bit of a finite non-zero value.
fn lowest_bit_exponent(v: f64) -> i32 {
    let bits = v.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let mant = bits & ((1u64 << 52) - 1);
    let (sig, e) = if exp == 0 {
        (mant, -1074)
    } else {
        (mant | (1u64 << 52), exp - 1075)
    };
    e + sig.trailing_zeros() as i32
}

/// Whether any sum of a subset of `values` (and any difference of two such sums)
/// is exact in f64: all are multiples of 2^q (q the lowest set bit over all
/// values) and their magnitudes add up to less than 2^(53 + q).
fn sums_are_exact<T: Float>(values: &[T]) -> bool {
    let mut q = i32::MAX;
    let mut total = 0.0f64;
    for &v in values {
        let v = v.to_f64();
        if !v.is_finite() {
            return false;
        }
        q = q.min(lowest_bit_exponent(v));
        total += v.abs();
    }
    if values.is_empty() {
        return true;
    }
    // `total` itself carries a relative rounding error below len * 2^-53.
    let bound = total * (1.0 + 1e-6);
    q + 53 <= 1023 && bound < 2f64.powi(q + 53)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{random_csr, with_threads};

    #[test]
    fn csr_and_dense_agree_and_are_sorted() {
        let m = random_csr(3, 200, 30, 0.3);
        let data: Vec<f32> = m.data.iter().map(|&v| (v as f32).round() - 5.0).collect();
        let a = with_threads(2, || {
            from_csr(&m.indptr, &m.indices, &data, 200, 30).unwrap()
        });
        let b = with_threads(1, || {
            from_csr(&m.indptr, &m.indices, &data, 200, 30).unwrap()
        });
        let mut dense = vec![0f32; 200 * 30];
        for r in 0..200 {
            for j in m.indptr[r] as usize..m.indptr[r + 1] as usize {
                dense[r * 30 + m.indices[j] as usize] = data[j];
            }
        }
        let d = from_dense(&dense, 200, 30).unwrap();
        for s in [&b, &d] {
            assert_eq!(a.colptr, s.colptr);
            assert_eq!(a.rows, s.rows);
            assert_eq!(a.vals, s.vals);
            assert_eq!(a.n_neg, s.n_neg);
        }
        for c in 0..30 {
            let col = a.colptr[c]..a.colptr[c + 1];
            assert!(a.rows[col.clone()].windows(2).all(|w| w[0] < w[1]));
            assert!(a.vals[col.clone()].iter().all(|&v| v != 0.0));
            let value_of = |r: u32| dense[(r & !TIE_START) as usize * 30 + c];
            let sorted: Vec<f32> = a.by_value[col.clone()]
                .iter()
                .map(|&r| value_of(r))
                .collect();
            assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
            for (k, &r) in a.by_value[col.clone()].iter().enumerate() {
                let starts = k == 0 || sorted[k] != sorted[k - 1];
                assert_eq!(starts, r & TIE_START != 0);
            }
            assert_eq!(
                a.n_neg[c] as usize,
                sorted.iter().filter(|&&v| v < 0.0).count()
            );
            assert!(a.exact[c], "small integers always add exactly");
        }
        assert!(!a.nonneg_integers, "there are negative values");
        let pos: Vec<f32> = data.iter().map(|v| v.abs()).collect();
        assert!(
            from_csr(&m.indptr, &m.indices, &pos, 200, 30)
                .unwrap()
                .nonneg_integers
        );
        let mut frac = pos.clone();
        frac[0] = 0.5;
        assert!(
            !from_csr(&m.indptr, &m.indices, &frac, 200, 30)
                .unwrap()
                .nonneg_integers
        );
        assert!(!from_dense(&[1.0f64, -0.0], 1, 2).unwrap().nonneg_integers);
    }

    #[test]
    fn rejects_nan_duplicates_and_bad_columns() {
        let indptr = [0i32, 2];
        assert!(matches!(
            from_csr(&indptr, &[0i32, 1], &[1.0f64, f64::NAN], 1, 2),
            Err(BuildError::NotANumber { row: 0 })
        ));
        assert!(matches!(
            from_csr(&indptr, &[1i32, 1], &[1.0f64, 2.0], 1, 2),
            Err(BuildError::DuplicateEntry { row: 0, col: 1 })
        ));
        assert!(from_csr(&indptr, &[0i32, 5], &[1.0f64, 2.0], 1, 2).is_err());
        assert!(from_csr(&indptr, &[0i32, -1], &[1.0f64, 2.0], 1, 2).is_err());
    }

    #[test]
    fn f32_and_f64_sort_every_bit() {
        // Values that differ only in the lowest f32 mantissa bits, and negatives.
        let base = 1.0f32 + f32::EPSILON;
        let data = [base, 1.0, -base, -1.0, base + f32::EPSILON, 3.0e-8, -2.0e30];
        let n = data.len();
        let dense32: Vec<f32> = data.to_vec();
        let dense64: Vec<f64> = data.iter().map(|&v| v as f64).collect();
        let a = from_dense(&dense32, n, 1).unwrap();
        let b = from_dense(&dense64, n, 1).unwrap();
        let order = |m: &[u32]| {
            m.iter()
                .map(|r| (r & !TIE_START) as usize)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&a.by_value), order(&b.by_value));
        let sorted: Vec<f32> = order(&a.by_value).iter().map(|&r| data[r]).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        assert!(a.by_value.iter().all(|r| r & TIE_START != 0));
        assert_eq!(a.n_neg[0], 3);
    }

    #[test]
    fn exactness_flag() {
        assert!(sums_are_exact(&[0.5f64, 0.25, 3.0]));
        assert!(!sums_are_exact(&[1e-30f64, 1.0]));
        assert!(!sums_are_exact(&[0.1f64, 0.2]));
        assert!(sums_are_exact(&[1.0f32 / 3.0, 2.0]));
        assert!(!sums_are_exact(&[f64::INFINITY]));
    }
}
