//! Segments the daemon owns and lends to clients.
//!
//! Allocating shared memory (tmpfs pages, 4 KiB each) costs several times more
//! than the work done on it, and a client process's own pool dies with it. The
//! daemon keeps segments across client processes: a new notebook kernel's first
//! call gets memory that is already allocated and mapped on the daemon's side.
//!
//! A segment is lent to one client pid at a time. The client gives it back with
//! `Release` when its arrays over it are gone (or when it exits); a client that
//! dies without doing so gets its leases reclaimed by the sweeper. Segments are
//! named `azm_<uid>_<daemon pid>_<seq>`, so if the daemon dies, the shim's and any
//! new daemon's dead-creator sweep removes them.

use super::mapping::SegmentCache;
use super::names::path_of;
use super::sweep::pid_is_dead;
use crate::error::{Failure, Result};
use autozyme_protocol::ErrorKind;
use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an idle segment is kept.
const IDLE_MAX_AGE: Duration = Duration::from_secs(600);

/// Bytes of idle segments kept at most: 4 GiB, or a quarter of the machine's
/// memory where that is more, so the result of a large call (scale's dense
/// float64 result of 180,000 x 3,000 is 4.3 GB) is there for the next one
/// instead of being allocated again.
fn idle_max_bytes() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| (4u64 << 30).max(crate::config::meminfo_bytes("MemTotal") / 4))
}

#[derive(Debug)]
struct Idle {
    name: String,
    size: u64,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: Vec<Idle>,
    /// name -> (size, borrowing client pid)
    lent: HashMap<String, (u64, i32)>,
    next_seq: u64,
}

#[derive(Default)]
pub struct SegmentPool {
    inner: Mutex<Inner>,
}

fn fits(want: u64, size: u64) -> bool {
    want <= size && size <= 2 * want.max(4096)
}

impl SegmentPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lends a segment of at least `bytes` to client `pid`: the smallest idle one
    /// that fits, else (with `create`) a new one. `None` when nothing fits.
    pub fn lease(
        &self,
        cache: &SegmentCache,
        uid: u32,
        daemon_pid: u32,
        pid: i32,
        bytes: u64,
        create: bool,
    ) -> Result<Option<(String, u64)>> {
        {
            let mut inner = self.lock();
            let best = inner
                .idle
                .iter()
                .enumerate()
                .filter(|(_, s)| fits(bytes, s.size))
                .min_by_key(|(_, s)| s.size)
                .map(|(i, _)| i);
            if let Some(i) = best {
                let seg = inner.idle.swap_remove(i);
                inner.lent.insert(seg.name.clone(), (seg.size, pid));
                return Ok(Some((seg.name, seg.size)));
            }
            if !create {
                return Ok(None);
            }
        }
        let name = {
            let mut inner = self.lock();
            inner.next_seq += 1;
            format!("azm_{uid}_{daemon_pid}_{}", inner.next_seq)
        };
        let size = bytes.max(1);
        // Sized, not populated, and not mapped here: the client allocates the
        // pages with its own low-priority threads (the spare is prepared while its
        // next call runs). Zeroing them here would take CPU from that call
        // whatever this thread's nice value: the kernel's autogroups share the
        // CPU equally between the daemon's session and the client's
        // (docs/bench/pipeline.md). The daemon maps it when a request uses it.
        let file = create_sized(&name, size)?;
        drop(file);
        let _ = cache;
        self.lock().lent.insert(name.clone(), (size, pid));
        Ok(Some((name, size)))
    }

    /// Takes back segments client `pid` borrowed; names it did not borrow are
    /// ignored.
    pub fn release(&self, pid: i32, names: &[String]) {
        let mut inner = self.lock();
        for name in names {
            if matches!(inner.lent.get(name), Some(&(_, owner)) if owner == pid) {
                let (size, _) = inner.lent.remove(name).expect("checked above");
                inner.idle.push(Idle {
                    name: name.clone(),
                    size,
                    since: Instant::now(),
                });
            }
        }
    }

    /// Reclaims the leases of dead clients, and unlinks idle segments beyond the
    /// byte limit (oldest first) or idle too long. The cache forgets their
    /// mappings at its next prune.
    pub fn sweep(&self) -> Vec<String> {
        let mut inner = self.lock();
        let dead: Vec<String> = inner
            .lent
            .iter()
            .filter(|(_, &(_, pid))| pid_is_dead(pid as u64))
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            let (size, _) = inner.lent.remove(&name).expect("listed above");
            inner.idle.push(Idle {
                name,
                size,
                since: Instant::now(),
            });
        }
        inner.idle.sort_by_key(|s| std::cmp::Reverse(s.since));
        let mut total = 0u64;
        let mut dropped = Vec::new();
        inner.idle.retain(|s| {
            total += s.size;
            let keep = total <= idle_max_bytes() && s.since.elapsed() < IDLE_MAX_AGE;
            if !keep {
                dropped.push(s.name.clone());
            }
            keep
        });
        drop(inner);
        for name in &dropped {
            let _ = std::fs::remove_file(path_of(name));
        }
        dropped
    }

    /// At exit: unlinks every segment the daemon created. Clients still using a
    /// lent one keep their mapping; the memory goes when they let it go.
    pub fn unlink_all(&self) {
        let mut inner = self.lock();
        let mut names: Vec<String> = inner.idle.drain(..).map(|s| s.name).collect();
        names.extend(inner.lent.drain().map(|(n, _)| n));
        drop(inner);
        for name in names {
            let _ = std::fs::remove_file(path_of(&name));
        }
    }

    /// (idle segments, idle bytes, lent segments, lent bytes)
    pub fn stats(&self) -> (usize, u64, usize, u64) {
        let inner = self.lock();
        (
            inner.idle.len(),
            inner.idle.iter().map(|s| s.size).sum(),
            inner.lent.len(),
            inner.lent.values().map(|(s, _)| s).sum(),
        )
    }
}

/// Creates `/dev/shm/<name>` (mode 0600, never an existing file) of `size` bytes
/// with no page allocated yet (a lent spare: the client allocates them).
fn create_sized(name: &str, size: u64) -> Result<std::fs::File> {
    let path = path_of(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| Failure::segment(format!("cannot create segment {name}: {e}")))?;
    if let Err(e) = file.set_len(size) {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(Failure::new(
            ErrorKind::TooLarge,
            format!("cannot size a segment of {size} bytes: {e}"),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease held by a process that died goes back to the pool at the next sweep.
    #[test]
    fn dead_clients_leases_are_reclaimed() {
        let cache = SegmentCache::new();
        let pool = SegmentPool::default();
        let uid = crate::config::euid();
        let me = std::process::id();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as i32;
        child.wait().unwrap();
        let (name, _) = pool
            .lease(&cache, uid, me, dead, 8192, true)
            .unwrap()
            .unwrap();
        assert!(pool
            .lease(&cache, uid, me, 1, 8192, false)
            .unwrap()
            .is_none());
        pool.sweep();
        let again = pool.lease(&cache, uid, me, 1, 8192, false).unwrap();
        assert_eq!(again.map(|(n, _)| n), Some(name.clone()));
        pool.unlink_all();
        assert!(!path_of(&name).exists());
    }

    /// A new segment is created at its size with no page allocated, and not
    /// mapped here: the client allocates its pages (see `SegmentPool::lease`).
    #[test]
    fn a_created_segment_is_sized_and_left_to_the_client() {
        let cache = SegmentCache::new();
        let pool = SegmentPool::default();
        let uid = crate::config::euid();
        let me = std::process::id();
        // Another "daemon pid" than the other tests' pools, whose names would clash.
        let creator = u32::MAX - me;
        let size = (64 << 20) + 4096;
        let (name, got) = pool
            .lease(&cache, uid, creator, me as i32, size, true)
            .unwrap()
            .unwrap();
        assert_eq!(got, size);
        assert_eq!(cache.stats(), (0, 0));
        let meta = std::fs::metadata(path_of(&name)).unwrap();
        assert_eq!(meta.len(), size);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.blocks(), 0, "no page allocated by the daemon");
        let m = cache.get(&name, uid).unwrap();
        assert_eq!(m.len() as u64, size);
        pool.unlink_all();
    }
}
