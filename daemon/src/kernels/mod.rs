//! Numerical kernels: pure functions over slices, no I/O and no protocol types.
//!
//! Every kernel reproduces scanpy 1.11.5's arithmetic in upstream's order, so the
//! results are bit-identical to upstream and identical for every thread count:
//! parallelism only ever splits work between rows (or genes) whose results do not
//! depend on each other.
//!
//! The slices may live in shared memory that the client could rewrite while a kernel
//! runs. The caller validates the structure first; kernels still never index with a
//! value read from the slices without a bounds check, so a misbehaving client gets
//! garbage back, never a crash.

pub mod content_hash;
pub mod divide_rows;
pub mod highly_expressed;
pub mod hvg_batch_welford;
pub mod hvg_clipped_sums;
pub mod hvg_mean_var;
pub mod leiden;
pub mod row_sums;
pub mod scale_apply;
pub mod scale_stats;
pub mod sorted_csc;
pub mod umap_layout;
pub mod wilcoxon;

use rayon::prelude::*;
use std::ops::Range;

/// Floating-point element types of data arrays.
pub trait Float: Copy + Send + Sync + PartialOrd + 'static {
    /// True for f32: numpy divides in f32 only when both operands are f32.
    const IS_F32: bool;
    fn to_f64(self) -> f64;
    /// Rounds to this type the way an `as` cast (and numpy's casting) does.
    fn from_f64(v: f64) -> Self;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `self * self` in this type, widened to f64 (numba and numpy square a
    /// float32 in float32).
    fn square_widened(self) -> f64;
    /// A finite value with a fractional part.
    fn has_fraction(self) -> bool;
    /// The sign bit is set (`np.signbit`, so -0.0 counts).
    fn is_sign_negative(self) -> bool;
    fn is_finite(self) -> bool;
    fn abs_f64(self) -> f64;
}

impl Float for f32 {
    const IS_F32: bool = true;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn square_widened(self) -> f64 {
        (self * self) as f64
    }
    #[inline]
    fn has_fraction(self) -> bool {
        // Below 2^23 adding and subtracting 2^23 rounds to an integer (no libm
        // call, unlike `trunc` on baseline x86-64, so it vectorises); from 2^23 on
        // every f32 is one. NaN and infinities compare false.
        const BIG: f32 = 8_388_608.0;
        let a = self.abs();
        a < BIG && (a + BIG) - BIG != a
    }
    #[inline]
    fn is_sign_negative(self) -> bool {
        f32::is_sign_negative(self)
    }
    #[inline]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    #[inline]
    fn abs_f64(self) -> f64 {
        self.abs() as f64
    }
}

impl Float for f64 {
    const IS_F32: bool = false;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    #[inline]
    fn square_widened(self) -> f64 {
        self * self
    }
    #[inline]
    fn has_fraction(self) -> bool {
        const BIG: f64 = 4_503_599_627_370_496.0; // 2^52, as for f32 above
        let a = self.abs();
        a < BIG && (a + BIG) - BIG != a
    }
    #[inline]
    fn is_sign_negative(self) -> bool {
        f64::is_sign_negative(self)
    }
    #[inline]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    #[inline]
    fn abs_f64(self) -> f64 {
        self.abs()
    }
}

/// Integer element types of CSR index arrays (`indices`, `indptr`).
pub trait SparseIndex: Copy + Send + Sync + 'static {
    /// `None` for negative values (and values beyond `usize`).
    fn to_usize(self) -> Option<usize>;
}

impl SparseIndex for i32 {
    fn to_usize(self) -> Option<usize> {
        usize::try_from(self).ok()
    }
}

impl SparseIndex for i64 {
    fn to_usize(self) -> Option<usize> {
        usize::try_from(self).ok()
    }
}

/// Stored values aimed at per parallel task: big enough to amortise scheduling,
/// small enough to spread a matrix over both cores and balance skewed rows.
const TARGET_NNZ_PER_CHUNK: usize = 1 << 16;
/// Rows per task at most, so matrices of mostly empty rows still split up.
const MAX_ROWS_PER_CHUNK: usize = 1 << 12;

/// The stored-value range of row `r`, clamped into `0..nnz` and never reversed.
///
/// For a validated indptr this is exactly `indptr[r]..indptr[r + 1]`; the clamping
/// only matters if the client rewrote indptr after validation.
pub fn row_range<P: SparseIndex>(indptr: &[P], r: usize, nnz: usize) -> Range<usize> {
    let at = |i: usize| {
        indptr
            .get(i)
            .and_then(|v| v.to_usize())
            .unwrap_or(0)
            .min(nnz)
    };
    let start = at(r);
    let end = at(r + 1).max(start);
    start..end
}

/// Splits the rows `0..n_rows` into contiguous chunks for parallel work.
///
/// Chunks are cut by stored-value count, so a few dense rows do not end up in one
/// task. The split depends only on the matrix, never on the thread count (results
/// do not depend on it either, since rows are independent).
pub fn row_chunks<P: SparseIndex>(indptr: &[P], n_rows: usize, nnz: usize) -> Vec<Range<usize>> {
    split_rows(
        indptr,
        n_rows,
        nnz,
        TARGET_NNZ_PER_CHUNK,
        MAX_ROWS_PER_CHUNK,
    )
}

/// Consecutive row ranges, each closed once it holds at least `target_values`
/// stored values or `max_rows` rows; a row larger than the target is a range of
/// its own. Rows are never split.
pub fn split_rows<P: SparseIndex>(
    indptr: &[P],
    n_rows: usize,
    nnz: usize,
    target_values: usize,
    max_rows: usize,
) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut chunk_start = 0;
    let mut chunk_nnz_start = row_range(indptr, 0, nnz).start;
    for r in 0..n_rows {
        let row_end = row_range(indptr, r, nnz).end;
        let rows = r + 1 - chunk_start;
        if row_end.saturating_sub(chunk_nnz_start) >= target_values || rows >= max_rows {
            chunks.push(chunk_start..r + 1);
            chunk_start = r + 1;
            chunk_nnz_start = row_end;
        }
    }
    if chunk_start < n_rows {
        chunks.push(chunk_start..n_rows);
    }
    chunks
}

/// Rows per task for a dense matrix with `n_cols` columns (same target as CSR).
pub fn dense_rows_per_chunk(n_cols: usize) -> usize {
    (TARGET_NNZ_PER_CHUNK / n_cols.max(1)).clamp(1, MAX_ROWS_PER_CHUNK)
}

/// Chunks per rayon job in [`for_each_in_waves`]: about 4 M stored values, a few
/// milliseconds of work.
pub(crate) const CHUNKS_PER_WAVE: usize = 64;

/// Runs `f` on every item in parallel, but as a series of rayon jobs ("waves") of
/// at most [`CHUNKS_PER_WAVE`] items rather than one big job.
///
/// Why: a rayon worker finishes the job it is on (its own and stealable tasks)
/// before it looks at newly injected jobs. One big job per kernel would make a
/// small request from another connection wait for the whole of a large one; with
/// waves it waits for one wave at most, because each new wave is injected behind
/// whatever arrived meanwhile. Items are independent, so results do not change.
pub fn for_each_in_waves<T: Send>(items: impl IntoIterator<Item = T>, f: impl Fn(T) + Sync) {
    let mut items = items.into_iter();
    loop {
        let wave: Vec<T> = items.by_ref().take(CHUNKS_PER_WAVE).collect();
        if wave.is_empty() {
            break;
        }
        wave.into_par_iter().for_each(&f);
        // Between waves, part of the output is written: where a test kills the
        // daemon "inside a kernel" (a no-op unless the test hooks are on).
        crate::faults::point(crate::faults::Phase::Kernel);
    }
}

/// Cuts `slice` into consecutive pieces ending at the given (non-decreasing) offsets;
/// offsets past the end are clamped. Lets parallel tasks own disjoint `&mut` parts.
pub fn split_at_offsets_mut<T>(
    mut slice: &mut [T],
    ends: impl IntoIterator<Item = usize>,
) -> Vec<&mut [T]> {
    let mut pieces = Vec::new();
    let mut consumed = 0;
    for end in ends {
        let take = end.saturating_sub(consumed).min(slice.len());
        let (head, tail) = std::mem::take(&mut slice).split_at_mut(take);
        pieces.push(head);
        slice = tail;
        consumed += take;
    }
    pieces
}

/// Two group-major `n_groups x n_cols` matrices assembled from per-task pairs of
/// partial rows: task `k` covers group `starts[k].0` from column `starts[k].1` on.
/// The per-group, per-column-block kernels (hvg's sums and Welford statistics)
/// compute their blocks in parallel and place them here.
pub fn place_group_blocks(
    n_groups: usize,
    n_cols: usize,
    starts: impl IntoIterator<Item = (usize, usize)>,
    parts: Vec<(Vec<f64>, Vec<f64>)>,
) -> (Vec<f64>, Vec<f64>) {
    let mut first = vec![0.0f64; n_groups * n_cols];
    let mut second = vec![0.0f64; n_groups * n_cols];
    for ((g, lo), (a, b)) in starts.into_iter().zip(parts) {
        let at = g * n_cols + lo;
        first[at..at + a.len()].copy_from_slice(&a);
        second[at..at + b.len()].copy_from_slice(&b);
    }
    (first, second)
}

#[cfg(test)]
pub(crate) mod test_util {
    /// A CSR matrix saved as raw little-endian files in the directory named by
    /// `RGG_BIN` (`indptr.bin`, `indices.bin` as i32, `data.bin` as f32; e.g. the
    /// bench's log-normalised 30k x 18k), for the ignored timing tests: indptr,
    /// indices, data and the column count.
    pub fn saved_csr() -> (Vec<i32>, Vec<i32>, Vec<f32>, usize) {
        let dir = std::env::var("RGG_BIN").expect("RGG_BIN: a directory of saved arrays");
        let words = |f: &str| -> Vec<u32> {
            let bytes = std::fs::read(format!("{dir}/{f}")).unwrap();
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let indptr: Vec<i32> = words("indptr.bin").into_iter().map(|w| w as i32).collect();
        let indices: Vec<i32> = words("indices.bin").into_iter().map(|w| w as i32).collect();
        let data: Vec<f32> = words("data.bin").into_iter().map(f32::from_bits).collect();
        let n_cols = indices.iter().max().map_or(0, |&c| c as usize + 1);
        (indptr, indices, data, n_cols)
    }

    /// `n` cells spread over 9 groups of 30% down to 1% of them, as the bench's.
    pub fn unequal_groups(n: usize) -> Vec<u32> {
        const PERCENT: [usize; 9] = [30, 20, 14, 11, 9, 7, 5, 3, 1];
        (0..n)
            .map(|r| {
                let mut x = r * 7919 % 100;
                let mut g = 0;
                while x >= PERCENT[g] {
                    x -= PERCENT[g];
                    g += 1;
                }
                g as u32
            })
            .collect()
    }

    /// Runs `f` on a fresh local pool of `threads` threads.
    pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("test pool")
            .install(f)
    }

    /// A small deterministic generator so tests need no extra crate.
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 11
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
        pub fn unit(&mut self) -> f64 {
            (self.next_u64() as f64) / ((1u64 << 53) as f64)
        }
    }

    /// A random CSR matrix (sorted column indices), with some empty rows and some
    /// rows dominated by one large value, so exclusion paths get exercised.
    pub struct Csr {
        pub indptr: Vec<i64>,
        pub indices: Vec<i32>,
        pub data: Vec<f64>,
    }

    pub fn random_csr(seed: u64, n_rows: usize, n_cols: usize, density: f64) -> Csr {
        let mut rng = Lcg(seed);
        let mut indptr = vec![0i64];
        let mut indices = Vec::new();
        let mut data = Vec::new();
        for r in 0..n_rows {
            let empty_row = r % 7 == 3;
            for c in 0..n_cols {
                if !empty_row && rng.unit() < density {
                    indices.push(c as i32);
                    let v = match rng.below(10) {
                        0 => 0.0,
                        1 => 100.0 + rng.below(1000) as f64,
                        _ => (rng.below(20) as f64) + rng.unit(),
                    };
                    data.push(v);
                }
            }
            indptr.push(indices.len() as i64);
        }
        Csr {
            indptr,
            indices,
            data,
        }
    }

    pub fn shapes() -> Vec<(usize, usize, f64)> {
        vec![
            (0, 0, 0.5),
            (0, 5, 0.5),
            (1, 1, 1.0),
            (3, 4, 0.0),
            (7, 3, 0.9),
            (50, 40, 0.2),
            (300, 500, 0.6),
            (5000, 64, 0.05),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_chunks_cover_all_rows_in_order() {
        for &n_rows in &[0usize, 1, 5, 4096, 4097, 20000] {
            // Uneven rows: every 100th row is very dense.
            let mut indptr = vec![0i64];
            for r in 0..n_rows {
                let len = if r % 100 == 0 { 70_000 } else { r % 3 };
                indptr.push(indptr.last().unwrap() + len as i64);
            }
            let nnz = *indptr.last().unwrap() as usize;
            let chunks = row_chunks(&indptr, n_rows, nnz);
            let mut next = 0;
            for c in &chunks {
                assert_eq!(c.start, next);
                assert!(c.end > c.start);
                next = c.end;
            }
            assert_eq!(next, n_rows);
        }
    }

    #[test]
    fn row_range_clamps_bad_values() {
        let indptr = [0i32, 5, 3, -1, 100];
        assert_eq!(row_range(&indptr, 0, 10), 0..5);
        assert_eq!(row_range(&indptr, 1, 10), 5..5);
        assert_eq!(row_range(&indptr, 2, 10), 3..3);
        assert_eq!(row_range(&indptr, 3, 10), 0..10);
        assert_eq!(row_range(&indptr, 4, 10), 10..10);
    }

    #[test]
    fn split_at_offsets_clamps() {
        let mut v: Vec<u32> = (0..10).collect();
        let pieces = split_at_offsets_mut(&mut v, [3, 3, 7, 20, 25]);
        let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(lens, vec![3, 0, 4, 3, 0]);
    }
}
