//! Content-keyed cache of derived matrices (the value-sorted per-gene structure
//! for rank statistics), shared by all connections.
//!
//! Keys are fingerprints of the source matrix's bytes, shape and dtypes, computed
//! by the daemon from the client's arrays on every request, so a matrix that
//! changed in any way gets a new key and never meets a stale entry; a fresh copy
//! of the same data (another AnnData object, another process) hits. Entries are
//! evicted least recently used first to stay within `AUTOZYME_CACHE_BYTES`
//! (default: a quarter of the memory available at start, at most 4 GiB); an entry
//! larger than the whole budget is not kept.

use crate::kernels::sorted_csc::SortedCsc;
use autozyme_protocol::CacheEntry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A cached value-sorted structure, by data dtype.
#[derive(Debug)]
pub enum Sorted {
    F32(SortedCsc<f32>),
    F64(SortedCsc<f64>),
}

impl Sorted {
    pub fn bytes(&self) -> usize {
        match self {
            Sorted::F32(m) => m.bytes(),
            Sorted::F64(m) => m.bytes(),
        }
    }
}

struct Slot {
    key: u128,
    value: Arc<Sorted>,
    bytes: u64,
    hits: u64,
    last_used: u64,
}

/// Results of recent requests, by a key covering the matrix and every request
/// parameter: a re-run of the same call (on the same data) is answered at once.
const RESULTS_KEPT: usize = 8;

pub struct Cache {
    budget: u64,
    slots: Mutex<(Vec<Slot>, u64)>,
    results: Mutex<Vec<(u128, Arc<dyn std::any::Any + Send + Sync>)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

fn default_budget() -> u64 {
    if let Some(v) = std::env::var("AUTOZYME_CACHE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return v;
    }
    (crate::config::meminfo_bytes("MemAvailable") / 4).min(4 << 30)
}

impl Default for Cache {
    fn default() -> Self {
        Cache::with_budget(default_budget())
    }
}

impl Cache {
    pub fn with_budget(budget: u64) -> Self {
        Cache {
            budget,
            slots: Mutex::new((Vec::new(), 0)),
            results: Mutex::new(Vec::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Slot>, u64)> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The entry for `key`, counted as a hit (or the miss counted).
    pub fn get(&self, key: u128) -> Option<Arc<Sorted>> {
        let mut guard = self.lock();
        let (slots, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        match slots.iter_mut().find(|s| s.key == key) {
            Some(slot) => {
                slot.hits += 1;
                slot.last_used = now;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(Arc::clone(&slot.value))
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether an entry of this shape is kept (neither a hit nor a miss): if not,
    /// a matrix of this shape is certainly new.
    pub fn may_hold(&self, n_rows: usize, n_cols: usize) -> bool {
        self.lock().0.iter().any(|s| {
            let shape = match &*s.value {
                Sorted::F32(m) => (m.n_rows, m.n_cols),
                Sorted::F64(m) => (m.n_rows, m.n_cols),
            };
            shape == (n_rows, n_cols)
        })
    }

    /// Keeps `value` under `key`, evicting least recently used entries to fit.
    pub fn insert(&self, key: u128, value: Arc<Sorted>) {
        let bytes = value.bytes() as u64;
        if bytes > self.budget {
            return;
        }
        let mut guard = self.lock();
        let (slots, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        slots.retain(|s| s.key != key);
        while slots.iter().map(|s| s.bytes).sum::<u64>() + bytes > self.budget {
            let Some(oldest) = slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            slots.swap_remove(oldest);
        }
        slots.push(Slot {
            key,
            value,
            bytes,
            hits: 0,
            last_used: now,
        });
    }

    pub fn clear(&self) {
        self.lock().0.clear();
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// A kept result for `key` (most recent first; moved to the front).
    pub fn result<T: Send + Sync + 'static>(&self, key: u128) -> Option<Arc<T>> {
        let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let i = results.iter().position(|(k, _)| *k == key)?;
        let entry = results.remove(i);
        let value = Arc::clone(&entry.1).downcast::<T>().ok();
        results.insert(0, entry);
        value
    }

    /// Keeps a result (small: per-gene vectors), dropping the oldest beyond a few.
    pub fn keep_result<T: Send + Sync + 'static>(&self, key: u128, value: Arc<T>) {
        let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        results.retain(|(k, _)| *k != key);
        results.insert(0, (key, value));
        results.truncate(RESULTS_KEPT);
    }

    pub fn entries(&self) -> Vec<CacheEntry> {
        let guard = self.lock();
        let mut slots: Vec<&Slot> = guard.0.iter().collect();
        slots.sort_by_key(|s| std::cmp::Reverse(s.last_used));
        slots
            .into_iter()
            .map(|s| CacheEntry {
                key: format!("sorted-csc:{:032x}", s.key),
                bytes: s.bytes,
                hits: s.hits,
            })
            .collect()
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sorted_csc::from_dense;

    fn entry(n: usize) -> Arc<Sorted> {
        let data = vec![1.0f32; n];
        Arc::new(Sorted::F32(from_dense(&data, n, 1).unwrap()))
    }

    #[test]
    fn lru_within_budget() {
        let one = entry(100).bytes() as u64;
        let cache = Cache::with_budget(2 * one + 1);
        cache.insert(1, entry(100));
        cache.insert(2, entry(100));
        assert!(cache.get(1).is_some()); // 1 is now more recent than 2
        cache.insert(3, entry(100));
        assert!(cache.get(2).is_none());
        assert!(cache.get(1).is_some() && cache.get(3).is_some());
        assert_eq!(cache.counts(), (3, 1));
        let keys: Vec<u64> = cache.entries().iter().map(|e| e.hits).collect();
        assert_eq!(keys.len(), 2);
        cache.insert(4, entry(10_000)); // larger than the budget: not kept
        assert!(cache.get(4).is_none());
        assert_eq!(cache.entries().len(), 2);
    }
}
