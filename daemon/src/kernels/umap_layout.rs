//! umap's layout optimisation, as `sc.tl.umap` runs it: umap-learn's
//! `optimize_layout_euclidean` (0.5.x) with `move_other`, no densMAP, one
//! thread (upstream runs it single-threaded whenever a seed is set, which
//! scanpy always does), bit for bit, here on several threads.
//!
//! **The arithmetic** is what numba (fastmath) compiles upstream's epoch
//! function to on an x86-64 CPU with FMA, read from its assembly, for an
//! embedding of fewer than 4 dimensions (from 4 on, the distance and from 8 the
//! update run as vector loops in another order; such calls are refused):
//!
//! - the squared distance is an f32 FMA chain over the dimensions from 0;
//! - an attraction `(pow(d, b - 1) · (-2b·a)) / fma(pow(d, b), a, 1)` for d > 0,
//!   each coordinate's step `alpha · clip(g · (x - y))` added to the head's f32
//!   coordinate in f64 and taken from the tail's;
//! - a repulsion `2γb / fma(s, pow(d, b)·a, s)` with `s = d + 0.001`, applied
//!   only when positive, each coordinate `fma(alpha, clip(g · (x - y)), x)`;
//! - `clip` is `min(max(-4, t), 4)` as MAXSD/MINSD compute it (a NaN gives 4);
//! - the count of negative samples is truncated by CVTTSD2SI (out of range or
//!   NaN gives i64::MIN, so none), and the next negative epoch moves by
//!   `fma(epochs_per_negative_sample, count, next)`.
//!
//! `pow` is the C library's, which numba calls too. The caller checks that the
//! results equal upstream's on this machine before trusting them (the shim runs
//! both on a small graph once per process).
//!
//! **Tasks, exactly.** Each epoch visits the edges in order, grouped in runs of
//! one head vertex (the edges come row-sorted from a CSR graph). A run is a task;
//! tasks are numbered epoch by epoch. What a task reads and writes is known
//! before it runs: its head and its edges' tails are moved, and its negative
//! samples are read. The samples come from the head vertex's own random state,
//! which only that vertex's tasks advance, so they can be drawn (with the
//! edges' epoch bookkeeping, which depends on no position) before any position
//! is known. Two tasks conflict when one writes a row the other touches; tasks
//! that do not may run in any order, or at once, and each still sees exactly
//! the coordinates the sequential order gives it.
//!
//! **Within a thread**, every link of a task (an attraction, a negative sample)
//! waits for the previous link's `pow`, so the core idles most of the time: up
//! to three tasks that do not conflict run interleaved, one link each in turn
//! (`run_group`), and each one's `pow` fills the others' waits.
//!
//! **Two threads** take chunks of consecutive tasks, draw them, and announce
//! them in chunk order. A task waits for the other thread's tasks of its
//! running chunk that conflict with it, and runs out of order past a waiting
//! task it does not conflict with. Each thread works on its own copy of the
//! embedding and logs the rows its tasks wrote; it replays the other's log
//! before using what the other wrote. (One shared embedding was no faster than
//! one thread: its cache lines moved between the cores on almost every access.
//! See docs/umap.md.)

use super::SparseIndex;
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// The scalars of one call, as upstream receives them.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub a: f64,
    pub b: f64,
    pub gamma: f64,
    pub initial_alpha: f64,
    pub negative_sample_rate: f64,
    pub n_epochs: u64,
    /// The three int64 words upstream draws for `rng_state`.
    pub rng_state: [i64; 3],
}

/// Most dimensions whose arithmetic is the scalar code described above.
pub const MAX_DIM: usize = 3;

/// Runs the optimisation on `embedding` (`n × dim`, row-major, rewritten in
/// place) for the graph edges `head[i] → tail[i]`. `Err` names why a call is not
/// served; the embedding is then untouched.
pub fn optimize<I: SparseIndex>(
    embedding: &mut [f32],
    dim: usize,
    head: &[I],
    tail: &[I],
    epochs_per_sample: &[f64],
    params: &Params,
    threads: usize,
) -> Result<(), String> {
    let plan = Plan::new(embedding, dim, head, tail, epochs_per_sample, params)?;
    if !fma_available() {
        return Err("the CPU has no FMA (numba's code would differ)".into());
    }
    // The mutable state, as upstream keeps it: per edge `epoch_of_next_sample`
    // and `epoch_of_next_negative_sample`, per run its head's random state
    // (umap's `rng_state + head_embedding[:, 0].astype(float64).view(int64)`).
    // Each epoch reads every edge's next sample, so that array is on its own.
    let mut next_sample = plan.epochs_per_sample.to_vec();
    let mut next_negative = plan.epochs_per_negative_sample.clone();
    let mut rng: Vec<i64> = Vec::with_capacity(3 * plan.runs.len());
    for &(start, _) in &plan.runs {
        let bits = (embedding[plan.heads[start] as usize * dim] as f64).to_bits() as i64;
        rng.extend(plan.rng_state.map(|s| s.wrapping_add(bits)));
    }
    let state = State {
        next_sample: SharedSlice::new(&mut next_sample),
        next_negative: SharedSlice::new(&mut next_negative),
        rng: SharedSlice::new(&mut rng),
        slots: [Slot::new(dim), Slot::new(dim)],
        chunk: CHUNK.min(plan.runs.len() as u64 / 2),
        next: Line(AtomicU64::new(0)),
        announced: Line(AtomicU64::new(0)),
        failed: AtomicBool::new(false),
    };
    // A run's draws must go in epoch order, so two threads need a few runs
    // (two chunks an epoch); chunks are numbered in 32 bits.
    if threads < 2 || plan.runs.len() < 4 || plan.n_tasks() / state.chunk >= u32::MAX as u64 {
        // SAFETY: FMA is available (checked above); one thread.
        unsafe { state.alone(&plan, embedding) };
        return Ok(());
    }
    let start: &[f32] = embedding;
    // Two threads of their own, not the pool's: the pair must run at the same
    // time (each waits for the other), which a busy pool does not promise.
    let (mut result, cursor) = std::thread::scope(|scope| {
        let (state, plan) = (&state, &plan);
        // SAFETY (both): FMA is available (checked above); one thread a slot.
        let other = scope.spawn(move || unsafe { state.work(plan, 1, start) });
        let mine = unsafe { state.work(plan, 0, start) };
        // A panic in either is re-raised here (the other stops on `failed`).
        other
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        mine
    });
    state.slots[1].replay(&mut result, cursor, dim);
    embedding.copy_from_slice(&result);
    Ok(())
}

fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The validated call: runs of edges, per-edge constants, per-epoch learning rates.
struct Plan<'a> {
    n: usize,
    dim: usize,
    /// `(start, end)` of each run of edges with one head vertex.
    runs: Vec<(usize, usize)>,
    heads: Vec<u32>,
    tails: Vec<u32>,
    /// The caller's, borrowed (read-only; the epochs that move are in `State`).
    epochs_per_sample: &'a [f64],
    epochs_per_negative_sample: Vec<f64>,
    /// Learning rate of each epoch.
    alpha: Vec<f64>,
    a: f64,
    b: f64,
    b_minus_one: f64,
    attraction: f64,
    repulsion: f64,
    rng_state: [i64; 3],
}

impl<'a> Plan<'a> {
    fn new<I: SparseIndex>(
        embedding: &[f32],
        dim: usize,
        head: &[I],
        tail: &[I],
        epochs_per_sample: &'a [f64],
        p: &Params,
    ) -> Result<Self, String> {
        if !(1..=MAX_DIM).contains(&dim) {
            return Err(format!("{dim} dimensions (served: 1 to {MAX_DIM})"));
        }
        if !embedding.len().is_multiple_of(dim) {
            return Err("the embedding's length is not a multiple of its dimensions".into());
        }
        let n = embedding.len() / dim;
        if n > u32::MAX as usize {
            return Err(format!("{n} vertices (served: up to 2^32 - 1)"));
        }
        if head.len() != tail.len() || head.len() != epochs_per_sample.len() {
            return Err("head, tail and epochs_per_sample differ in length".into());
        }
        let vertex = |v: I| v.to_usize().filter(|&v| v < n).map(|v| v as u32);
        let heads: Option<Vec<u32>> = head.iter().map(|&v| vertex(v)).collect();
        let tails: Option<Vec<u32>> = tail.iter().map(|&v| vertex(v)).collect();
        let (Some(heads), Some(tails)) = (heads, tails) else {
            return Err("an edge's vertex is outside the embedding".into());
        };
        if heads.windows(2).any(|w| w[0] > w[1]) {
            return Err("the edges are not sorted by head".into());
        }
        // make_epochs_per_sample gives 1 and more for every kept edge; smaller
        // values would make upstream loop (or divide by zero).
        if epochs_per_sample
            .iter()
            .any(|&e| !(1.0..f64::INFINITY).contains(&e))
        {
            return Err("epochs_per_sample outside [1, inf)".into());
        }
        let finite = [p.a, p.b, p.gamma, p.initial_alpha, p.negative_sample_rate];
        if finite.iter().any(|v| !v.is_finite()) || p.a <= 0.0 || p.negative_sample_rate <= 0.0 {
            return Err(
                "a and the negative sample rate must be positive, and a, b, gamma and \
                 alpha finite"
                    .into(),
            );
        }
        // Bounds on the work a request can ask for (upstream's defaults are 200 or
        // 500 epochs and 5 negative samples per edge).
        if p.n_epochs > 1 << 20 {
            return Err(format!("{} epochs", p.n_epochs));
        }
        if p.negative_sample_rate > 1e4 {
            return Err(format!("negative sample rate {}", p.negative_sample_rate));
        }
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=heads.len() {
            if i == heads.len() || heads[i] != heads[start] {
                runs.push((start, i));
                start = i;
            }
        }
        // umap: `alpha = initial_alpha * (1.0 - (float(n) / float(n_epochs)))`
        // after epoch n.
        let epochs = p.n_epochs as usize;
        let mut alpha = Vec::with_capacity(epochs);
        alpha.push(p.initial_alpha);
        for e in 0..epochs.saturating_sub(1) {
            alpha.push(p.initial_alpha * (1.0 - (e as f64 / p.n_epochs as f64)));
        }
        alpha.truncate(epochs);
        Ok(Plan {
            n,
            dim,
            runs,
            heads,
            tails,
            epochs_per_sample,
            epochs_per_negative_sample: epochs_per_sample
                .iter()
                .map(|e| e / p.negative_sample_rate)
                .collect(),
            alpha,
            a: p.a,
            b: p.b,
            // The constants as numba hoists them out of the loop.
            b_minus_one: p.b + -1.0,
            attraction: (p.b * -2.0) * p.a,
            repulsion: (p.gamma + p.gamma) * p.b,
            rng_state: p.rng_state,
        })
    }

    fn n_tasks(&self) -> u64 {
        self.alpha.len() as u64 * self.runs.len() as u64
    }
}

/// A slice the threads share; who may touch which element, when, is the
/// protocol of `State::work` (see the module comment).
struct SharedSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: every element is accessed by one thread at a time, as `State::work`
// arranges: a run's state (its edges' epochs, its head's random state) only by
// the thread drawing one of that run's tasks. Those are a whole epoch (two
// chunks or more) apart, and a thread takes a chunk only after announcing its
// previous one, which waits for the announcement of the chunk before it: when
// a chunk is taken, the one two before it has been drawn (and the taking
// `fetch_add` acquires what its drawing thread released).
unsafe impl<T: Send> Sync for SharedSlice<'_, T> {}

impl<'a, T: Copy> SharedSlice<'a, T> {
    fn new(s: &'a mut [T]) -> Self {
        SharedSlice {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }
    /// # Safety
    /// No other thread writes element `i` meanwhile.
    #[inline(always)]
    unsafe fn get(&self, i: usize) -> T {
        assert!(i < self.len);
        *self.ptr.add(i)
    }
    /// # Safety
    /// No other thread reads or writes element `i` meanwhile.
    #[inline(always)]
    unsafe fn set(&self, i: usize, v: T) {
        assert!(i < self.len);
        *self.ptr.add(i) = v
    }
}

/// What a thread shares with the other: its announced chunk of tasks, and a log
/// of the rows its finished tasks wrote (each thread works on its own copy of the
/// embedding and replays the other's log into it: sharing the embedding's cache
/// lines between two cores costs more than the work).
struct Slot {
    /// The slot's last announced chunk; written only by the owner while it
    /// announces, read only by the other thread while it announces, and
    /// announcements take turns.
    chunk: UnsafeCell<Chunk>,
    /// Stamp (task number + 1) of the slot's last finished task (its log written
    /// first).
    done: Line<AtomicU64>,
    /// A ring of `LOG` entries: the row, then its `dim` coordinates' bits.
    log: Vec<AtomicU32>,
    /// Entries written, and entries the other thread has replayed.
    written: Line<AtomicU64>,
    replayed: Line<AtomicU64>,
}

/// Consecutive tasks taken, drawn and announced together: what each costs in
/// handing over between the cores (a few cache lines) is paid once for all of
/// them. Tasks wait only for the other thread's tasks they conflict with, and
/// others run meanwhile, so a larger chunk costs few waits (the pipeline's layout:
/// 32 and 64 alike, 8 and 16 a little slower; docs/umap.md).
const CHUNK: u64 = 32;

/// Most tasks run interleaved by one thread (each lane's links wait on `pow`;
/// three fill those waits about as far as the CPU's other limits allow).
const LANES: usize = 3;

/// Most pending tasks `Chunk::pick` looks at for a group.
const SCAN: usize = 16;

/// Entries in a slot's log; a thread waits (replaying the other's) when its own
/// is this far ahead of the other thread.
const LOG: u64 = 1 << 14;

/// The drawn tasks of a chunk: per task its head and its ops (`draw`'s format).
#[derive(Default)]
struct Chunk {
    /// Number of the chunk's first task.
    first: u64,
    heads: Vec<u32>,
    /// End of each task's ops in `ops`.
    ends: Vec<usize>,
    ops: Vec<u32>,
}

impl Chunk {
    fn len(&self) -> usize {
        self.heads.len()
    }
    /// Task `j`'s lane.
    fn lane(&self, plan: &Plan<'_>, j: usize) -> Lane<'_> {
        let rows = self.rows(j);
        Lane::new(plan, self.first + j as u64, rows.head, rows.ops)
    }

    /// Chooses into `group` up to `LANES` of the `pending` tasks (in task
    /// order) to run now, interleaved: each one's `needs` (the other thread's
    /// `done`) are met, and it conflicts (writes a row another touches) with no
    /// pending task before it. Looks at `SCAN` tasks at most. `seen` is
    /// per-vertex scratch, `stamp` its last stamp.
    fn pick(
        &self,
        pending: &[usize],
        needs: &[u64],
        done: u64,
        group: &mut Vec<usize>,
        seen: &mut [u64],
        stamp: &mut u64,
    ) {
        group.clear();
        *stamp += 1;
        let mark = *stamp << 1;
        for &j in pending.iter().take(SCAN) {
            let rows = self.rows(j);
            let free = needs[j] <= done
                && !rows.any(|v, writes| {
                    let s = seen[v as usize];
                    s & !1 == mark && (writes || s & 1 == 1)
                });
            if free {
                group.push(j);
                if group.len() == LANES {
                    return;
                }
            }
            rows.each(|v, writes| {
                let s = &mut seen[v as usize];
                *s = if *s & !1 == mark { *s } else { mark } | writes as u64;
            });
        }
    }

    fn rows(&self, j: usize) -> Rows<'_> {
        let start = if j == 0 { 0 } else { self.ends[j - 1] };
        Rows {
            head: self.heads[j],
            ops: &self.ops[start..self.ends[j]],
        }
    }
}

// SAFETY: `chunk` is accessed as its comment says, announcements ordered by
// `State::announced` (release/acquire).
unsafe impl Sync for Slot {}

impl Slot {
    fn new(dim: usize) -> Self {
        Slot {
            chunk: UnsafeCell::new(Chunk::default()),
            done: Line(AtomicU64::new(0)),
            log: (0..LOG as usize * (1 + dim))
                .map(|_| AtomicU32::new(0))
                .collect(),
            written: Line(AtomicU64::new(0)),
            replayed: Line(AtomicU64::new(0)),
        }
    }

    /// Copies the rows logged from entry `from` on into `local`; returns the
    /// entries read so far.
    fn replay(&self, local: &mut [f32], from: u64, dim: usize) -> u64 {
        let to = self.written.load(Ordering::Acquire);
        for e in from..to {
            let at = (e % LOG) as usize * (1 + dim);
            let row = self.log[at].load(Ordering::Relaxed) as usize;
            for c in 0..dim {
                local[row * dim + c] = f32::from_bits(self.log[at + 1 + c].load(Ordering::Relaxed));
            }
        }
        to
    }
}

struct State<'a> {
    /// Per edge, the epoch of its next sample and of its next negative samples.
    next_sample: SharedSlice<'a, f64>,
    next_negative: SharedSlice<'a, f64>,
    /// Per run, its head's random state (three words).
    rng: SharedSlice<'a, i64>,
    slots: [Slot; 2],
    /// Tasks in a chunk (a run's tasks of two epochs must be two chunks apart).
    chunk: u64,
    /// Next chunk to take, and the number of chunks announced (own cache lines:
    /// both threads write them).
    next: Line<AtomicU64>,
    announced: Line<AtomicU64>,
    /// Set when a thread panics, so that the other stops waiting for it.
    failed: AtomicBool,
}

/// Raises `State::failed` if its thread unwinds.
struct FailGuard<'f>(&'f AtomicBool);

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// A value alone on its cache line.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Waits for `ready`, doing `meanwhile` (replaying the other thread's log, which
/// is what that thread may itself be waiting for), spinning for some tens of
/// microseconds (a few tasks), then yielding: the other thread holds a task it
/// is running, so the wait is short unless the machine is busy.
fn wait_for(failed: &AtomicBool, ready: impl Fn() -> bool, mut meanwhile: impl FnMut()) {
    let mut spins = 0u32;
    while !ready() {
        assert!(
            !failed.load(Ordering::Relaxed),
            "the other layout thread failed"
        );
        meanwhile();
        if spins < 1 << 12 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

impl State<'_> {
    /// The whole optimisation on the calling thread, chunk by chunk, tasks in
    /// groups that run interleaved.
    ///
    /// # Safety
    /// The CPU has FMA; no other thread uses the state.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
    unsafe fn alone(&self, plan: &Plan<'_>, embedding: &mut [f32]) {
        let modulo = FastMod::new(plan.n as u32);
        let total = plan.n_tasks();
        let mut seen = vec![0u64; plan.n];
        let mut stamp = 0u64;
        let mut chunk = Chunk::default();
        let needs = [0; CHUNK as usize];
        let (mut pending, mut group): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        let mut first = 0;
        while first < total {
            let end = (first + CHUNK).min(total);
            // SAFETY: one thread, drawing in task order.
            unsafe { self.draw_chunk(plan, &modulo, first..end, &mut chunk) };
            pending.clear();
            pending.extend(0..chunk.len());
            while !pending.is_empty() {
                chunk.pick(&pending, &needs, 0, &mut group, &mut seen, &mut stamp);
                unsafe { run_group(plan, &chunk, &group, embedding) };
                pending.retain(|j| !group.contains(j));
            }
            first = end;
        }
    }

    /// Draws tasks `tasks` into `chunk` (replacing what it held).
    ///
    /// # Safety
    /// As `draw`'s, for each task.
    #[inline(always)]
    unsafe fn draw_chunk(
        &self,
        plan: &Plan<'_>,
        modulo: &FastMod,
        tasks: std::ops::Range<u64>,
        chunk: &mut Chunk,
    ) {
        let n_runs = plan.runs.len() as u64;
        chunk.first = tasks.start;
        chunk.heads.clear();
        chunk.ends.clear();
        chunk.ops.clear();
        for task in tasks {
            let (epoch, run) = ((task / n_runs) as usize, (task % n_runs) as usize);
            unsafe { self.draw(plan, modulo, epoch, run, &mut chunk.ops) };
            chunk.heads.push(plan.heads[plan.runs[run].0]);
            chunk.ends.push(chunk.ops.len());
        }
    }

    /// One of the two threads: takes chunks of tasks in order until none is
    /// left, on its own copy of the embedding. Returns the copy and how much of
    /// the other thread's log it holds.
    ///
    /// # Safety
    /// The CPU has FMA; `slot` is 0 or 1, each used by one thread.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
    unsafe fn work(&self, plan: &Plan<'_>, slot: usize, start: &[f32]) -> (Vec<f32>, u64) {
        let _failing = FailGuard(&self.failed);
        let dim = plan.dim;
        let (mine, theirs) = (&self.slots[slot], &self.slots[1 - slot]);
        let mut local = start.to_vec();
        let mut replayed = 0u64;
        let total = plan.n_tasks();
        let modulo = FastMod::new(plan.n as u32);
        // The chunk being drawn (swapped with the published one at announcing).
        let mut draft = Chunk::default();
        // Per vertex, the other thread's pending tasks touching it (`announce`).
        let mut their_rows = vec![0u64; plan.n];
        let mut their_stamp = 0u64;
        // Per task of the chunk: the other thread's `done` it waits for.
        let mut needs: Vec<u64> = Vec::new();
        // Scratch of `Chunk::pick`.
        let mut group_seen = vec![0u64; plan.n];
        let mut group_stamp = 0u64;
        // The chunk's tasks not yet run, and those running together.
        let (mut pending, mut group): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        let mut written = 0u64;
        // The other thread's `replayed` as last read (room in the log).
        let mut room = LOG;
        loop {
            let chunk = self.next.fetch_add(1, Ordering::AcqRel);
            let first = chunk * self.chunk;
            if first >= total {
                return (local, replayed);
            }
            let end = (first + self.chunk).min(total);
            // SAFETY: this thread holds the tasks (module comment).
            unsafe { self.draw_chunk(plan, &modulo, first..end, &mut draft) };
            let mut catch_up = |local: &mut Vec<f32>| {
                replayed = theirs.replay(local, replayed, dim);
                mine.replayed.store(replayed, Ordering::Release);
            };
            wait_for(
                &self.failed,
                || self.announced.load(Ordering::Acquire) == chunk,
                || catch_up(&mut local),
            );
            // SAFETY: announcements take turns (`announced`): no other thread
            // reads or writes a slot's chunk now.
            unsafe {
                self.announce(
                    slot,
                    &mut draft,
                    &mut their_rows,
                    &mut their_stamp,
                    &mut needs,
                )
            };
            self.announced.store(chunk + 1, Ordering::Release);
            // The other thread's earlier chunks are finished and in its log.
            let mut seen = theirs.done.load(Ordering::Acquire);
            catch_up(&mut local);
            // SAFETY: the slot's chunk changes only at this thread's next
            // announcement.
            let published = unsafe { &*mine.chunk.get() };
            pending.clear();
            pending.extend(0..published.len());
            while let Some(&oldest) = pending.first() {
                // The other thread's progress, and its log up to there.
                let done = theirs.done.load(Ordering::Acquire);
                if done > seen {
                    seen = done;
                    catch_up(&mut local);
                }
                published.pick(
                    &pending,
                    &needs,
                    seen,
                    &mut group,
                    &mut group_seen,
                    &mut group_stamp,
                );
                if group.is_empty() {
                    // The oldest pending task conflicts with none before it: it
                    // waits for the other thread.
                    let need = needs[oldest];
                    wait_for(
                        &self.failed,
                        || theirs.done.load(Ordering::Acquire) >= need,
                        || catch_up(&mut local),
                    );
                    continue;
                }
                unsafe { run_group(plan, published, &group, &mut local) };
                // Log the rows written (the heads, the sampled edges' tails).
                for &ran in &group {
                    published.rows(ran).each(|v, writes| {
                        if !writes {
                            return;
                        }
                        if written >= room {
                            // Full: publish what is there and wait for the other
                            // thread to replay some.
                            mine.written.store(written, Ordering::Release);
                            wait_for(
                                &self.failed,
                                || written < theirs.replayed.load(Ordering::Acquire) + LOG,
                                || catch_up(&mut local),
                            );
                            room = theirs.replayed.load(Ordering::Acquire) + LOG;
                        }
                        let at = (written % LOG) as usize * (1 + dim);
                        mine.log[at].store(v, Ordering::Relaxed);
                        for c in 0..dim {
                            mine.log[at + 1 + c]
                                .store(local[v as usize * dim + c].to_bits(), Ordering::Relaxed);
                        }
                        written += 1;
                    });
                }
                pending.retain(|j| !group.contains(j));
                // Done: the tasks before the oldest pending one.
                let oldest = pending.first().copied().unwrap_or(published.len());
                mine.written.store(written, Ordering::Release);
                mine.done
                    .store(published.first + oldest as u64, Ordering::Release);
            }
        }
    }

    /// Phase 1, positions not needed: which of the run's edges the epoch samples,
    /// their negative samples, and the edges' bookkeeping for later epochs;
    /// appended to `ops`.
    ///
    /// # Safety
    /// The calling thread holds the task (its run's edges and head's random state).
    #[inline(always)]
    unsafe fn draw(
        &self,
        plan: &Plan<'_>,
        modulo: &FastMod,
        epoch: usize,
        run: usize,
        ops: &mut Vec<u32>,
    ) {
        let (start, end) = plan.runs[run];
        let now = epoch as f64;
        let mut rng = unsafe { [0, 1, 2].map(|c| self.rng.get(3 * run + c)) };
        for i in start..end {
            let next = unsafe { self.next_sample.get(i) };
            // `if epoch_of_next_sample[i] <= n` (false for NaN).
            if now < next || next.is_nan() {
                continue;
            }
            ops.push(plan.tails[i]);
            unsafe { self.next_sample.set(i, plan.epochs_per_sample[i] + next) };
            let per_negative = plan.epochs_per_negative_sample[i];
            let next_negative = unsafe { self.next_negative.get(i) };
            let count = truncate_cvttsd2si((now - next_negative) / per_negative);
            let slot = ops.len();
            ops.push(0);
            let mut drawn = 0u32;
            for _ in 0..count.max(0) {
                ops.push(modulo.python_mod(tau_rand_int(&mut rng)));
                drawn += 1;
            }
            ops[slot] = drawn;
            let moved = per_negative.mul_add(count as f64, next_negative);
            unsafe { self.next_negative.set(i, moved) };
        }
        for (c, w) in rng.into_iter().enumerate() {
            unsafe { self.rng.set(3 * run + c, w) };
        }
    }

    /// Phase 2, in chunk order: for each task of this chunk, the other thread's
    /// `done` stamp it waits for: that of the last task of the other's running
    /// chunk that writes a row the task touches or touches a row it writes
    /// (`their_rows` is per-vertex scratch, `stamp` its last stamp). Publishes
    /// the chunk.
    ///
    /// # Safety
    /// No other thread announces meanwhile.
    unsafe fn announce(
        &self,
        slot: usize,
        draft: &mut Chunk,
        their_rows: &mut [u64],
        stamp: &mut u64,
        needs: &mut Vec<u64>,
    ) {
        needs.clear();
        needs.resize(draft.len(), 0);
        let theirs = &self.slots[1 - slot];
        // SAFETY: as the function's.
        let their = unsafe { &*theirs.chunk.get() };
        // Their tasks before `done` are finished (and their earlier chunks).
        let done = theirs.done.load(Ordering::Acquire);
        let from = done.saturating_sub(their.first) as usize;
        if from < their.len() {
            // Per row, the last of their pending tasks touching it and the last
            // writing it (index + 1, 0 for none), under this stamp (fits in 32
            // bits: one per chunk).
            *stamp += 1;
            let stamp = *stamp;
            for i in from..their.len() {
                let n = i as u64 + 1;
                their.rows(i).each(|v, writes| {
                    let row = &mut their_rows[v as usize];
                    let writer = if *row >> 32 == stamp {
                        *row & 0xFFFF
                    } else {
                        0
                    };
                    *row = stamp << 32 | n << 16 | if writes { n } else { writer };
                });
            }
            for (j, need) in needs.iter_mut().enumerate() {
                draft.rows(j).each(|v, writes| {
                    let row = their_rows[v as usize];
                    if row >> 32 != stamp {
                        return;
                    }
                    // Writing, wait for their last task touching the row;
                    // reading, for their last writing it.
                    let last = if writes {
                        row >> 16 & 0xFFFF
                    } else {
                        row & 0xFFFF
                    };
                    if last > 0 {
                        *need = (*need).max(their.first + last);
                    }
                });
            }
        }
        // SAFETY: as the function's.
        let published = unsafe { &mut *self.slots[slot].chunk.get() };
        std::mem::swap(published, draft);
    }
}

/// Phase 3: upstream's epoch body for a task's sampled edges, one link at a
/// time: an edge's attraction, or one of its negative samples. Each link waits
/// for the previous one's result (mostly `pow`'s latency), so up to `LANES`
/// tasks that do not conflict run interleaved, each one's links filling the
/// others' waits.
struct Lane<'o> {
    head: usize,
    ops: &'o [u32],
    alpha: f64,
    /// Next edge in `ops`, and the current edge's negative samples still to do.
    at: usize,
    negative: usize,
    negatives_end: usize,
}

impl<'o> Lane<'o> {
    fn new(plan: &Plan<'_>, task: u64, head: u32, ops: &'o [u32]) -> Self {
        Lane {
            head: head as usize,
            ops,
            alpha: plan.alpha[(task / plan.runs.len() as u64) as usize],
            at: 0,
            negative: 0,
            negatives_end: 0,
        }
    }

    fn done(&self) -> bool {
        self.negative == self.negatives_end && self.at == self.ops.len()
    }

    /// The next link.
    #[inline(always)]
    fn step<const D: usize>(&mut self, plan: &Plan<'_>, emb: &mut [f32]) {
        let j = self.head * D;
        if self.negative < self.negatives_end {
            let k = self.ops[self.negative] as usize * D;
            self.negative += 1;
            repel::<D>(plan, self.alpha, j, k, emb);
            return;
        }
        let k = self.ops[self.at] as usize * D;
        let count = self.ops[self.at + 1] as usize;
        self.negative = self.at + 2;
        self.negatives_end = self.negative + count;
        self.at = self.negatives_end;
        attract::<D>(plan, self.alpha, j, k, emb);
    }
}

/// An edge's attraction: moves the head (row offset `j`) and the tail (`k`).
#[inline(always)]
fn attract<const D: usize>(plan: &Plan<'_>, alpha: f64, j: usize, k: usize, emb: &mut [f32]) {
    let d2 = squared_distance::<D>(emb, j, k);
    let g = if d2 > 0.0 {
        let d = d2 as f64;
        let denominator = d.powf(plan.b).mul_add(plan.a, 1.0);
        (d.powf(plan.b_minus_one) * plan.attraction) / denominator
    } else {
        0.0
    };
    for c in 0..D {
        let x = emb[j + c];
        let diff = (x - emb[k + c]) as f64;
        let step = alpha * clip(g * diff);
        emb[j + c] = (x as f64 + step) as f32;
        // Read after the write: the tail may be the head itself.
        let y = emb[k + c];
        emb[k + c] = (y as f64 - step) as f32;
    }
}

/// A negative sample's repulsion: moves the head (row offset `j`) away from `k`.
#[inline(always)]
fn repel<const D: usize>(plan: &Plan<'_>, alpha: f64, j: usize, k: usize, emb: &mut [f32]) {
    let d2 = squared_distance::<D>(emb, j, k);
    if d2 <= 0.0 || d2.is_nan() {
        return;
    }
    let d = d2 as f64;
    let s = d + 0.001;
    let g = plan.repulsion / s.mul_add(d.powf(plan.b) * plan.a, s);
    if g <= 0.0 || g.is_nan() {
        return;
    }
    for c in 0..D {
        let x = emb[j + c];
        let diff = (x - emb[k + c]) as f64;
        emb[j + c] = alpha.mul_add(clip(g * diff), x as f64) as f32;
    }
}

/// Runs the tasks `group` of `chunk` interleaved (`Chunk::pick`: none writes a
/// row another touches, so each sees what the task order gives it).
///
/// # Safety
/// The CPU has FMA.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
unsafe fn run_group(plan: &Plan<'_>, chunk: &Chunk, group: &[usize], emb: &mut [f32]) {
    let k = group.len();
    let lanes = std::array::from_fn(|i| chunk.lane(plan, group[i.min(k - 1)]));
    match plan.dim {
        1 => run_lanes::<1>(plan, lanes, k, emb),
        2 => run_lanes::<2>(plan, lanes, k, emb),
        _ => run_lanes::<3>(plan, lanes, k, emb),
    }
}

/// Steps the first `live` lanes in turn until all are done.
#[inline(always)]
fn run_lanes<const D: usize>(
    plan: &Plan<'_>,
    mut lanes: [Lane<'_>; LANES],
    mut live: usize,
    emb: &mut [f32],
) {
    loop {
        let mut i = 0;
        while i < live {
            if lanes[i].done() {
                live -= 1;
                lanes.swap(i, live);
            } else {
                i += 1;
            }
        }
        if live == 0 {
            return;
        }
        for lane in &mut lanes[..live] {
            lane.step::<D>(plan, emb);
        }
    }
}

/// The rows a task touches: its head and positive tails (written), its negative
/// samples (read).
struct Rows<'o> {
    ops: &'o [u32],
    head: u32,
}

impl Rows<'_> {
    /// Calls `f(row, writes)` for each row touched.
    fn each(&self, mut f: impl FnMut(u32, bool)) {
        self.any(|v, w| {
            f(v, w);
            false
        });
    }

    /// Calls `f(row, writes)` for each row touched until it returns true.
    fn any(&self, mut f: impl FnMut(u32, bool) -> bool) -> bool {
        if self.ops.is_empty() {
            return false;
        }
        if f(self.head, true) {
            return true;
        }
        let mut at = 0;
        while at < self.ops.len() {
            let count = self.ops[at + 1] as usize;
            if f(self.ops[at], true) {
                return true;
            }
            if self.ops[at + 2..at + 2 + count]
                .iter()
                .any(|&k| f(k, false))
            {
                return true;
            }
            at += 2 + count;
        }
        false
    }
}

/// `a mod n` for a 32-bit `a`, by multiplications (Lemire, Kaser & Kurz 2019,
/// "Faster remainder by direct computation"), instead of a division per sample.
struct FastMod {
    n: u32,
    m: u64,
}

impl FastMod {
    fn new(n: u32) -> Self {
        FastMod {
            n,
            m: (u64::MAX / n.max(1) as u64).wrapping_add(1),
        }
    }
    #[inline(always)]
    fn rem(&self, a: u32) -> u32 {
        ((self.m.wrapping_mul(a as u64) as u128 * self.n as u128) >> 64) as u32
    }
    /// Python's `a % n` (the sign of n, here non-negative).
    #[inline(always)]
    fn python_mod(&self, a: i32) -> u32 {
        if a >= 0 {
            self.rem(a as u32)
        } else {
            match self.rem(a.unsigned_abs()) {
                0 => 0,
                r => self.n - r,
            }
        }
    }
}

/// umap's `rdist` as numba compiles it below 4 dimensions: an f32 FMA chain.
#[inline(always)]
fn squared_distance<const D: usize>(emb: &[f32], j: usize, k: usize) -> f32 {
    let mut sum = 0.0f32;
    for c in 0..D {
        let diff = emb[j + c] - emb[k + c];
        sum = diff.mul_add(diff, sum);
    }
    sum
}

/// umap's `clip` to [-4, 4] as compiled: MAXSD(-4, t), then MINSD(·, 4).
#[inline(always)]
fn clip(t: f64) -> f64 {
    let m = if -4.0 > t { -4.0 } else { t };
    if m < 4.0 {
        m
    } else {
        4.0
    }
}

/// x86's CVTTSD2SI: truncation, with i64::MIN for NaN and out-of-range values.
#[inline(always)]
fn truncate_cvttsd2si(x: f64) -> i64 {
    // 2^63: the first value outside i64 (the range's bounds are exact in f64).
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if (-LIMIT..LIMIT).contains(&x) {
        x as i64
    } else {
        i64::MIN
    }
}

/// umap's `tau_rand_int` (a Tausworthe generator over three int64 words, each
/// kept to 32 bits by masks, shifted arithmetically), returning the int32 it
/// returns.
#[inline(always)]
fn tau_rand_int(s: &mut [i64; 3]) -> i32 {
    const M: i64 = 0xFFFF_FFFF;
    s[0] = (((s[0] & 4_294_967_294) << 12) & M) ^ (((s[0].wrapping_shl(13) & M) ^ s[0]) >> 19);
    s[1] = (((s[1] & 4_294_967_288) << 4) & M) ^ (((s[1].wrapping_shl(2) & M) ^ s[1]) >> 25);
    s[2] = (((s[2] & 4_294_967_280) << 17) & M) ^ (((s[2].wrapping_shl(3) & M) ^ s[2]) >> 11);
    (s[0] ^ s[1] ^ s[2]) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kNN-like graph sorted by head: `k` random tails per vertex, epochs per
    /// sample from 1 to 20, and a random embedding.
    fn graph(
        n: usize,
        k: usize,
        dim: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<i32>, Vec<i32>, Vec<f64>) {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let head: Vec<i32> = (0..n)
            .flat_map(|v| std::iter::repeat_n(v as i32, k))
            .collect();
        let tail: Vec<i32> = head.iter().map(|_| (next() as usize % n) as i32).collect();
        let epochs: Vec<f64> = head
            .iter()
            .map(|_| 1.0 + (next() % 1900) as f64 / 100.0)
            .collect();
        let embedding: Vec<f32> = (0..n * dim)
            .map(|_| (next() % 10_000) as f32 / 997.0)
            .collect();
        (embedding, head, tail, epochs)
    }

    fn params(n_epochs: u64) -> Params {
        Params {
            a: 0.583,
            b: 1.334,
            gamma: 1.0,
            initial_alpha: 1.0,
            negative_sample_rate: 5.0,
            n_epochs,
            rng_state: [-631_472_624, 247_551_186, -1_380_708_704],
        }
    }

    /// upstream's loops as written, edge by edge and epoch by epoch, with the
    /// kernel's arithmetic: the order the tasks, groups and threads reproduce.
    fn in_order(emb: &mut [f32], dim: usize, head: &[i32], tail: &[i32], eps: &[f64], p: &Params) {
        let plan = Plan::new(emb, dim, head, tail, eps, p).unwrap();
        let n = emb.len() / dim;
        let modulo = FastMod::new(n as u32);
        let mut next = eps.to_vec();
        let mut next_negative = plan.epochs_per_negative_sample.clone();
        let mut rng: Vec<[i64; 3]> = (0..n)
            .map(|v| {
                let bits = (emb[v * dim] as f64).to_bits() as i64;
                p.rng_state.map(|s| s.wrapping_add(bits))
            })
            .collect();
        for (epoch, &alpha) in plan.alpha.iter().enumerate() {
            let now = epoch as f64;
            for i in 0..head.len() {
                if next[i] > now || next[i].is_nan() {
                    continue;
                }
                let (j, k) = (head[i] as usize * dim, tail[i] as usize * dim);
                let link = |k: usize, emb: &mut [f32], attraction: bool| match (dim, attraction) {
                    (1, true) => attract::<1>(&plan, alpha, j, k, emb),
                    (2, true) => attract::<2>(&plan, alpha, j, k, emb),
                    (_, true) => attract::<3>(&plan, alpha, j, k, emb),
                    (1, false) => repel::<1>(&plan, alpha, j, k, emb),
                    (2, false) => repel::<2>(&plan, alpha, j, k, emb),
                    (_, false) => repel::<3>(&plan, alpha, j, k, emb),
                };
                link(k, emb, true);
                next[i] += eps[i];
                let per_negative = plan.epochs_per_negative_sample[i];
                let count = truncate_cvttsd2si((now - next_negative[i]) / per_negative);
                for _ in 0..count.max(0) {
                    let sample = modulo.python_mod(tau_rand_int(&mut rng[head[i] as usize]));
                    link(sample as usize * dim, emb, false);
                }
                next_negative[i] = per_negative.mul_add(count as f64, next_negative[i]);
            }
        }
    }

    #[test]
    fn one_and_two_threads_give_the_order_of_upstreams_loops() {
        // Small graphs (many conflicts: waits, tasks out of order, small
        // groups), hubs (long tasks) and chunks cut across epochs.
        for (n, k, dim, seed, epochs) in [
            (40, 6, 2, 11, 60),
            (2000, 12, 2, 12, 30),
            (300, 4, 3, 13, 40),
            (200, 3, 1, 14, 40),
            (7, 30, 2, 15, 50),
        ] {
            let (start, head, tail, eps) = graph(n, k, dim, seed);
            let mut want = start.clone();
            in_order(&mut want, dim, &head, &tail, &eps, &params(epochs));
            assert_ne!(want, start);
            for threads in [1, 2] {
                let mut got = start.clone();
                optimize(&mut got, dim, &head, &tail, &eps, &params(epochs), threads).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "n {n} k {k} dim {dim} threads {threads}"
                );
            }
        }
    }

    #[test]
    fn two_threads_give_what_one_gives() {
        // Small graphs: the threads' tasks conflict often, so waits and log
        // replays are exercised as well as the common path.
        for (n, k, dim, seed) in [
            (40, 6, 2, 1),
            (500, 10, 2, 2),
            (300, 4, 3, 3),
            (200, 3, 1, 4),
        ] {
            let (start, head, tail, epochs) = graph(n, k, dim, seed);
            let mut one = start.clone();
            optimize(&mut one, dim, &head, &tail, &epochs, &params(60), 1).unwrap();
            let mut two = start.clone();
            optimize(&mut two, dim, &head, &tail, &epochs, &params(60), 2).unwrap();
            assert_ne!(one, start);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&two), "n {n} k {k} dim {dim}");
        }
    }

    #[test]
    fn calls_outside_the_compiled_arithmetic_are_refused_untouched() {
        let (start, head, tail, epochs) = graph(30, 3, 2, 5);
        let refused = |dim: usize, head: &[i32], tail: &[i32], epochs: &[f64], p: Params| {
            let mut e = start.clone();
            let why = optimize(&mut e, dim, head, tail, epochs, &p, 2).unwrap_err();
            assert_eq!(e, start);
            why
        };
        assert!(refused(4, &head[..], &tail[..], &epochs[..], params(5)).contains("dimensions"));
        let mut unsorted = head.clone();
        unsorted.swap(0, 40);
        assert!(refused(2, &unsorted, &tail, &epochs, params(5)).contains("sorted"));
        let mut outside = tail.clone();
        outside[3] = 30;
        assert!(refused(2, &head, &outside, &epochs, params(5)).contains("outside"));
        let mut small = epochs.clone();
        small[7] = 0.5;
        assert!(refused(2, &head, &tail, &small, params(5)).contains("epochs_per_sample"));
        let negative_a = Params {
            a: -1.0,
            ..params(5)
        };
        assert!(refused(2, &head, &tail, &epochs, negative_a).contains("negative sample rate"));
        assert!(refused(2, &head[1..], &tail, &epochs, params(5)).contains("length"));
        let too_many = Params {
            negative_sample_rate: 1e5,
            ..params(5)
        };
        assert!(refused(2, &head, &tail, &epochs, too_many).contains("negative sample rate"));
    }

    #[test]
    fn python_modulo_by_multiplication() {
        for n in [1u32, 2, 3, 7, 50_000, 1 << 31, u32::MAX] {
            let m = FastMod::new(n);
            for a in [
                0i32,
                1,
                -1,
                2,
                -2,
                12345,
                -12345,
                i32::MAX,
                i32::MIN,
                i32::MIN + 1,
            ] {
                assert_eq!(
                    m.python_mod(a) as i64,
                    (a as i64).rem_euclid(n as i64),
                    "{a} % {n}"
                );
            }
        }
    }

    #[test]
    fn truncation_as_cvttsd2si() {
        assert_eq!(truncate_cvttsd2si(2.9), 2);
        assert_eq!(truncate_cvttsd2si(-2.9), -2);
        assert_eq!(truncate_cvttsd2si(f64::NAN), i64::MIN);
        assert_eq!(truncate_cvttsd2si(1e19), i64::MIN);
        assert_eq!(truncate_cvttsd2si(-1e19), i64::MIN);
    }

    /// The pipeline's 50,000-cell layout saved by a probe script
    /// (`UMAP_BIN=dir`: emb.bin, head.bin, tail.bin, eps.bin, rng.bin, out.bin).
    #[test]
    #[ignore]
    fn timing_saved_layout() {
        let dir = std::env::var("UMAP_BIN").expect("UMAP_BIN");
        let read = |name: &str| std::fs::read(format!("{dir}/{name}")).unwrap();
        let f32s = |b: Vec<u8>| {
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let i32s = |b: Vec<u8>| {
            b.chunks(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let f64s = |b: Vec<u8>| {
            b.chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let rng: Vec<i64> = read("rng.bin")
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (start, head, tail, eps, want) = (
            f32s(read("emb.bin")),
            i32s(read("head.bin")),
            i32s(read("tail.bin")),
            f64s(read("eps.bin")),
            f32s(read("out.bin")),
        );
        let params = Params {
            a: std::env::var("UMAP_A").unwrap().parse().unwrap(),
            b: std::env::var("UMAP_B").unwrap().parse().unwrap(),
            gamma: 1.0,
            initial_alpha: 1.0,
            negative_sample_rate: 5.0,
            n_epochs: 200,
            rng_state: [rng[0], rng[1], rng[2]],
        };
        let list: Vec<usize> = std::env::var("UMAP_THREADS")
            .map(|v| v.split(",").map(|x| x.parse().unwrap()).collect())
            .unwrap_or(vec![1, 2]);
        for threads in list {
            let mut emb = start.clone();
            let t = std::time::Instant::now();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| optimize(&mut emb, 2, &head, &tail, &eps, &params, threads))
                .unwrap();

            let same = emb
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            eprintln!(
                "threads {threads}: {:?}, {same} of {} identical",
                t.elapsed(),
                want.len()
            );
        }
    }
}
