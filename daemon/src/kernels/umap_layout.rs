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
//! **Threads, exactly.** Each epoch visits the edges in order, grouped in runs of
//! one head vertex (the edges come row-sorted from a CSR graph). A run is a task;
//! tasks are numbered epoch by epoch. What a task reads and writes is known
//! before it runs: its head and its edges' tails are moved, and its negative
//! samples are read. The samples come from the head vertex's own random state,
//! which only that vertex's tasks advance, so a thread can draw them (with the
//! edges' epoch bookkeeping, which depends on no position) as soon as it takes
//! the task. Tasks then announce their rows in task order; a task that touches a
//! row an earlier, still running task writes (or writes a row it reads) waits
//! for it. Every task therefore sees exactly the coordinates the sequential
//! order gives it, for any number of threads.

use super::SparseIndex;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

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
    let mut next_sample = plan.epochs_per_sample.clone();
    let mut next_negative = plan.epochs_per_negative_sample.clone();
    // umap: `rng_state + head_embedding[:, 0].astype(float64).view(int64)`.
    let mut rng: Vec<[i64; 3]> = (0..plan.n)
        .map(|v| {
            let bits = (embedding[v * dim] as f64).to_bits() as i64;
            plan.rng_state.map(|s| s.wrapping_add(bits))
        })
        .collect();
    // A run's draws must go in epoch order: with fewer runs than two per thread,
    // one thread.
    let workers = if plan.runs.len() < 2 * threads {
        1
    } else {
        threads.min(64)
    };
    let state = State {
        embedding: SharedSlice::new(embedding),
        next_sample: SharedSlice::new(&mut next_sample),
        next_negative: SharedSlice::new(&mut next_negative),
        rng: SharedSlice::new(&mut rng),
        slots: (0..workers).map(|_| Slot::new()).collect(),
        next: AtomicU64::new(0),
        announced: AtomicU64::new(0),
    };
    if workers == 1 {
        // SAFETY: FMA is available (checked above).
        unsafe { state.alone(&plan) };
    } else {
        rayon::scope(|s| {
            for slot in 0..workers {
                let (state, plan) = (&state, &plan);
                // SAFETY: FMA is available (checked above).
                s.spawn(move |_| unsafe { state.work(plan, slot) });
            }
        });
    }
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
struct Plan {
    n: usize,
    dim: usize,
    /// `(start, end)` of each run of edges with one head vertex.
    runs: Vec<(usize, usize)>,
    heads: Vec<u32>,
    tails: Vec<u32>,
    epochs_per_sample: Vec<f64>,
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

impl Plan {
    fn new<I: SparseIndex>(
        embedding: &[f32],
        dim: usize,
        head: &[I],
        tail: &[I],
        epochs_per_sample: &[f64],
        p: &Params,
    ) -> Result<Self, String> {
        if !(1..=MAX_DIM).contains(&dim) {
            return Err(format!("{dim} dimensions (served: 1 to {MAX_DIM})"));
        }
        if embedding.len() % dim != 0 {
            return Err("the embedding's length is not a multiple of its dimensions".into());
        }
        let n = embedding.len() / dim;
        if n > u32::MAX as usize
            || head.len() != tail.len()
            || head.len() != epochs_per_sample.len()
        {
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
            return Err("a, b, gamma, alpha or the negative sample rate".into());
        }
        if p.n_epochs > 1 << 20 {
            return Err(format!("{} epochs", p.n_epochs));
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
            epochs_per_sample: epochs_per_sample.to_vec(),
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
// arranges: an edge's bookkeeping and a vertex's random state by the thread
// holding that run's task (tasks of one run are a whole epoch apart, and a
// thread takes a task at most `threads` ahead of the announcements), and a
// coordinate by the tasks that announced it, one after another in task order.
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

/// A thread's announced task, for the threads announcing after it.
struct Slot {
    /// The task's head and its draws (`draw`'s format), published at the
    /// announcement; written only by the owner while it announces, read only by
    /// other threads while they announce, and announcements take turns.
    task: std::cell::UnsafeCell<(u32, Vec<u32>)>,
    /// Stamp (task number + 1) of the slot's last announced task.
    current: AtomicU64,
    /// Stamp of the slot's last finished task.
    done: AtomicU64,
}

// SAFETY: `task` is accessed as its comment says, announcements ordered by
// `State::announced` (release/acquire).
unsafe impl Sync for Slot {}

impl Slot {
    fn new() -> Self {
        Slot {
            task: std::cell::UnsafeCell::new((0, Vec::new())),
            current: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }
}

struct State<'a> {
    embedding: SharedSlice<'a, f32>,
    /// Upstream's `epoch_of_next_sample` and `epoch_of_next_negative_sample`.
    next_sample: SharedSlice<'a, f64>,
    next_negative: SharedSlice<'a, f64>,
    /// Upstream's `rng_state_per_sample`.
    rng: SharedSlice<'a, [i64; 3]>,
    slots: Vec<Slot>,
    /// Next task to take, and the number of tasks announced.
    next: AtomicU64,
    announced: AtomicU64,
}

pub static WAITS: AtomicU64 = AtomicU64::new(0);
pub static SPINS: AtomicU64 = AtomicU64::new(0);
/// Waits for `ready`, spinning briefly, then yielding: the other threads hold
/// tasks they are running, so the wait is short unless the machine is busy.
#[inline]
fn wait_for(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        SPINS.fetch_add(1, Ordering::Relaxed);
        if spins < 256 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

impl State<'_> {
    /// The whole optimisation on the calling thread.
    ///
    /// # Safety
    /// The CPU has FMA; no other thread uses the state.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
    unsafe fn alone(&self, plan: &Plan) {
        let modulo = FastMod::new(plan.n as u32);
        let mut ops: Vec<u32> = Vec::new();
        for epoch in 0..plan.alpha.len() {
            for run in 0..plan.runs.len() {
                unsafe {
                    self.draw(plan, &modulo, epoch, run, &mut ops);
                    self.run(plan, epoch, plan.heads[plan.runs[run].0], &ops);
                }
            }
        }
    }

    /// One thread's share: take tasks in order until none is left.
    ///
    /// # Safety
    /// The CPU has FMA.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
    unsafe fn work(&self, plan: &Plan, slot: usize) {
        let n_runs = plan.runs.len() as u64;
        let total = plan.n_tasks();
        let modulo = FastMod::new(plan.n as u32);
        // Per sampled edge: its tail, the number of negative samples, the samples.
        let mut ops: Vec<u32> = Vec::new();
        // Per vertex: `task << 1 | writes` of this thread's last task touching it
        // (low 32 bits: a stale mark equal by chance only makes a task wait).
        let mut marks = vec![u32::MAX; plan.n];
        let mut waits: Vec<(usize, u64)> = Vec::new();
        loop {
            let task = self.next.fetch_add(1, Ordering::Relaxed);
            if task >= total {
                return;
            }
            let (epoch, run) = ((task / n_runs) as usize, (task % n_runs) as usize);
            let head = plan.heads[plan.runs[run].0];
            // SAFETY: this thread holds the task (module comment).
            unsafe { self.draw(plan, &modulo, epoch, run, &mut ops) };
            let stamp = task + 1;
            let stamp32 = (task as u32) << 1;
            Rows { head, ops: &ops }.each(|v, writes| {
                // A row both read and written keeps its write bit.
                let mark = &mut marks[v as usize];
                let kept = if *mark & !1 == stamp32 { *mark & 1 } else { 0 };
                *mark = stamp32 | kept | writes as u32;
            });
            wait_for(|| self.announced.load(Ordering::Acquire) == task);
            // SAFETY: announcements take turns (`announced`), so no other thread
            // reads or writes a slot's task now but this one.
            unsafe { self.announce(slot, task, head, &mut ops, &marks, &mut waits) };
            self.announced.store(stamp, Ordering::Release);
            if !waits.is_empty() {
                WAITS.fetch_add(1, Ordering::Relaxed);
            }
            for &(other, until) in &waits {
                wait_for(|| self.slots[other].done.load(Ordering::Acquire) >= until);
            }
            // SAFETY: every earlier task touching these rows has finished, and no
            // later one touches them before this one finishes (`announce`); the
            // slot's task changes only at this thread's next announcement.
            unsafe {
                let (head, published) = &*self.slots[slot].task.get();
                self.run(plan, epoch, *head, published)
            };
            self.slots[slot].done.store(stamp, Ordering::Release);
        }
    }

    /// Phase 1, positions not needed: which of the run's edges the epoch samples,
    /// their negative samples, and the edges' bookkeeping for later epochs.
    ///
    /// # Safety
    /// The calling thread holds the task (its run's edges and head's random state).
    #[inline(always)]
    unsafe fn draw(
        &self,
        plan: &Plan,
        modulo: &FastMod,
        epoch: usize,
        run: usize,
        ops: &mut Vec<u32>,
    ) {
        ops.clear();
        let (start, end) = plan.runs[run];
        let j = plan.heads[start] as usize;
        let now = epoch as f64;
        let mut rng = unsafe { self.rng.get(j) };
        for i in start..end {
            let next = unsafe { self.next_sample.get(i) };
            // `if epoch_of_next_sample[i] <= n` (false for NaN).
            if !(now >= next) {
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
        unsafe { self.rng.set(j, rng) };
    }

    /// Phase 2, in task order: finds the running tasks of other threads that
    /// write a row this task touches or touch a row it writes (`marks` holds this
    /// task's rows), into `waits`; then publishes this task in the slot.
    ///
    /// # Safety
    /// No other thread announces meanwhile.
    unsafe fn announce(
        &self,
        slot: usize,
        task: u64,
        head: u32,
        ops: &mut Vec<u32>,
        marks: &[u32],
        waits: &mut Vec<(usize, u64)>,
    ) {
        waits.clear();
        let stamp = task as u32;
        for (other, s) in self.slots.iter().enumerate() {
            let running = s.current.load(Ordering::Relaxed);
            if other == slot || s.done.load(Ordering::Acquire) >= running || ops.is_empty() {
                continue;
            }
            // SAFETY: as the function's.
            let (their_head, theirs) = unsafe { &*s.task.get() };
            let conflict = Rows {
                head: *their_head,
                ops: theirs,
            }
            .any(|v, writes| {
                let mark = marks[v as usize];
                mark & !1 == stamp << 1 && (writes || mark & 1 == 1)
            });
            if conflict {
                waits.push((other, running));
            }
        }
        let mine = &self.slots[slot];
        // SAFETY: as the function's.
        let published = unsafe { &mut *mine.task.get() };
        published.0 = head;
        std::mem::swap(&mut published.1, ops);
        mine.current.store(task + 1, Ordering::Relaxed);
    }

    /// Phase 3: upstream's epoch body for the run's sampled edges.
    ///
    /// # Safety
    /// The CPU has FMA; no other thread touches the task's rows meanwhile.
    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "fma"))]
    unsafe fn run(&self, plan: &Plan, epoch: usize, head: u32, ops: &[u32]) {
        let dim = plan.dim;
        let alpha = plan.alpha[epoch];
        let emb = &self.embedding;
        let j = head as usize * dim;
        let mut at = 0;
        while at < ops.len() {
            let k = ops[at] as usize * dim;
            let count = ops[at + 1] as usize;
            let negatives = &ops[at + 2..at + 2 + count];
            at += 2 + count;
            let d2 = unsafe { squared_distance(emb, j, k, dim) };
            let g = if d2 > 0.0 {
                let d = d2 as f64;
                let denominator = d.powf(plan.b).mul_add(plan.a, 1.0);
                (d.powf(plan.b_minus_one) * plan.attraction) / denominator
            } else {
                0.0
            };
            for c in 0..dim {
                let x = unsafe { emb.get(j + c) };
                let diff = (x - unsafe { emb.get(k + c) }) as f64;
                let step = alpha * clip(g * diff);
                unsafe { emb.set(j + c, (x as f64 + step) as f32) };
                // Read after the write: the tail may be the head itself.
                let y = unsafe { emb.get(k + c) };
                unsafe { emb.set(k + c, (y as f64 - step) as f32) };
            }
            for &negative in negatives {
                let k = negative as usize * dim;
                let d2 = unsafe { squared_distance(emb, j, k, dim) };
                if !(d2 > 0.0) {
                    continue;
                }
                let d = d2 as f64;
                let s = d + 0.001;
                let g = plan.repulsion / s.mul_add(d.powf(plan.b) * plan.a, s);
                if !(g > 0.0) {
                    continue;
                }
                for c in 0..dim {
                    let x = unsafe { emb.get(j + c) };
                    let diff = (x - unsafe { emb.get(k + c) }) as f64;
                    unsafe { emb.set(j + c, alpha.mul_add(clip(g * diff), x as f64) as f32) };
                }
            }
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
///
/// # Safety
/// As `State::run`.
#[inline(always)]
unsafe fn squared_distance(emb: &SharedSlice<'_, f32>, j: usize, k: usize, dim: usize) -> f32 {
    let mut sum = 0.0f32;
    for c in 0..dim {
        let diff = unsafe { emb.get(j + c) - emb.get(k + c) };
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
    if x >= -9.223_372_036_854_775_808e18 && x < 9.223_372_036_854_775_808e18 {
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
            eprintln!(
                "waits {} spins {}",
                WAITS.swap(0, Ordering::Relaxed),
                SPINS.swap(0, Ordering::Relaxed)
            );
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
