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
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
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
        let (file, map) = allocate(&name, size)?;
        // Keep the mapping whose pages were just faulted in, so the client's first
        // use costs nothing here (mapping the segment again would fill a second
        // page table: about 60 ms a GB).
        if let Err(e) = cache.insert_created(&name, uid, &file, map) {
            let _ = std::fs::remove_file(path_of(&name));
            return Err(e);
        }
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

/// Creates `/dev/shm/<name>` (mode 0600, never an existing file) with `size` bytes
/// of pages reserved, so a full /dev/shm is an error here, not a SIGBUS later.
/// Returns the file and, where its pages were populated through a mapping, that
/// mapping.
fn allocate(name: &str, size: u64) -> Result<(std::fs::File, Option<memmap2::MmapRaw>)> {
    let path = path_of(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| Failure::segment(format!("cannot create segment {name}: {e}")))?;
    match reserve_pages(&file, size) {
        Ok(map) => Ok((file, map)),
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&path);
            Err(Failure::new(
                ErrorKind::TooLarge,
                format!("cannot reserve {size} bytes of shared memory: {e}"),
            ))
        }
    }
}

/// Pieces of a new segment whose pages are allocated as separate parallel jobs.
const RESERVE_PIECE: usize = 64 << 20;

/// Allocates and zeroes every page of the new, empty segment `file`.
///
/// Fresh memory is the dominant cost of a large result (4.3 GB for scale's
/// 180,000 x 3,000), and one thread allocating tmpfs pages (posix_fallocate,
/// then MAP_POPULATE zeroing them) leaves the other cores idle. Here the pieces
/// are populated for writing (`MADV_POPULATE_WRITE`, Linux 5.14) by one thread a
/// core, which also turns a full /dev/shm into an error rather than a later
/// SIGBUS. Older kernels get posix_fallocate.
///
/// The threads run at a lower priority (nice +10), not on the rayon pool: a
/// spare segment is often populated in the background while the client's next
/// call runs its kernels, which must not wait behind it; when nothing else runs,
/// the low priority costs nothing.
///
/// Returns the shared mapping the pages were populated through (None on old
/// kernels and for an empty file).
fn reserve_pages(file: &std::fs::File, size: u64) -> std::io::Result<Option<memmap2::MmapRaw>> {
    file.set_len(size)?;
    let Ok(len) = usize::try_from(size) else {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    };
    if len == 0 {
        return Ok(None);
    }
    let map = memmap2::MmapOptions::new().len(len).map_raw(file)?;
    let base = map.as_mut_ptr() as usize;
    let populate = |start: usize| -> std::io::Result<()> {
        let piece = RESERVE_PIECE.min(len - start);
        // SAFETY: the range lies inside `map`, which outlives this call; the
        // advice only faults pages in, it does not change their contents.
        let rc = unsafe {
            libc::madvise(
                (base + start) as *mut libc::c_void,
                piece,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // EFAULT: a page could not be allocated (/dev/shm is full).
    let full = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::EFAULT) => std::io::Error::from_raw_os_error(libc::ENOSPC),
        _ => e,
    };
    match populate(0) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // The kernel predates MADV_POPULATE_WRITE.
            drop(map);
            let off = libc::off_t::try_from(size)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
            // SAFETY: a plain system call on a file descriptor we own.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, off) };
            return if rc == 0 {
                Ok(None)
            } else {
                Err(std::io::Error::from_raw_os_error(rc))
            };
        }
        other => other.map_err(full)?,
    }
    let next = AtomicUsize::new(RESERVE_PIECE);
    let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = threads.min(len.div_ceil(RESERVE_PIECE) - 1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                // SAFETY: plain system calls about this thread itself.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
                loop {
                    let start = next.fetch_add(RESERVE_PIECE, Ordering::Relaxed);
                    if start >= len {
                        return;
                    }
                    if let Err(e) = populate(start) {
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        next.store(len, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(full(e)),
        None => Ok(Some(map)),
    }
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

    /// A new segment is cached with the mapping its pages were populated through,
    /// which a later lookup by name returns.
    #[test]
    fn a_created_segment_is_mapped_once_and_cached() {
        let cache = SegmentCache::new();
        let pool = SegmentPool::default();
        let uid = crate::config::euid();
        let me = std::process::id();
        // Another "daemon pid" than the other tests' pools, whose names would clash.
        let creator = u32::MAX - me;
        let size = RESERVE_PIECE as u64 + 4096;
        let (name, got) = pool
            .lease(&cache, uid, creator, me as i32, size, true)
            .unwrap()
            .unwrap();
        assert_eq!(got, size);
        assert_eq!(cache.stats(), (1, size));
        let m = cache.get(&name, uid).unwrap();
        assert_eq!(m.len() as u64, size);
        // SAFETY: the mapping is `size` bytes long and nothing else writes it.
        let bytes = unsafe { std::slice::from_raw_parts(m.base(), m.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(cache.stats(), (1, size));
        pool.unlink_all();
    }

    /// A new segment's pages are all there, zeroed, across several pieces.
    #[test]
    fn reserved_pages_are_allocated_and_zero() {
        let dir = std::env::temp_dir().join(format!("azm-reserve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seg");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let size = 2 * RESERVE_PIECE + 12_288;
        reserve_pages(&file, size as u64).unwrap();
        assert_eq!(file.metadata().unwrap().len(), size as u64);
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert!(map.iter().all(|&b| b == 0));
        drop(map);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A full tmpfs is an error (ENOSPC) when the segment is created, never a
    /// SIGBUS at first write. Needs a tmpfs of its own: skipped without the
    /// privilege to mount one.
    #[test]
    fn full_tmpfs_is_an_error_not_a_sigbus() {
        use std::ffi::CString;
        let dir = std::env::temp_dir().join(format!("azm-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c_dir = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let fstype = CString::new("tmpfs").unwrap();
        let opts = CString::new("size=1m").unwrap();
        // SAFETY: plain system call with valid C strings.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                c_dir.as_ptr(),
                fstype.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!(
                "skipped: cannot mount a tmpfs ({})",
                std::io::Error::last_os_error()
            );
            let _ = std::fs::remove_dir(&dir);
            return;
        }
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(name))
                .unwrap()
        };
        let small = reserve_pages(&open("small"), 256 << 10).map(drop);
        let big = reserve_pages(&open("big"), 4 << 20).map(drop);
        // SAFETY: unmounting the tmpfs mounted above.
        unsafe { libc::umount2(c_dir.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&dir);
        small.unwrap();
        assert_eq!(big.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    }
}
