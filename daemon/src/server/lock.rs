//! The pid file, `daemon.pid`, held with `flock` for the daemon's whole life.
//!
//! The lock (not the file's existence or contents) decides who the daemon is: a
//! crashed daemon's lock is released by the kernel, so a leftover file is simply
//! taken over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct PidFile {
    file: File,
    path: PathBuf,
}

pub enum LockOutcome {
    /// We hold the lock: we are the daemon.
    Acquired(PidFile),
    /// Another process holds it; its pid if it has written one yet.
    HeldBy(Option<u32>),
}

/// How long a losing starter waits for the winner to write its pid.
const WAIT_FOR_PID: Duration = Duration::from_secs(5);

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// True while `path` still names the file `file` is open on. A daemon that is
/// exiting unlinks its pid file before releasing the lock, so a lock won on such an
/// unlinked file means nothing and must be retried on a fresh one.
fn still_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok().filter(|&pid| pid > 0)
}

/// Takes the lock on `path`, or reports who holds it.
pub fn acquire(path: &Path) -> std::io::Result<LockOutcome> {
    let deadline = Instant::now() + WAIT_FOR_PID;
    loop {
        let mut file = open(path)?;
        if try_flock(&file)? {
            if still_linked(&file, path) {
                return Ok(LockOutcome::Acquired(PidFile {
                    file,
                    path: path.to_path_buf(),
                }));
            }
            continue;
        }
        // A pid read from an unlinked file belongs to a daemon on its way out.
        if still_linked(&file, path) {
            if let Some(pid) = read_pid(&mut file) {
                return Ok(LockOutcome::HeldBy(Some(pid)));
            }
        }
        // The holder has locked but not yet written its pid, or is exiting.
        if Instant::now() >= deadline {
            return Ok(LockOutcome::HeldBy(None));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl PidFile {
    /// Replaces the file's contents with `pid` and a newline.
    pub fn write_pid(&mut self, pid: u32) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(format!("{pid}\n").as_bytes())?;
        self.file.flush()
    }

    /// Unlinks the pid file (if it is still ours), then releases the lock.
    pub fn remove(self) {
        if still_linked(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquirer_sees_the_holder_and_takes_over_after_release() {
        let dir = std::env::temp_dir().join(format!("azm-lock-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("daemon.pid");
        // A leftover file from a dead daemon is simply taken over.
        std::fs::write(&path, "999999999\n").unwrap();

        let LockOutcome::Acquired(mut held) = acquire(&path).unwrap() else {
            panic!("first acquire must win");
        };
        held.write_pid(4242).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "4242\n");
        // flock is per open file description, so a second open in this process
        // competes like another process would.
        assert!(matches!(
            acquire(&path).unwrap(),
            LockOutcome::HeldBy(Some(4242))
        ));

        held.remove();
        assert!(!path.exists());
        assert!(matches!(acquire(&path).unwrap(), LockOutcome::Acquired(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
