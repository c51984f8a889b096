//! Per-gene statistics of scanpy's `rank_genes_groups(method="wilcoxon")`, from a
//! [`SortedCsc`], bit-identical to upstream's.
//!
//! Rank sums. Upstream ranks every cell of a gene (`rankdata`: tied values get
//! their average rank, `start + (count + 1) / 2`) and adds the ranks of a group's
//! cells. Here the zeros form one tie block between the negative and the positive
//! values, so only the stored values are visited, in value order. Ranks are
//! multiples of 1/2 and every partial sum stays below 2^52, so every sum is exact
//! in f64 and the order of additions cannot change it.
//!
//! Tie correction. Upstream's numba `_tiecorrect` adds `cnt**3 - cnt` over the tie
//! blocks in increasing value order, starting from 0.0, then returns
//! `1 - total / (n**3 - n)`; singletons add exactly 0. Reproduced term by term,
//! in the same order (`c * c * c` equals numba's power: `c * c` is exact for
//! any realistic cell count, so both round the exact cube once).
//!
//! Sums for the means. Upstream's sparse `_get_mean_var` (numba
//! `sparse_mean_var_minor_axis`) gives row `i` of the sliced matrix to thread
//! `i % n_threads`, whose f64 partial sums add the row's values in row order; the
//! partials are then added in thread order starting from 0.0. The dense path
//! (numpy `mean(axis=0, dtype=float64)` on a C-ordered array) adds rows in order,
//! which is the same with one partial. We keep `slots` partials per group and per
//! group's rest, indexed by each cell's position within the group (or within
//! the rest). Where a column's sums are exact in any order (see
//! `SortedCsc::exact`) the partials are skipped and the rest is the column total
//! minus the group: the same value, computed in one pass.
//!
//! scanpy 1.12.3 and later take the means from one `sc.get.aggregate` instead:
//! each group's values added in f64 in cell order (one partial), the rest derived
//! from the groups' sums by the shim; `rest_stats: false` skips the rest here.

use super::sorted_csc::{Entry, SortedCsc, TIE_START};
use super::Float;
use rayon::prelude::*;

/// A cell in no selected group.
pub const NO_GROUP: u32 = u32::MAX;

/// What to compute.
pub struct Query<'a> {
    /// Group of each cell (`< n_groups`) or [`NO_GROUP`].
    pub group_of_row: &'a [u32],
    pub n_groups: usize,
    /// Ranks over this group's and each other group's cells; else over all cells.
    pub reference: Option<usize>,
    pub tie_correct: bool,
    /// Partial sums per group, as upstream's numba thread count.
    pub slots: usize,
    /// Without a reference: also each group's rest sums and non-zero counts
    /// (scanpy 1.11 sums the rest's own slice; 1.12.3 derives the rest from the
    /// groups' sums, so the shim sends the unselected cells as one more group
    /// and skips this O(values x groups) pass).
    pub rest_stats: bool,
}

/// Results, each `[n_groups x n_genes]` row-major (`tie`: one row without a reference).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub rank_sums: Vec<f64>,
    pub tie: Vec<f64>,
    pub sums: Vec<f64>,
    pub nnz: Vec<u64>,
    /// Only without a reference and with `rest_stats`.
    pub rest_sums: Vec<f64>,
    pub rest_nnz: Vec<u64>,
}

/// Per-cell tables shared by all genes.
struct Tables {
    sizes: Vec<u64>,
    /// Each grouped cell's partial-sum slot within its group.
    own_slot: Vec<u32>,
    /// Without a reference: for each cell and group `g`, the cell's slot within
    /// `g`'s rest, or `slots` (a scratch slot) for the cell's own group.
    rest_slot: Vec<u8>,
}

fn tables(q: &Query<'_>) -> Tables {
    let g_count = q.n_groups;
    let mut sizes = vec![0u64; g_count];
    let mut own_slot = vec![0u32; q.group_of_row.len()];
    for (r, &g) in q.group_of_row.iter().enumerate() {
        if let Some(size) = sizes.get_mut(g as usize) {
            own_slot[r] = (*size % q.slots as u64) as u32;
            *size += 1;
        }
    }
    let mut rest_slot = Vec::new();
    if q.reference.is_none() && q.rest_stats {
        rest_slot = vec![0u8; q.group_of_row.len() * g_count];
        let mut rest_pos = vec![0u64; g_count];
        for (r, &own) in q.group_of_row.iter().enumerate() {
            let row = &mut rest_slot[r * g_count..(r + 1) * g_count];
            for (g, (slot, pos)) in row.iter_mut().zip(rest_pos.iter_mut()).enumerate() {
                if g as u32 == own {
                    *slot = q.slots as u8;
                } else {
                    *slot = (*pos % q.slots as u64) as u8;
                    *pos += 1;
                }
            }
        }
    }
    Tables {
        sizes,
        own_slot,
        rest_slot,
    }
}

/// `c**3 - c` as upstream's tie correction computes it.
fn tie_term(count: u64) -> f64 {
    let c = count as f64;
    c * c * c - c
}

fn tie_factor(total: f64, size: u64) -> f64 {
    if size < 2 {
        return 1.0;
    }
    let n = size as f64;
    1.0 - total / (n * n * n - n)
}

/// Average rank of a tie block of `count` cells after `before` cells.
fn average_rank(before: u64, count: u64) -> f64 {
    before as f64 + (count as f64 + 1.0) * 0.5
}

/// Per-gene scratch, reused across the genes of one task.
struct Scratch {
    partial: Vec<f64>,
    rest_partial: Vec<f64>,
    count: Vec<u64>,
    nnz: Vec<u64>,
    before: Vec<u64>,
    /// Without a reference: twice each group's rank sum over the stored values.
    twice_rank: Vec<u64>,
    touched: Vec<usize>,
}

/// Runs the query. `q.group_of_row` must have one entry per row of `m`, every
/// entry `< n_groups` or [`NO_GROUP`], `slots` in `1..=255`, and `reference`
/// `< n_groups` (the caller checks).
pub fn wilcoxon_stats<T: Float>(m: &SortedCsc<T>, q: &Query<'_>) -> Stats {
    assert_eq!(q.group_of_row.len(), m.n_rows, "one group entry per row");
    assert!((1..=255).contains(&q.slots), "slots in 1..=255");
    let t = tables(q);
    let g_count = q.n_groups;
    let tie_rows = if q.reference.is_none() { 1 } else { g_count };
    let rest = q.reference.is_none() && q.rest_stats;
    // Per gene: rank sums, tie factors, sums, nnz, rest sums, rest nnz.
    let width = g_count * if rest { 5 } else { 3 } + tie_rows;
    let n_genes = m.n_cols;
    let mut record = vec![0f64; n_genes * width];
    record
        .par_chunks_mut(width)
        .enumerate()
        .with_min_len(16)
        .for_each_init(
            || Scratch {
                partial: vec![0.0; g_count * q.slots],
                rest_partial: vec![0.0; g_count * (q.slots + 1)],
                count: vec![0; g_count],
                nnz: vec![0; g_count],
                before: vec![0; g_count],
                twice_rank: vec![0; g_count],
                touched: Vec::with_capacity(g_count),
            },
            |s, (c, out)| gene(m, q, &t, c, s, out),
        );
    let field = |k: usize, rows: usize| -> Vec<f64> {
        let mut v = vec![0.0; rows * n_genes];
        for (c, rec) in record.chunks(width).enumerate() {
            for g in 0..rows {
                v[g * n_genes + c] = rec[k + g];
            }
        }
        v
    };
    let to_u64 = |v: Vec<f64>| v.into_iter().map(|x| x as u64).collect::<Vec<u64>>();
    let (rank_at, tie_at, sums_at) = (0, g_count, g_count + tie_rows);
    let nnz_at = sums_at + g_count;
    Stats {
        rank_sums: field(rank_at, g_count),
        tie: field(tie_at, tie_rows),
        sums: field(sums_at, g_count),
        nnz: to_u64(field(nnz_at, g_count)),
        rest_sums: if rest {
            field(nnz_at + g_count, g_count)
        } else {
            vec![]
        },
        rest_nnz: if rest {
            to_u64(field(nnz_at + 2 * g_count, g_count))
        } else {
            vec![]
        },
    }
}

#[allow(clippy::needless_range_loop)] // parallel per-group arrays
/// One gene's record: `[rank sums | tie | sums | nnz | rest sums | rest nnz]`.
fn gene<T: Float>(
    m: &SortedCsc<T>,
    q: &Query<'_>,
    t: &Tables,
    c: usize,
    s: &mut Scratch,
    out: &mut [f64],
) {
    let g_count = q.n_groups;
    let slots = q.slots;
    let tie_rows = if q.reference.is_none() { 1 } else { g_count };
    // Rest sums and counts are wanted (they follow `nnz` in `out`).
    let rest = q.reference.is_none() && q.rest_stats;
    let (rank, tail) = out.split_at_mut(g_count);
    let (tie, tail) = tail.split_at_mut(tie_rows);
    let (sums, tail) = tail.split_at_mut(g_count);
    let (nnz, tail) = tail.split_at_mut(g_count);
    let (lo, hi) = (m.colptr[c], m.colptr[c + 1]);
    let sorted = &m.by_value[lo..hi];
    let group = |r: u32| q.group_of_row.get(r as usize).copied().unwrap_or(NO_GROUP);

    // Sums and non-zero counts. Where the column's sums are exact they may add in
    // any order: without a reference they are taken in the rank pass below (one
    // pass over the column), with one in a value-order pass before it (the zero
    // block there needs each group's count). Otherwise in row order, from the
    // column's row-order copy, as upstream adds them.
    let fused = m.exact[c] && q.reference.is_none();
    s.count.iter_mut().for_each(|x| *x = 0);
    sums.iter_mut().for_each(|x| *x = 0.0);
    if !m.exact[c] {
        s.partial.iter_mut().for_each(|x| *x = 0.0);
        s.rest_partial.iter_mut().for_each(|x| *x = 0.0);
        for e in &m.row_order[m.row_ptr[c]..m.row_ptr[c + 1]] {
            let (r, v) = (e.row, e.val.to_f64());
            let g = group(r);
            let r = r as usize;
            if (g as usize) < g_count {
                s.partial[g as usize * slots + t.own_slot[r] as usize] += v;
                s.count[g as usize] += 1;
            }
            if rest {
                let row = &t.rest_slot[r * g_count..(r + 1) * g_count];
                for (h, &slot) in row.iter().enumerate() {
                    s.rest_partial[h * (slots + 1) + slot as usize] += v;
                }
            }
        }
        for (g, x) in sums.iter_mut().enumerate() {
            *x = s.partial[g * slots..(g + 1) * slots]
                .iter()
                .fold(0.0, |a, &p| a + p);
        }
        if rest {
            let (rest_sums, _) = tail.split_at_mut(g_count);
            for (g, x) in rest_sums.iter_mut().enumerate() {
                let p = &s.rest_partial[g * (slots + 1)..g * (slots + 1) + slots];
                *x = p.iter().fold(0.0, |a, &p| a + p);
            }
        }
    } else if !fused {
        for e in sorted {
            let g = group(e.row & !TIE_START) as usize;
            if let Some(x) = sums.get_mut(g) {
                *x += e.val.to_f64();
                s.count[g] += 1;
            }
        }
    }
    let col_nnz = (hi - lo) as u64;

    // Rank sums and tie terms, in value order.
    let n_neg = (m.n_neg[c] as usize).min(sorted.len());
    rank.iter_mut().for_each(|x| *x = 0.0);
    tie.iter_mut().for_each(|x| *x = 0.0);
    let group_of = |e: &Entry<T>| group(e.row & !TIE_START) as usize;
    match q.reference {
        None => {
            let n = m.n_rows as u64;
            let zeros = n - col_nnz;
            let mut before = 0u64;
            let mut tie_total = 0.0f64;
            // The values of cells in no selected group: with the groups' sums,
            // the column total for the rest's sums (exact in any order). Only
            // these are added here, so no f64 add chains from one value to
            // the next.
            let mut ungrouped = 0.0f64;
            // Twice each group's rank sum, in integers: one integer add a value
            // instead of a chain of dependent f64 adds. Halved into f64 below,
            // the same value as adding the ranks in f64 (every such sum is exact).
            s.twice_rank.iter_mut().for_each(|x| *x = 0);
            let twice_rank = &mut s.twice_rank;
            let mut add_block =
                |entries: &[Entry<T>], sums: &mut [f64], before: &mut u64, tie_total: &mut f64| {
                    let cnt = entries.len() as u64;
                    // Twice the average rank `before + (cnt + 1) / 2`.
                    let avg2 = 2 * *before + cnt + 1;
                    if cnt > 1 && q.tie_correct {
                        *tie_total += tie_term(cnt);
                    }
                    for e in entries {
                        let g = group_of(e);
                        if let Some(x) = twice_rank.get_mut(g) {
                            *x += avg2;
                            if fused {
                                sums[g] += e.val.to_f64();
                                s.count[g] += 1;
                            }
                        } else if fused {
                            ungrouped += e.val.to_f64();
                        }
                    }
                    *before += cnt;
                };
            tie_blocks(sorted, 0..n_neg, |entries| {
                add_block(entries, sums, &mut before, &mut tie_total)
            });
            // The zero block: its tie term here, in value order; its rank sums
            // below, once each group's count is known (rank sums are exact in
            // any order).
            let zero_rank = average_rank(before, zeros);
            if q.tie_correct && zeros > 1 {
                tie_total += tie_term(zeros);
            }
            before += zeros;
            tie_blocks(sorted, n_neg..sorted.len(), |entries| {
                add_block(entries, sums, &mut before, &mut tie_total)
            });
            for (x, &r2) in rank.iter_mut().zip(s.twice_rank.iter()) {
                *x = r2 as f64 * 0.5;
            }
            // Each group's non-zero count: taken in the pass above when fused,
            // else before it.
            s.nnz.copy_from_slice(&s.count);
            if zeros > 0 {
                for (g, x) in rank.iter_mut().enumerate() {
                    *x += (t.sizes[g] - s.nnz[g]) as f64 * zero_rank;
                }
            }
            if rest && m.exact[c] {
                let total = sums.iter().fold(ungrouped, |a, &x| a + x);
                let (rest_sums, _) = tail.split_at_mut(g_count);
                for (rs, &gs) in rest_sums.iter_mut().zip(sums.iter()) {
                    *rs = total - gs;
                }
            }
            tie[0] = if q.tie_correct {
                tie_factor(tie_total, n)
            } else {
                1.0
            };
        }
        Some(reference) => {
            // `count` becomes each tie block's tally below.
            s.nnz.copy_from_slice(&s.count);
            s.before.iter_mut().for_each(|x| *x = 0);
            s.count.iter_mut().for_each(|x| *x = 0);
            let sizes = &t.sizes;
            let tally = |entries: &[Entry<T>], s: &mut Scratch| {
                s.touched.clear();
                for e in entries {
                    let g = group_of(e);
                    if g < g_count {
                        if s.count[g] == 0 {
                            s.touched.push(g);
                        }
                        s.count[g] += 1;
                    }
                }
            };
            tie_blocks(sorted, 0..n_neg, |entries| {
                tally(entries, s);
                pair_block(q, reference, s, rank, tie);
            });
            // The zero block: every group's cells without a stored value.
            s.touched.clear();
            for g in 0..g_count {
                let z = sizes[g] - s.nnz[g];
                if z > 0 {
                    s.count[g] = z;
                    s.touched.push(g);
                }
            }
            pair_block(q, reference, s, rank, tie);
            tie_blocks(sorted, n_neg..sorted.len(), |entries| {
                tally(entries, s);
                pair_block(q, reference, s, rank, tie);
            });
            for (g, x) in tie.iter_mut().enumerate() {
                *x = if q.tie_correct && g != reference {
                    tie_factor(*x, sizes[g] + sizes[reference])
                } else {
                    1.0
                };
            }
            rank[reference] = 0.0;
        }
    }
    for (x, &k) in nnz.iter_mut().zip(&s.nnz) {
        *x = k as f64;
    }
    if rest {
        let (_, rest_nnz) = tail.split_at_mut(g_count);
        for (x, &k) in rest_nnz.iter_mut().zip(&s.nnz) {
            *x = (col_nnz - k) as f64;
        }
    }
}

/// Calls `f` on each tie block of `sorted[range]`, in order (each block's first
/// entry is flagged). Generic rather than `dyn`, and inlined (measured: without
/// it the query took ~20% more CPU): `f` runs once per block, and for continuous
/// data nearly every block is one cell.
#[inline(always)]
fn tie_blocks<T>(
    sorted: &[Entry<T>],
    range: std::ops::Range<usize>,
    mut f: impl FnMut(&[Entry<T>]),
) {
    let mut i = range.start;
    while i < range.end {
        let mut j = i + 1;
        while j < range.end && sorted[j].row & TIE_START == 0 {
            j += 1;
        }
        f(&sorted[i..j]);
        i = j;
    }
}

#[allow(clippy::needless_range_loop)] // parallel per-group arrays
/// One tie block with a reference group: `s.count[g]` cells of each group in
/// `s.touched`, after `s.before[g]` cells of each group. For each group `g`
/// compared with the reference `R`, the block holds `count[g] + count[R]` of the
/// pair's cells after `before[g] + before[R]`. `tie` holds running tie totals here.
fn pair_block(q: &Query<'_>, reference: usize, s: &mut Scratch, rank: &mut [f64], tie: &mut [f64]) {
    let cr = s.count[reference];
    let br = s.before[reference];
    for &g in &s.touched {
        if g == reference {
            continue;
        }
        let cg = s.count[g];
        rank[g] += cg as f64 * average_rank(s.before[g] + br, cg + cr);
        if q.tie_correct && cg + cr > 1 {
            tie[g] += tie_term(cg + cr);
        }
    }
    if q.tie_correct && cr > 1 {
        // Groups without cells in this block still tie the reference's cells.
        for g in 0..q.n_groups {
            if g != reference && s.count[g] == 0 {
                tie[g] += tie_term(cr);
            }
        }
    }
    for &g in &s.touched {
        s.before[g] += s.count[g];
        s.count[g] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sorted_csc::from_dense;
    use crate::kernels::test_util::{with_threads, Lcg};

    /// Upstream's computation, literally: dense ranks over the chosen cells,
    /// sums of a group's ranks, the sequential tie sum, the per-thread partials.
    fn reference_stats(
        dense: &[f64],
        n_rows: usize,
        n_cols: usize,
        groups: &[u32],
        n_groups: usize,
        reference: Option<usize>,
        slots: usize,
    ) -> Stats {
        let rank_over = |cells: &[usize], c: usize| -> (Vec<f64>, f64) {
            let mut order: Vec<usize> = (0..cells.len()).collect();
            let val = |i: usize| dense[cells[i] * n_cols + c];
            order.sort_by(|&a, &b| val(a).partial_cmp(&val(b)).unwrap());
            let mut ranks = vec![0.0; cells.len()];
            let mut tie = 0.0f64;
            let mut i = 0;
            while i < order.len() {
                let mut j = i + 1;
                while j < order.len() && val(order[j]) == val(order[i]) {
                    j += 1;
                }
                for &k in &order[i..j] {
                    ranks[k] = 0.5 * ((j + i + 1) as f64);
                }
                let cnt = (j - i) as f64;
                tie += cnt * cnt * cnt - cnt;
                i = j;
            }
            let n = cells.len() as f64;
            let tc = if cells.len() >= 2 {
                1.0 - tie / (n * n * n - n)
            } else {
                1.0
            };
            (ranks, tc)
        };
        let members =
            |g: usize| -> Vec<usize> { (0..n_rows).filter(|&r| groups[r] == g as u32).collect() };
        let ordered_sum = |cells: &[usize], c: usize| -> f64 {
            let mut p = vec![0.0f64; slots];
            for (i, &r) in cells.iter().enumerate() {
                let v = dense[r * n_cols + c];
                if v != 0.0 {
                    p[i % slots] += v;
                }
            }
            p.iter().fold(0.0, |a, &b| a + b)
        };
        let mut st = Stats {
            rank_sums: vec![0.0; n_groups * n_cols],
            tie: vec![0.0; if reference.is_none() { 1 } else { n_groups } * n_cols],
            sums: vec![0.0; n_groups * n_cols],
            nnz: vec![0; n_groups * n_cols],
            rest_sums: vec![],
            rest_nnz: vec![],
        };
        if reference.is_none() {
            st.rest_sums = vec![0.0; n_groups * n_cols];
            st.rest_nnz = vec![0; n_groups * n_cols];
        }
        let all: Vec<usize> = (0..n_rows).collect();
        for c in 0..n_cols {
            for g in 0..n_groups {
                let cells = members(g);
                st.sums[g * n_cols + c] = ordered_sum(&cells, c);
                st.nnz[g * n_cols + c] = cells
                    .iter()
                    .filter(|&&r| dense[r * n_cols + c] != 0.0)
                    .count() as u64;
                if let Some(rf) = reference {
                    if g == rf {
                        st.tie[g * n_cols + c] = 1.0;
                        continue;
                    }
                    let mut both = cells.clone();
                    both.extend(members(rf));
                    let (ranks, tc) = rank_over(&both, c);
                    st.rank_sums[g * n_cols + c] = ranks[..cells.len()].iter().sum();
                    st.tie[g * n_cols + c] = tc;
                } else {
                    let (ranks, tc) = rank_over(&all, c);
                    st.rank_sums[g * n_cols + c] = cells.iter().map(|&r| ranks[r]).sum();
                    st.tie[c] = tc;
                    let others: Vec<usize> = all
                        .iter()
                        .copied()
                        .filter(|&r| groups[r] != g as u32)
                        .collect();
                    st.rest_sums[g * n_cols + c] = ordered_sum(&others, c);
                    st.rest_nnz[g * n_cols + c] = others
                        .iter()
                        .filter(|&&r| dense[r * n_cols + c] != 0.0)
                        .count() as u64;
                }
            }
        }
        st
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_literal_upstream() {
        let mut rng = Lcg(11);
        for &(n_rows, n_cols, n_groups) in &[(40usize, 7usize, 3usize), (203, 11, 5), (9, 3, 2)] {
            // Ties (small integers), negatives, zeros, an all-zero gene, and
            // non-exact values (thirds, tiny ones) so both sum paths are used.
            let mut dense = vec![0.0f64; n_rows * n_cols];
            for r in 0..n_rows {
                for c in 1..n_cols {
                    dense[r * n_cols + c] = match rng.below(6) {
                        0 | 1 => 0.0,
                        2 => rng.below(4) as f64,
                        3 => -(rng.below(3) as f64),
                        4 if c % 2 == 0 => rng.unit() / 3.0 + 1e-9 * rng.unit(),
                        _ => (rng.below(5) as f64) * 0.5,
                    };
                }
            }
            let groups: Vec<u32> = (0..n_rows)
                .map(|r| {
                    if r % 13 == 5 {
                        NO_GROUP
                    } else {
                        (rng.below(n_groups as u64) as u32 + (r % 2) as u32) % n_groups as u32
                    }
                })
                .collect();
            let m = from_dense(&dense, n_rows, n_cols).unwrap();
            for reference in [None, Some(1)] {
                for (slots, rest_stats) in [(1usize, true), (2, true), (3, true), (1, false)] {
                    let mut want = reference_stats(
                        &dense, n_rows, n_cols, &groups, n_groups, reference, slots,
                    );
                    if !rest_stats {
                        want.rest_sums.clear();
                        want.rest_nnz.clear();
                    }
                    for threads in [1, 2] {
                        let q = Query {
                            group_of_row: &groups,
                            n_groups,
                            reference,
                            tie_correct: true,
                            slots,
                            rest_stats,
                        };
                        let got = with_threads(threads, || wilcoxon_stats(&m, &q));
                        let what = format!(
                            "{n_rows}x{n_cols} ref {reference:?} slots {slots} rest {rest_stats}"
                        );
                        assert_eq!(bits(&got.rank_sums), bits(&want.rank_sums), "ranks {what}");
                        assert_eq!(bits(&got.tie), bits(&want.tie), "tie {what}");
                        assert_eq!(bits(&got.sums), bits(&want.sums), "sums {what}");
                        assert_eq!(got.nnz, want.nnz, "nnz {what}");
                        assert_eq!(bits(&got.rest_sums), bits(&want.rest_sums), "rest {what}");
                        assert_eq!(got.rest_nnz, want.rest_nnz, "rest nnz {what}");
                    }
                }
            }
        }
    }
}

/// The timing tests' request: scanpy 1.12's defaults (reference "rest", no tie
/// correction, one partial sum, no rest statistics) over 9 groups.
#[cfg(test)]
pub(crate) fn nine_groups_query(groups: &[u32]) -> Query<'_> {
    Query {
        group_of_row: groups,
        n_groups: 9,
        reference: None,
        tie_correct: false,
        slots: 1,
        rest_stats: false,
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::kernels::sorted_csc::from_csr;
    use crate::kernels::test_util::Lcg;

    /// Build and query on a saved CSR matrix (see `test_util::saved_csr`), 9
    /// unequal groups, scanpy 1.12's request: `RGG_BIN=DIR cargo test --release
    /// -p autozymed timing_saved -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_saved() {
        let (indptr, indices, data, m) = crate::kernels::test_util::saved_csr();
        let n = indptr.len() - 1;
        let groups = crate::kernels::test_util::unequal_groups(n);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let s = from_csr(&indptr, &indices, &data, n, m).unwrap();
            let built = t.elapsed();
            let q = nine_groups_query(&groups);
            let t = std::time::Instant::now();
            let st = wilcoxon_stats(&s, &q);
            eprintln!(
                "build {built:?} query {:?} {}",
                t.elapsed(),
                st.rank_sums[5]
            );
        }
    }

    /// `cargo test --release -p autozymed timing_20k -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing_20k() {
        let (n, m, density) = (20_000usize, 20_000usize, 0.07);
        let mut rng = Lcg(5);
        let mut indptr = vec![0i64];
        let mut indices = Vec::new();
        let mut data = Vec::new();
        for _ in 0..n {
            for c in 0..m {
                if rng.unit() < density {
                    indices.push(c as i32);
                    data.push(((rng.below(20) + 1) as f32).ln_1p());
                }
            }
            indptr.push(indices.len() as i64);
        }
        let groups: Vec<u32> = (0..n).map(|_| rng.below(12) as u32).collect();
        let t = std::time::Instant::now();
        let s = from_csr(&indptr, &indices, &data, n, m).unwrap();
        eprintln!(
            "build {:?} ({} nnz, exact cols {})",
            t.elapsed(),
            s.nnz(),
            s.exact.iter().filter(|&&e| e).count()
        );
        for reference in [None, Some(0)] {
            let q = Query {
                group_of_row: &groups,
                n_groups: 12,
                reference,
                tie_correct: true,
                slots: 2,
                rest_stats: true,
            };
            let t = std::time::Instant::now();
            let st = wilcoxon_stats(&s, &q);
            eprintln!(
                "query ref {reference:?} {:?} {}",
                t.elapsed(),
                st.rank_sums[5]
            );
        }
    }
}
