//! Arrays in the connected client's own memory, copied with Linux cross-memory
//! attach (`process_vm_readv` / `process_vm_writev`).
//!
//! The pid is the one the socket reports for the peer (SO_PEERCRED), never a
//! number the client sends, and the kernel applies its ptrace access check, so
//! only memory the peer could read itself is reachable. A bad address is an
//! `EFAULT` error reply; a kernel that forbids cross-memory attach (Yama
//! `ptrace_scope`) is `Unsupported`, and the shim places the array in shared
//! memory instead.

use crate::error::{Failure, Result};
use crate::kernels::Float;
use autozyme_protocol::ErrorKind;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A private, 8-byte aligned copy of (or output buffer for) peer memory. Its
/// storage comes from, and returns to, a scratch pool (see [`take_words`]).
#[derive(Debug)]
pub struct PeerBuffer {
    words: Vec<u64>,
    /// Where the bytes came from / go to in the peer.
    pub address: u64,
    pub bytes: usize,
}

impl Drop for PeerBuffer {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.words));
    }
}

/// Released buffers kept for reuse, with the time they were released. Fresh
/// memory costs a page fault per page on first touch, several times the cost of
/// the copy itself, so a re-run that reuses a buffer only pays the copy.
static SCRATCH: Mutex<Vec<(Vec<u64>, Instant)>> = Mutex::new(Vec::new());
/// Bytes of scratch kept at most, and for how long unused.
const SCRATCH_MAX_BYTES: usize = 4 << 30;
const SCRATCH_MAX_IDLE: Duration = Duration::from_secs(600);

fn scratch() -> std::sync::MutexGuard<'static, Vec<(Vec<u64>, Instant)>> {
    SCRATCH.lock().unwrap_or_else(|e| e.into_inner())
}

/// A vector of `words` elements whose contents are arbitrary (every caller
/// overwrites all of it: a peer read, or a kernel writing every output element).
fn take_words(words: usize) -> Vec<u64> {
    let reused = {
        let mut pool = scratch();
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, (v, _))| v.capacity() >= words && v.capacity() <= 2 * words.max(512))
            .min_by_key(|(_, (v, _))| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i).0)
    };
    // A reused vector keeps its old (initialized) contents up to its length; only
    // growth is zero-filled. Either way every word is initialized, and callers
    // overwrite what they use.
    match reused {
        Some(mut v) if v.len() >= words => {
            v.truncate(words);
            v
        }
        Some(mut v) => {
            v.resize(words, 0);
            v
        }
        // Fresh memory through calloc: the kernel's zero pages, no second pass.
        None => vec![0u64; words],
    }
}

fn give_back(words: Vec<u64>) {
    if words.capacity() == 0 {
        return;
    }
    let mut pool = scratch();
    pool.push((words, Instant::now()));
    let mut total: usize = pool.iter().map(|(v, _)| v.capacity() * 8).sum();
    // Oldest first out, past the byte limit.
    pool.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    while total > SCRATCH_MAX_BYTES {
        if let Some((v, _)) = pool.pop() {
            total -= v.capacity() * 8;
        }
    }
}

/// Frees scratch buffers unused for a while (called by the daemon's sweeper).
pub fn trim_scratch() {
    scratch().retain(|(_, released)| released.elapsed() < SCRATCH_MAX_IDLE);
}

/// Largest peer array copied into the daemon: `AUTOZYME_MAX_BYTES`, else half of
/// the memory the kernel reports available, so a client cannot make the daemon
/// allocate itself into the OOM killer.
pub fn budget() -> usize {
    if let Some(v) = std::env::var("AUTOZYME_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return v;
    }
    usize::try_from(crate::config::meminfo_bytes("MemAvailable") / 2).unwrap_or(usize::MAX)
}

impl PeerBuffer {
    /// A buffer of `bytes` bytes standing for peer memory at `address`; its
    /// contents are zero until [`PeerBuffer::read_from`].
    pub fn new(address: u64, bytes: usize) -> Result<Self> {
        if bytes > budget() {
            return Err(Failure::new(
                ErrorKind::TooLarge,
                format!("an array of {bytes} bytes exceeds the daemon's memory budget"),
            ));
        }
        address
            .checked_add(bytes as u64)
            .ok_or_else(|| Failure::bad_request("peer address range overflows"))?;
        Ok(PeerBuffer {
            words: take_words(bytes.div_ceil(8)),
            address,
            bytes,
        })
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.words.as_ptr() as *const u8
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }

    /// The buffer's `bytes` bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the words hold at least `bytes` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.bytes) }
    }

    /// The buffer as `bytes / size_of::<T>()` values (f32/f64: every bit pattern
    /// is a value, and the storage is 8-byte aligned).
    pub fn as_slice<T: Float>(&self) -> &[T] {
        let n = self.bytes / std::mem::size_of::<T>();
        // SAFETY: the words hold at least `bytes` initialized bytes, aligned to 8.
        unsafe { std::slice::from_raw_parts(self.as_ptr() as *const T, n) }
    }

    pub fn as_mut_slice<T: Float>(&mut self) -> &mut [T] {
        let n = self.bytes / std::mem::size_of::<T>();
        // SAFETY: as for `as_slice`, and `&mut self` makes it the only view.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr() as *mut T, n) }
    }

    /// Fills the buffer from the peer's memory.
    pub fn read_from(&mut self, pid: i32) -> Result<()> {
        let (ptr, address, bytes) = (self.as_mut_ptr(), self.address, self.bytes);
        transfer(pid, ptr, address, bytes, Direction::Read)
    }

    /// Writes the buffer back into the peer's memory.
    pub fn write_to(&mut self, pid: i32) -> Result<()> {
        let (ptr, address, bytes) = (self.as_mut_ptr(), self.address, self.bytes);
        transfer(pid, ptr, address, bytes, Direction::Write)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Bytes per system call: large transfers go in pieces, so a partial transfer
/// (which the kernel may return) is simply continued.
const PIECE: usize = 1 << 30;
/// Transfers above this size are split across the pool's threads: the copy runs
/// at memory speed per thread, and page faults on either side are taken in
/// parallel.
const PARALLEL_ABOVE: usize = 4 << 20;

/// Copies `bytes` between our buffer at `local` and the peer's memory at `remote`,
/// in parallel pieces for large transfers.
fn transfer(pid: i32, local: *mut u8, remote: u64, bytes: usize, dir: Direction) -> Result<()> {
    use rayon::prelude::*;
    if bytes <= PARALLEL_ABOVE {
        return transfer_serial(pid, local, remote, bytes, dir);
    }
    let parts = rayon::current_num_threads().max(1) * 2;
    let step = bytes.div_ceil(parts).next_multiple_of(4096);
    // Raw pointers are not Send; the address travels as an integer. Each piece
    // covers a disjoint part of our buffer.
    let local = local as usize;
    (0..bytes.div_ceil(step)).into_par_iter().try_for_each(|i| {
        let start = i * step;
        let len = step.min(bytes - start);
        transfer_serial(
            pid,
            (local + start) as *mut u8,
            remote + start as u64,
            len,
            dir,
        )
    })
}

fn transfer_serial(
    pid: i32,
    local: *mut u8,
    remote: u64,
    bytes: usize,
    dir: Direction,
) -> Result<()> {
    let mut done = 0usize;
    while done < bytes {
        let step = (bytes - done).min(PIECE);
        let local_iov = libc::iovec {
            // SAFETY: `local` points to a buffer of at least `bytes` bytes.
            iov_base: unsafe { local.add(done) } as *mut libc::c_void,
            iov_len: step,
        };
        let remote_iov = libc::iovec {
            iov_base: (remote + done as u64) as *mut libc::c_void,
            iov_len: step,
        };
        // SAFETY: the local iovec lies within our buffer; the kernel checks the
        // remote one against the peer's address space.
        let n = unsafe {
            match dir {
                Direction::Read => libc::process_vm_readv(pid, &local_iov, 1, &remote_iov, 1, 0),
                Direction::Write => libc::process_vm_writev(pid, &local_iov, 1, &remote_iov, 1, 0),
            }
        };
        if n <= 0 {
            let err = std::io::Error::last_os_error();
            let what = match dir {
                Direction::Read => "read",
                Direction::Write => "write",
            };
            // Not allowed here (Yama, no such syscall): the shim uses shared memory
            // instead. Anything else (a bad address, a gone peer) is the request's.
            let kind = match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOSYS) => ErrorKind::Unsupported,
                _ => ErrorKind::BadRequest,
            };
            return Err(Failure::new(
                kind,
                format!(
                    "cannot {what} {step} bytes of the client's memory at {:#x}: {err}",
                    remote + done as u64
                ),
            ));
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_own_memory_and_rejects_bad_addresses() {
        // Our own process is a valid peer of itself.
        let pid = std::process::id() as i32;
        let src: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut buf = PeerBuffer::new(src.as_ptr() as u64, 4000).unwrap();
        buf.read_from(pid).unwrap();
        let copy = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const f32, 1000) };
        assert_eq!(copy, &src[..]);

        let mut dst = vec![0f32; 1000];
        let mut out = PeerBuffer::new(dst.as_mut_ptr() as u64, 4000).unwrap();
        unsafe { out.as_mut_ptr().copy_from(buf.as_ptr(), 4000) };
        out.write_to(pid).unwrap();
        assert_eq!(dst, src);

        // Large enough to be copied in parallel pieces.
        let big: Vec<f64> = (0..3_000_001).map(|i| i as f64 * 0.5).collect();
        let mut buf = PeerBuffer::new(big.as_ptr() as u64, big.len() * 8).unwrap();
        buf.read_from(pid).unwrap();
        let copy = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const f64, big.len()) };
        assert_eq!(copy, &big[..]);
        let mut back = vec![0f64; big.len()];
        let mut out = PeerBuffer::new(back.as_mut_ptr() as u64, big.len() * 8).unwrap();
        unsafe { out.as_mut_ptr().copy_from(buf.as_ptr(), big.len() * 8) };
        out.write_to(pid).unwrap();
        assert_eq!(std::hint::black_box(&back), &big);

        let mut bad = PeerBuffer::new(8, 64).unwrap();
        assert!(bad.read_from(pid).is_err());
        assert!(PeerBuffer::new(u64::MAX - 4, 64).is_err());
        assert!(PeerBuffer::new(0, usize::MAX / 2).is_err());
    }
}
