//! A per-gene structure for rank statistics: the matrix's stored non-zeros by
//! column, in value order (row ids and values), every tie block's first entry
//! flagged; and, for the rare columns whose sums depend on the order of the
//! additions, a second copy in row order.
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
    /// Column `c`'s entries are `colptr[c]..colptr[c + 1]` of `by_value`.
    pub colptr: Vec<usize>,
    /// Each column's (row, value) entries in increasing order of value, ties in
    /// row order, [`TIE_START`] set in the row of each tie block's first entry.
    pub by_value: Vec<Entry<T>>,
    /// Row-ordered copies of the columns whose sums are not exact (`!exact[c]`),
    /// for sums that must add in upstream's order: column `c`'s are
    /// `row_order[row_ptr[c]..row_ptr[c + 1]]`, none for an exact column. One
    /// value-ordered array serves every other column (a third less memory than
    /// keeping both orders for all, and fresh memory is most of the build).
    pub row_ptr: Vec<usize>,
    pub row_order: Vec<Entry<T>>,
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

/// A stored value and its row. One array of pairs rather than two arrays: the
/// build scatters one stream per column group instead of two, and the Wilcoxon
/// passes read a column's rows and values from the same cache lines.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct Entry<T> {
    pub row: u32,
    pub val: T,
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
        (self.colptr.len() + self.row_ptr.len()) * 8
            + (self.by_value.len() + self.row_order.len()) * std::mem::size_of::<Entry<T>>()
            + self.n_neg.len() * 4
            + self.exact.len()
    }

    pub fn nnz(&self) -> usize {
        self.by_value.len()
    }
}

/// Where a build reads the matrix from: `n_bands()` consecutive parts of its stored
/// values, in storage order (rows ascending). The build reads every band twice,
/// first to count ([`Pass::Count`]), then to place the values ([`Pass::Place`]),
/// both times in parallel over bands.
pub trait Bands<T>: Sync {
    fn n_rows(&self) -> usize;
    /// At least one. Each band's stored values number below 2^32.
    fn n_bands(&self) -> usize;
    /// Calls `f(row, col, value)` for each stored value of band `b`, in storage
    /// order, until `f` returns false. A negative column index is passed as
    /// `usize::MAX`, which the build rejects. An error (the source could not be
    /// read) fails the build.
    fn for_band(
        &self,
        b: usize,
        pass: Pass,
        f: impl FnMut(usize, usize, T) -> bool,
    ) -> Result<(), BuildError>;
}

/// Which of the build's two reads of a band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Count,
    Place,
}

/// Rows in bands of consecutive rows (up to 32 bands).
fn row_band(n_rows: usize, b: usize) -> std::ops::Range<usize> {
    let n_bands = row_bands(n_rows);
    (b * n_rows / n_bands)..((b + 1) * n_rows / n_bands)
}

fn row_bands(n_rows: usize) -> usize {
    n_rows.clamp(1, 32)
}

struct CsrRows<'a, T, P, I> {
    indptr: &'a [P],
    indices: &'a [I],
    data: &'a [T],
    n_rows: usize,
}

impl<T: Float, P: SparseIndex, I: SparseIndex> Bands<T> for CsrRows<'_, T, P, I> {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn n_bands(&self) -> usize {
        row_bands(self.n_rows)
    }
    fn for_band(
        &self,
        b: usize,
        _: Pass,
        mut f: impl FnMut(usize, usize, T) -> bool,
    ) -> Result<(), BuildError> {
        let nnz = self.data.len().min(self.indices.len());
        for r in row_band(self.n_rows, b) {
            for j in row_range(self.indptr, r, nnz) {
                let c = self.indices[j].to_usize().unwrap_or(usize::MAX);
                if !f(r, c, self.data[j]) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

struct DenseRows<'a, T> {
    data: &'a [T],
    n_rows: usize,
    n_cols: usize,
}

impl<T: Float> Bands<T> for DenseRows<'_, T> {
    fn n_rows(&self) -> usize {
        self.n_rows
    }
    fn n_bands(&self) -> usize {
        row_bands(self.n_rows)
    }
    fn for_band(
        &self,
        b: usize,
        _: Pass,
        mut f: impl FnMut(usize, usize, T) -> bool,
    ) -> Result<(), BuildError> {
        for r in row_band(self.n_rows, b) {
            let row = &self.data[r * self.n_cols..(r + 1) * self.n_cols];
            for (c, &v) in row.iter().enumerate() {
                if !f(r, c, v) {
                    return Ok(());
                }
            }
        }
        Ok(())
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

/// From any source of bands (see [`Bands`]), whose column indices are checked here.
pub fn from_bands<T: Float>(
    src: &impl Bands<T>,
    n_cols: usize,
) -> Result<SortedCsc<T>, BuildError> {
    build(src, n_cols)
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

/// Stored values per column group (see [`build`]): the group's entries, their
/// column-sorted copy and one column's sort buffers stay within a core's L2 cache.
const GROUP_TARGET: usize = 1 << 15;
/// Columns per group at most, so a local column index always fits a u32.
const GROUP_MAX_COLS: usize = 1 << 20;

/// Builds the structure in three passes, two over the rows and one over column groups:
///
/// 1. Rows are cut into bands; each band counts its values per column (and checks
///    them), so every band knows where its entries go and all bands fill in
///    parallel. Positions depend only on row order, never on the banding.
/// 2. Columns are cut into consecutive groups of about [`GROUP_TARGET`] values.
///    Each band appends its entries, in row order, to its share of each group's
///    final range of `by_value`, with the column within the group packed above the
///    row id (a group is at most `2^(32 - row bits)` columns wide), so one store
///    per value. Writing to a few hundred group streams instead of one stream per
///    column keeps the writes in cache (a direct scatter into thousands of columns
///    missed the cache on most writes and was the largest part of the build).
/// 3. Each group, on its own and in cache, is sorted by column with a stable
///    counting sort (so rows stay ascending within a column) and written back in
///    place; then each column is ordered by value (ties keep row order, which is
///    the (value, row) order), in place, after a row-order copy of the column
///    goes to `row_order` if its sums are not exact.
fn build<T: Float>(src: &impl Bands<T>, n_cols: usize) -> Result<SortedCsc<T>, BuildError> {
    let n_rows = src.n_rows();
    if n_rows > MAX_ROWS {
        return Err(BuildError::TooManyRows(n_rows));
    }
    let n_bands = src.n_bands();
    // A band's count per column fits a u32: it is at most the band's value count.
    let counts: Vec<Result<(Vec<u32>, bool), BuildError>> = (0..n_bands)
        .into_par_iter()
        .map(|b| {
            let mut counts = vec![0u32; n_cols];
            let mut integers = true;
            let mut bad = None;
            src.for_band(b, Pass::Count, |r, c, v| {
                integers &= v.is_finite() && !v.is_sign_negative() && !v.has_fraction();
                let nan = v.to_f64().is_nan();
                if nan || c >= n_cols {
                    bad = Some(if nan {
                        BuildError::NotANumber { row: r }
                    } else {
                        BuildError::Malformed(format!("column index out of range in row {r}"))
                    });
                    return false;
                }
                counts[c] += !is_zero(v) as u32;
                true
            })?;
            bad.map_or(Ok((counts, integers)), Err)
        })
        .collect();
    let counts: Vec<(Vec<u32>, bool)> = counts.into_iter().collect::<Result<_, _>>()?;
    let nonneg_integers = counts.iter().all(|(_, i)| *i);
    let counts: Vec<Vec<u32>> = counts.into_iter().map(|(c, _)| c).collect();
    let mut colptr = vec![0usize; n_cols + 1];
    for c in 0..n_cols {
        colptr[c + 1] = colptr[c] + counts.iter().map(|k| k[c] as usize).sum::<usize>();
    }
    let nnz = colptr[n_cols];

    // Column groups: group g is columns gstart[g]..gstart[g + 1]. Row ids take
    // `row_bits` bits of an entry's row field during the scatter, the column
    // within the group the bits above (n_rows <= MAX_ROWS leaves at least one).
    let row_bits = usize::BITS - n_rows.leading_zeros();
    let max_width = GROUP_MAX_COLS.min(1usize << (32 - row_bits));
    let mut gstart = vec![0usize];
    for c in 0..n_cols {
        let g0 = *gstart.last().unwrap();
        if colptr[c + 1] - colptr[g0] >= GROUP_TARGET || c + 1 - g0 >= max_width {
            gstart.push(c + 1);
        }
    }
    if *gstart.last().unwrap() < n_cols {
        gstart.push(n_cols);
    }
    let n_groups = gstart.len() - 1;
    let mut group_of_col = vec![0u32; n_cols];
    for g in 0..n_groups {
        group_of_col[gstart[g]..gstart[g + 1]].fill(g as u32);
    }
    // cursors[b][g] = (next, end): where band b's entries of group g go.
    let mut cursors = vec![vec![(0usize, 0usize); n_groups]; n_bands];
    for g in 0..n_groups {
        let mut at = colptr[gstart[g]];
        for (b, k) in counts.iter().enumerate() {
            let n: usize = k[gstart[g]..gstart[g + 1]]
                .iter()
                .map(|&n| n as usize)
                .sum();
            cursors[b][g] = (at, at + n);
            at += n;
        }
    }
    drop(counts);

    // Every entry is written by the scatter below (checked: each band's share of
    // each group is exactly full) before the length is set.
    let mut by_value: Vec<Entry<T>> = Vec::with_capacity(nnz);
    huge_pages(by_value.spare_capacity_mut());
    let entries_at = SharedMut(by_value.as_mut_ptr());
    let (gstart, group_of_col) = (&gstart, &group_of_col);
    let filled: Vec<Result<bool, BuildError>> = cursors
        .into_par_iter()
        .enumerate()
        .map(|(b, mut cursor)| {
            // Captured whole: the raw pointer field alone is not Send.
            #[allow(clippy::redundant_locals)]
            let entries_at = entries_at;
            let mut ok = true;
            src.for_band(b, Pass::Place, |r, c, v| {
                if c >= n_cols || is_zero(v) || v.to_f64().is_nan() {
                    return true;
                }
                let g = group_of_col[c] as usize;
                let (next, end) = &mut cursor[g];
                let at = *next;
                // The count pass bounds each band's share of each group; data
                // rewritten meanwhile by the client must not write outside it.
                if at >= *end {
                    ok = false;
                    return false;
                }
                *next = at + 1;
                // Hundreds of streams are more than the hardware prefetcher
                // follows, so each new cache line would stall the stores.
                prefetch(entries_at.0.wrapping_add(at + PREFETCH_AHEAD));
                // SAFETY: `at` lies in band b's own range of group g (checked
                // above), which no other band writes; the vector has room for
                // nnz entries.
                unsafe {
                    entries_at.0.add(at).write(Entry {
                        row: (((c - gstart[g]) << row_bits) | r) as u32,
                        val: v,
                    });
                }
                true
            })?;
            Ok(ok && cursor.iter().all(|(next, end)| next == end))
        })
        .collect();
    let filled: Vec<bool> = filled.into_iter().collect::<Result<_, _>>()?;
    if filled.contains(&false) {
        return Err(changed());
    }
    // SAFETY: every band filled its share of every group exactly, and the shares
    // tile 0..nnz, so all nnz entries are initialized.
    unsafe { by_value.set_len(nnz) };

    let mut n_neg = vec![0u32; n_cols];
    let mut exact = vec![false; n_cols];
    let group_ends = || gstart[1..].iter().map(|&c| colptr[c]);
    let groups: Vec<_> = super::split_at_offsets_mut(&mut by_value, group_ends())
        .into_iter()
        .zip(super::split_at_offsets_mut(
            &mut n_neg,
            gstart[1..].iter().copied(),
        ))
        .zip(super::split_at_offsets_mut(
            &mut exact,
            gstart[1..].iter().copied(),
        ))
        .collect();
    let colptr = &colptr;
    // Each group's row-order copies of its columns that are not exact.
    let row_copies: Vec<Result<Vec<Entry<T>>, BuildError>> = groups
        .into_par_iter()
        .enumerate()
        .map_init(Scratch::default, |scratch, (g, ((es, neg), ex))| {
            let cols = gstart[g]..gstart[g + 1];
            sort_group(
                &colptr[cols.start..=cols.end],
                cols.start,
                row_bits,
                es,
                neg,
                ex,
                scratch,
            )
        })
        .collect();
    let mut row_order = Vec::new();
    for copies in row_copies {
        row_order.extend_from_slice(&copies?);
    }
    let mut row_ptr = vec![0usize; n_cols + 1];
    for c in 0..n_cols {
        let own = if exact[c] {
            0
        } else {
            colptr[c + 1] - colptr[c]
        };
        row_ptr[c + 1] = row_ptr[c] + own;
    }
    debug_assert_eq!(row_ptr[n_cols], row_order.len());

    Ok(SortedCsc {
        n_rows,
        n_cols,
        colptr: colptr.clone(),
        by_value,
        row_ptr,
        row_order,
        n_neg,
        exact,
        nonneg_integers,
    })
}

/// Entries ahead of the write position that the group scatter prefetches.
const PREFETCH_AHEAD: usize = 32;

/// Entries ahead of the read position that the group sort prefetches.
const READ_AHEAD: usize = 256;

/// A hint to bring the cache line at `p` into the cache; no effect on the
/// program's meaning (a prefetch never faults, whatever the address).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching reads nothing the program sees and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn changed() -> BuildError {
    BuildError::Malformed("the matrix changed while it was read".into())
}

/// Per-thread buffers reused from group to group and column to column.
struct Scratch<T> {
    /// The group counting-sorted by column, each column still in row order.
    entries: Vec<Entry<T>>,
    /// Per column of the group: next free and end position in the group.
    next: Vec<(usize, usize)>,
    order: ValueOrder,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch {
            entries: Vec::new(),
            next: Vec::new(),
            order: ValueOrder::default(),
        }
    }
}

/// Sorts one column group in place: `es` holds its entries in row order, each
/// entry's column (relative to `first_col`) above the low `row_bits` bits of its
/// row field; afterwards `es` is column-major, each column in value order with
/// its tie blocks flagged. Returns the row-order copies (plain, ascending rows)
/// of the group's columns whose sums are not exact, in column order. `colptr`
/// is the group's slice of the column pointers (one more than columns).
fn sort_group<T: Float>(
    colptr: &[usize],
    first_col: usize,
    row_bits: u32,
    es: &mut [Entry<T>],
    neg: &mut [u32],
    ex: &mut [bool],
    scratch: &mut Scratch<T>,
) -> Result<Vec<Entry<T>>, BuildError> {
    let base = colptr[0];
    let width = colptr.len() - 1;
    let row_mask = ((1u64 << row_bits) - 1) as u32;
    scratch.next.clear();
    scratch
        .next
        .extend(colptr.windows(2).map(|w| (w[0] - base, w[1] - base)));
    if scratch.entries.len() < es.len() {
        scratch.entries.resize(es.len(), es[0]); // grown only: every slot used is written
    }
    let by_col = &mut scratch.entries[..es.len()];
    // Stable counting sort by column, from the group into the scratch; each column
    // is then ordered by value from there back into the group. A column that
    // overflows its count means the matrix changed between the passes; with none
    // overflowing and `len` entries in all, every column is exactly full.
    for (k, e) in es.iter().enumerate() {
        // The group was written long ago, by both threads: it is read from memory.
        prefetch(es.as_ptr().wrapping_add(k + READ_AHEAD));
        let lc = (e.row as u64 >> row_bits) as usize;
        let Some((next, end)) = scratch.next.get_mut(lc) else {
            return Err(changed());
        };
        let at = *next;
        if at >= *end {
            return Err(changed());
        }
        *next = at + 1;
        by_col[at] = Entry {
            row: e.row & row_mask,
            val: e.val,
        };
    }
    let mut row_copies = Vec::new();
    for lc in 0..width {
        let range = colptr[lc] - base..colptr[lc + 1] - base;
        let facts = scratch
            .order
            .sort(&by_col[range.clone()], &mut es[range], &mut row_copies);
        if let Some(row) = facts.duplicate_row {
            return Err(BuildError::DuplicateEntry {
                row,
                col: first_col + lc,
            });
        }
        neg[lc] = facts.n_neg;
        ex[lc] = facts.exact;
    }
    Ok(row_copies)
}

/// Buffers for ordering one column by value.
struct ValueOrder {
    /// Few-distinct path: open-addressing table of keys (0 = empty: no non-NaN
    /// value has key 0) and the distinct value's number in each slot.
    slot_key: Vec<u64>,
    slot_id: Vec<u8>,
    /// Per distinct value: its key and its slot.
    distinct: Vec<(u64, usize)>,
    /// Per entry: the number of its distinct value.
    ids: Vec<u8>,
    /// Radix and comparison sort items: key, then row.
    a: Vec<u64>,
    b: Vec<u64>,
    pairs: Vec<(u64, u32)>,
    /// Radix histograms, one per pass.
    hist: Vec<u32>,
    /// Columns in a row the few-distinct path gave up on, and columns it skipped.
    distinct_misses: u32,
    distinct_skipped: u32,
}

impl Default for ValueOrder {
    fn default() -> Self {
        ValueOrder {
            slot_key: vec![0; SLOTS],
            slot_id: vec![0; SLOTS],
            distinct: Vec::new(),
            ids: Vec::new(),
            a: Vec::new(),
            b: Vec::new(),
            pairs: Vec::new(),
            hist: Vec::new(),
            distinct_misses: 0,
            distinct_skipped: 0,
        }
    }
}

/// Table size and distinct values at most for the few-distinct path.
const SLOTS: usize = 512;
const MAX_DISTINCT: usize = 255;
/// Columns shorter than this are just sorted.
const SMALL: usize = 64;
/// Columns at least this long take radix digits of up to 11 bits (larger
/// histograms, fewer passes); shorter ones up to 8 bits.
const WIDE_DIGITS: usize = 3072;
/// After this many columns in a row with too many distinct values for the
/// few-distinct path, a thread stops trying it (the attempt reads up to
/// `MAX_DISTINCT` values before giving up), except on every
/// [`DISTINCT_RETRY`]th column, in case later columns are different.
const DISTINCT_GIVE_UP: u32 = 4;
const DISTINCT_RETRY: u32 = 64;

fn key_of<T: Float>(v: T) -> u64 {
    if T::IS_F32 {
        order_key32(v.to_f32()) as u64
    } else {
        order_key(v.to_f64())
    }
}

impl ValueOrder {
    /// Writes the entries of `col` (rows ascending) to `out` in increasing order
    /// of their values, ties in row order, with [`TIE_START`] on each tie
    /// block's first row, and returns the column's facts; appends the column, in
    /// row order, to `row_copies` if its sums are not exact. A column with a
    /// duplicate row is written in any order (the build fails on it).
    fn sort<T: Float>(
        &mut self,
        col: &[Entry<T>],
        out: &mut [Entry<T>],
        row_copies: &mut Vec<Entry<T>>,
    ) -> ColumnFacts {
        let n = col.len();
        let facts_before = |col: &[Entry<T>], row_copies: &mut Vec<Entry<T>>| {
            let facts = column_facts(col);
            if !facts.exact {
                row_copies.extend_from_slice(col);
            }
            facts
        };
        if n >= SMALL && self.try_distinct() {
            if self.by_distinct(col, out) {
                self.distinct_misses = 0;
                return facts_before(col, row_copies);
            }
            self.distinct_misses += 1;
        }
        if T::IS_F32 {
            // Key in the high half, row in the low: sorting the u64s is sorting by
            // (value, row). The radix passes look only at the key's bits above
            // the column's smallest key.
            let (mut lo, mut hi) = (u64::MAX, 0u64);
            let mut ascending = true;
            let mut prev_row = None;
            self.a.clear();
            self.a.extend(col.iter().map(|e| {
                let k = key_of(e.val);
                lo = lo.min(k);
                hi = hi.max(k);
                ascending &= prev_row < Some(e.row);
                prev_row = Some(e.row);
                (k << 32) | e.row as u64
            }));
            // The facts from the smallest and largest value where they settle
            // them, saving a pass; otherwise (rarely) from the column itself,
            // still in row order here.
            let facts = match (ascending, exact_by_range32(lo as u32, hi as u32, n)) {
                (true, true) => None,
                _ => Some(facts_before(col, row_copies)),
            };
            if n >= SMALL {
                let bits = u64::BITS - (hi - lo).leading_zeros();
                if bits == 0 {
                    // One value: row order is the order.
                } else if bits <= 18 {
                    self.radix::<9, 2>(lo);
                } else if bits <= 27 {
                    self.radix::<9, 3>(lo);
                } else if n >= WIDE_DIGITS {
                    self.radix::<11, 3>(lo);
                } else {
                    self.radix::<8, 4>(lo);
                }
            } else {
                self.a.sort_unstable();
            }
            // The key gives back the value: no lookup of the entry it came from.
            let mut prev = None;
            for (slot, &k) in out.iter_mut().zip(&self.a) {
                let key = k >> 32;
                let row = if Some(key) == prev {
                    k as u32
                } else {
                    k as u32 | TIE_START
                };
                *slot = Entry {
                    row,
                    val: T::from_f32(value_of_key32(key as u32)),
                };
                prev = Some(key);
            }
            facts.unwrap_or_else(|| ColumnFacts {
                duplicate_row: None,
                // Negative values' keys lie below those of positive ones.
                n_neg: self.a.partition_point(|&k| k >> 32 < 1 << 31) as u32,
                exact: true,
            })
        } else {
            let facts = facts_before(col, row_copies);
            self.pairs.clear();
            self.pairs
                .extend(col.iter().map(|e| (key_of(e.val), e.row)));
            self.pairs.sort_unstable();
            let mut prev = None;
            for (slot, &(key, r)) in out.iter_mut().zip(&self.pairs) {
                *slot = Entry {
                    row: if Some(key) == prev { r } else { r | TIE_START },
                    val: T::from_f64(value_of_key(key)),
                };
                prev = Some(key);
            }
            facts
        }
    }

    /// Whether to try the few-distinct path on this column (see [`DISTINCT_GIVE_UP`]).
    fn try_distinct(&mut self) -> bool {
        if self.distinct_misses < DISTINCT_GIVE_UP {
            return true;
        }
        self.distinct_skipped += 1;
        self.distinct_skipped.is_multiple_of(DISTINCT_RETRY)
    }

    /// A stable counting sort by distinct value, for columns with at most
    /// [`MAX_DISTINCT`] distinct values (common: counts, log1p of counts). False,
    /// with `out` untouched, for a column with more.
    fn by_distinct<T: Float>(&mut self, col: &[Entry<T>], out: &mut [Entry<T>]) -> bool {
        self.distinct.clear();
        self.ids.clear();
        self.ids.resize(col.len(), 0);
        let mut count = [0u32; MAX_DISTINCT];
        let mut fits = true;
        for (e, slot_of) in col.iter().zip(self.ids.iter_mut()) {
            let key = key_of(e.val);
            let mut s = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 55) as usize % SLOTS;
            let id = loop {
                let k = self.slot_key[s];
                if k == key {
                    break self.slot_id[s];
                }
                if k == 0 {
                    if self.distinct.len() == MAX_DISTINCT {
                        fits = false;
                        break 0;
                    }
                    let id = self.distinct.len() as u8;
                    self.slot_key[s] = key;
                    self.slot_id[s] = id;
                    self.distinct.push((key, s));
                    break id;
                }
                s = (s + 1) % SLOTS;
            };
            if !fits {
                break;
            }
            count[id as usize] += 1;
            *slot_of = id;
        }
        for &(_, s) in &self.distinct {
            self.slot_key[s] = 0;
        }
        if !fits {
            return false;
        }
        // Start of each distinct value's block in value order, by id.
        let n_distinct = self.distinct.len();
        let mut by_key = [(0u64, 0u8); MAX_DISTINCT];
        for (id, (slot, d)) in by_key.iter_mut().zip(&self.distinct).enumerate() {
            *slot = (d.0, id as u8);
        }
        let by_key = &mut by_key[..n_distinct];
        by_key.sort_unstable();
        let mut start = [0u32; MAX_DISTINCT];
        let mut at = 0u32;
        for &(_, id) in by_key.iter() {
            start[id as usize] = at;
            at += count[id as usize];
        }
        let mut next = start;
        for (&id, e) in self.ids.iter().zip(col) {
            let p = &mut next[id as usize];
            out[*p as usize] = *e;
            *p += 1;
        }
        for &(_, id) in by_key.iter() {
            out[start[id as usize] as usize].row |= TIE_START;
        }
        true
    }

    /// Stable LSD radix sort of `a` by its high 32 bits less `lo` (the column's
    /// smallest key, so the difference is below `2^(DIGIT * PASSES)`), `DIGIT`
    /// bits per pass. The low half, the row, is ascending already, so this is the
    /// full u64 order. A pass whose digit all entries share is skipped.
    fn radix<const DIGIT: u32, const PASSES: usize>(&mut self, lo: u64) {
        let buckets = 1usize << DIGIT;
        let mask = (buckets - 1) as u64;
        let n = self.a.len();
        self.hist.clear();
        self.hist.resize(buckets * PASSES, 0);
        for &k in &self.a {
            let h = (k >> 32) - lo;
            for p in 0..PASSES {
                self.hist[p * buckets + ((h >> (DIGIT as usize * p)) & mask) as usize] += 1;
            }
        }
        self.b.clear();
        self.b.resize(n, 0);
        for p in 0..PASSES {
            let shift = DIGIT as usize * p;
            let digit = |k: u64| ((((k >> 32) - lo) >> shift) & mask) as usize;
            let counts = &mut self.hist[p * buckets..(p + 1) * buckets];
            if counts[digit(self.a[0])] as usize == n {
                continue;
            }
            let mut at = 0;
            for slot in counts.iter_mut() {
                let c = *slot;
                *slot = at;
                at += c;
            }
            for &k in &self.a {
                let p = &mut counts[digit(k)];
                self.b[*p as usize] = k;
                *p += 1;
            }
            std::mem::swap(&mut self.a, &mut self.b);
        }
    }
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

/// The value whose [`order_key32`] is `k`.
fn value_of_key32(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & !(1 << 31) } else { !k })
}

/// The value whose [`order_key`] is `k`.
fn value_of_key(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
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

/// What one pass over a column (rows ascending unless duplicated) tells.
struct ColumnFacts {
    /// The first row stored again (its second entry), if any.
    duplicate_row: Option<usize>,
    n_neg: u32,
    /// Any sum of a subset of the values (and any difference of two such sums)
    /// is exact in f64: all are multiples of 2^q (q the lowest set bit over all
    /// values) and their magnitudes add up to less than 2^(53 + q).
    exact: bool,
}

fn column_facts<T: Float>(col: &[Entry<T>]) -> ColumnFacts {
    let mut duplicate_row = None;
    let mut prev = None;
    let mut n_neg = 0u32;
    let (mut q, mut total, mut finite) = (i32::MAX, 0.0f64, true);
    for e in col {
        if duplicate_row.is_none() && prev.is_some_and(|p| p >= e.row) {
            duplicate_row = Some(e.row as usize);
        }
        prev = Some(e.row);
        let v = e.val.to_f64();
        n_neg += (v < 0.0) as u32;
        finite &= v.is_finite();
        if v.is_finite() {
            q = q.min(lowest_bit_exponent(v));
        }
        total += v.abs();
    }
    ColumnFacts {
        duplicate_row,
        n_neg,
        exact: finite && exact_bound(col.is_empty(), q, total),
    }
}

/// Whether a column of `n` f32 values, the smallest with [`order_key32`] `lo` and
/// the largest with `hi`, is certainly exact (see [`ColumnFacts::exact`]) by its
/// range alone. False when the range does not settle it: the column's own
/// pass decides then. Every value is a multiple of 2^(e - 150) for the biased
/// exponent e of the smallest magnitude (2^-149 below the normal range), and
/// their magnitudes add up to at most `n` times the largest.
fn exact_by_range32(lo: u32, hi: u32, n: usize) -> bool {
    let (lo, hi) = (value_of_key32(lo), value_of_key32(hi));
    let (smallest, largest) = if lo > 0.0 {
        (lo, hi)
    } else if hi < 0.0 {
        (-hi, -lo)
    } else {
        return false; // both signs: the smallest magnitude is not at either end
    };
    let e = ((smallest.to_bits() >> 23) & 0xff) as i32;
    let q = if e == 0 { -149 } else { e - 150 };
    largest.is_finite() && exact_bound(n == 0, q, n as f64 * largest as f64)
}

fn exact_bound(empty: bool, q: i32, total: f64) -> bool {
    if empty {
        return true;
    }
    // `total` itself carries a relative rounding error below len * 2^-53.
    let bound = total * (1.0 + 1e-6);
    q + 53 <= 1023 && bound < 2f64.powi(q + 53)
}

/// Whether any sum of a subset of `values` (and any difference of two such sums)
/// is exact in f64: all are multiples of 2^q (q the lowest set bit over all
/// values) and their magnitudes add up to less than 2^(53 + q).
#[cfg(test)]
fn sums_are_exact<T: Float>(values: &[Entry<T>]) -> bool {
    column_facts(values).exact
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
            assert_eq!(a.by_value, s.by_value);
            assert_eq!(a.n_neg, s.n_neg);
        }
        for c in 0..30 {
            let col = a.colptr[c]..a.colptr[c + 1];
            let es = &a.by_value[col];
            assert!(es.iter().all(|e| e.val != 0.0));
            for e in es {
                assert_eq!(e.val, dense[(e.row & !TIE_START) as usize * 30 + c]);
            }
            let sorted: Vec<f32> = es.iter().map(|e| e.val).collect();
            assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
            for (k, e) in es.iter().enumerate() {
                let starts = k == 0 || sorted[k] != sorted[k - 1];
                assert_eq!(starts, e.row & TIE_START != 0);
                if !starts {
                    assert!(es[k - 1].row & !TIE_START < e.row, "ties in row order");
                }
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
        let order = |rows: Vec<u32>| {
            rows.iter()
                .map(|r| (r & !TIE_START) as usize)
                .collect::<Vec<_>>()
        };
        let rows32 = order(a.by_value.iter().map(|e| e.row).collect());
        assert_eq!(rows32, order(b.by_value.iter().map(|e| e.row).collect()));
        let sorted: Vec<f32> = rows32.iter().map(|&r| data[r]).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        let vals32: Vec<f32> = a.by_value.iter().map(|e| e.val).collect();
        assert_eq!(vals32, sorted, "every bit of each value comes back");
        let vals64: Vec<f64> = b.by_value.iter().map(|e| e.val).collect();
        assert_eq!(vals64, sorted.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(a.by_value.iter().all(|e| e.row & TIE_START != 0));
        assert_eq!(a.n_neg[0], 3);
    }

    /// The straightforward build: every column's entries collected in row order,
    /// then sorted by (value, row).
    fn reference<T: Float>(
        indptr: &[i64],
        indices: &[i32],
        data: &[T],
        n_rows: usize,
        n_cols: usize,
    ) -> SortedCsc<T> {
        let mut cols: Vec<Vec<(u32, T)>> = vec![Vec::new(); n_cols];
        for r in 0..n_rows {
            for j in indptr[r] as usize..indptr[r + 1] as usize {
                if data[j].to_f64() != 0.0 {
                    cols[indices[j] as usize].push((r as u32, data[j]));
                }
            }
        }
        let mut m = SortedCsc {
            n_rows,
            n_cols,
            colptr: vec![0],
            by_value: vec![],
            row_ptr: vec![0],
            row_order: vec![],
            n_neg: vec![],
            exact: vec![],
            nonneg_integers: data
                .iter()
                .all(|v| v.to_f64() >= 0.0 && !v.is_sign_negative() && v.to_f64().fract() == 0.0),
        };
        for col in &cols {
            let vs: Vec<T> = col.iter().map(|e| e.1).collect();
            let mut order: Vec<(f64, u32)> = col.iter().map(|e| (e.1.to_f64(), e.0)).collect();
            order.sort_by(|a, b| a.partial_cmp(b).unwrap());
            for (k, &(v, r)) in order.iter().enumerate() {
                let starts = k == 0 || v != order[k - 1].0;
                m.by_value.push(Entry {
                    row: if starts { r | TIE_START } else { r },
                    val: T::from_f64(v),
                });
            }
            m.colptr.push(m.by_value.len());
            let es: Vec<Entry<T>> = col.iter().map(|e| Entry { row: e.0, val: e.1 }).collect();
            let exact = sums_are_exact(&es);
            if !exact {
                m.row_order.extend_from_slice(&es);
            }
            m.row_ptr.push(m.row_order.len());
            m.n_neg
                .push(vs.iter().filter(|v| v.to_f64() < 0.0).count() as u32);
            m.exact.push(exact);
        }
        m
    }

    fn assert_same<T: Float + std::fmt::Debug>(a: &SortedCsc<T>, b: &SortedCsc<T>) {
        assert_eq!((a.n_rows, a.n_cols), (b.n_rows, b.n_cols));
        assert_eq!(a.colptr, b.colptr);
        let rows = |es: &[Entry<T>]| es.iter().map(|e| e.row).collect::<Vec<_>>();
        let bits = |es: &[Entry<T>]| {
            es.iter()
                .map(|e| e.val.to_f64().to_bits())
                .collect::<Vec<_>>()
        };
        for (x, y) in [(&a.by_value, &b.by_value), (&a.row_order, &b.row_order)] {
            assert_eq!(rows(x), rows(y));
            assert_eq!(bits(x), bits(y));
        }
        assert_eq!(a.row_ptr, b.row_ptr);
        assert_eq!(a.n_neg, b.n_neg);
        assert_eq!(a.exact, b.exact);
        assert_eq!(a.nonneg_integers, b.nonneg_integers);
    }

    /// Random matrices whose columns mix every sort path: few distinct values
    /// (counting), many (radix / comparison sort), short columns, empty columns,
    /// negatives, -0.0, explicit zeros, values equal up to the last bit.
    #[test]
    fn matches_the_straightforward_build() {
        use crate::kernels::test_util::Lcg;
        for (seed, &(n_rows, n_cols, density)) in [
            (0usize, 0usize, 0.5f64),
            (1, 0, 0.5),
            (1, 1, 1.0),
            (7, 3, 0.9),
            (300, 40, 0.5),
            (2000, 70, 0.3),
            (5000, 9, 0.9),
            (40000, 5, 0.05),
            (20000, 30, 0.2),
        ]
        .iter()
        .enumerate()
        {
            let mut rng = Lcg(seed as u64 + 11);
            let mut indptr = vec![0i64];
            let mut indices = Vec::new();
            let mut data = Vec::new();
            for _ in 0..n_rows {
                for c in 0..n_cols {
                    // Column c % 7 == 6 stays empty.
                    if c % 7 != 6 && rng.unit() < density {
                        indices.push(c as i32);
                        let v = match (c % 7, rng.below(12)) {
                            (_, 0) => 0.0,
                            (_, 1) => -0.0,
                            (0, _) => (rng.below(3 + c as u64) as f64 + 1.0).ln_1p(),
                            (1, _) => rng.below(400) as f64 - 100.0,
                            (2, k) => 1.0 + k as f64 * f64::EPSILON - rng.below(2) as f64 * 2.0,
                            // One sign only, many distinct values: exact, or (one
                            // tiny value among large ones) not exact.
                            (4, _) => -(rng.unit() * 1e4 + 0.5),
                            (5, 2) => 1e-30,
                            (5, _) => rng.unit() * 1e6 + 1.0,
                            _ => (rng.unit() - 0.3) * 10.0,
                        };
                        data.push(v);
                    }
                }
                indptr.push(indices.len() as i64);
            }
            let d32: Vec<f32> = data.iter().map(|&v| v as f32).collect();
            for threads in [1, 2] {
                let a = with_threads(threads, || {
                    from_csr(&indptr, &indices, &data, n_rows, n_cols).unwrap()
                });
                assert_same(&a, &reference(&indptr, &indices, &data, n_rows, n_cols));
                let b = with_threads(threads, || {
                    from_csr(&indptr, &indices, &d32, n_rows, n_cols).unwrap()
                });
                assert_same(&b, &reference(&indptr, &indices, &d32, n_rows, n_cols));
            }
            let pos: Vec<f32> = d32.iter().map(|v| v.abs().round()).collect();
            let m = from_csr(&indptr, &indices, &pos, n_rows, n_cols).unwrap();
            assert_same(&m, &reference(&indptr, &indices, &pos, n_rows, n_cols));
        }
    }

    /// Errors in a matrix spread over many row bands and column groups: the first
    /// NaN or bad column in row order, else the lowest column with a duplicate row.
    #[test]
    fn errors_are_the_first_in_order() {
        let m = random_csr(5, 5000, 40, 0.5);
        // (Rows 7k + 3 of random_csr are empty; the rows used here are not.)
        let row_start = |r: usize| m.indptr[r] as usize;
        let build = |indices: &[i32], data: &[f64]| {
            with_threads(2, || from_csr(&m.indptr, indices, data, 5000, 40))
        };
        let mut data = m.data.clone();
        data[row_start(3000)] = f64::NAN;
        data[row_start(1201) + 1] = f64::NAN;
        let mut bad_col = m.indices.clone();
        bad_col[row_start(2100)] = 40;
        assert_eq!(
            build(&m.indices, &data).unwrap_err(),
            BuildError::NotANumber { row: 1201 }
        );
        assert!(matches!(
            build(&bad_col, &m.data).unwrap_err(),
            BuildError::Malformed(ref e) if e.contains("row 2100")
        ));
        assert!(matches!(
            build(&bad_col, &data).unwrap_err(),
            BuildError::NotANumber { row: 1201 }
        ));
        // Duplicates: a row storing a column twice (the second entry's column is
        // rewritten to the first's).
        let mut dup = m.indices.clone();
        for r in [4001usize, 2500] {
            let j = row_start(r);
            assert!(row_start(r + 1) - j >= 2);
            dup[j + 1] = dup[j];
        }
        let data: Vec<f64> = m.data.iter().map(|v| v + 1.0).collect();
        let (c4001, c2500) = (m.indices[row_start(4001)], m.indices[row_start(2500)]);
        let expect = if c4001 < c2500 {
            (4001, c4001)
        } else {
            (2500, c2500)
        };
        assert_eq!(
            build(&dup, &data).unwrap_err(),
            BuildError::DuplicateEntry {
                row: expect.0,
                col: expect.1 as usize
            }
        );
    }

    /// CPU time of the process (both threads), a steadier measure than wall time
    /// on a busy machine.
    fn cpu() -> std::time::Duration {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes only the timespec passed.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
        std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    /// `cargo test --release -p autozymed --lib bench_build -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_build() {
        use crate::kernels::test_util::Lcg;
        let (n_rows, n_cols) = (20000usize, 10000usize);
        let mut rng = Lcg(7);
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut d10 = Vec::new();
        let mut dd = Vec::new();
        for _ in 0..n_rows {
            for c in 0..n_cols {
                if rng.below(1000) < 80 {
                    indices.push(c as i32);
                    d10.push(((rng.below(10) + 1) as f32).ln_1p());
                    dd.push((rng.below(1 << 20) as f32) * 1e-3 + 0.01);
                }
            }
            indptr.push(indices.len() as i32);
        }
        for (name, data) in [("ties", &d10), ("distinct", &dd)] {
            for _ in 0..3 {
                let t = std::time::Instant::now();
                let c0 = cpu();
                let m = from_csr(&indptr, &indices, data, n_rows, n_cols).unwrap();
                eprintln!("{name}: build {:?} cpu {:?}", t.elapsed(), cpu() - c0);
                drop(m);
            }
        }
    }

    #[test]
    fn exactness_flag() {
        fn exact<T: Float>(vs: &[T]) -> bool {
            let es: Vec<Entry<T>> = vs.iter().map(|&val| Entry { row: 0, val }).collect();
            sums_are_exact(&es)
        }
        assert!(exact(&[0.5f64, 0.25, 3.0]));
        assert!(!exact(&[1e-30f64, 1.0]));
        assert!(!exact(&[0.1f64, 0.2]));
        assert!(exact(&[1.0f32 / 3.0, 2.0]));
        assert!(!exact(&[f64::INFINITY]));
    }
}
