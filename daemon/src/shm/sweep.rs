//! Removing segments whose creator died.
//!
//! The shim names every segment `azm_<uid>_<pid>_<seq>` after the process that
//! created it. A client killed before it could unlink its segments would otherwise
//! leave them in `/dev/shm` (RAM) until reboot, so the daemon unlinks segments of
//! its own uid whose creating pid no longer exists.

use super::names::{self, SHM_DIR};
use std::os::unix::fs::MetadataExt;

/// True only when `pid` certainly names no live process (kill(pid, 0) says ESRCH).
/// A process we may not signal (EPERM) is alive; unusual pids count as alive.
pub fn pid_is_dead(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negatives address process groups, not a process.
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Unlinks `/dev/shm/azm_<uid>_<pid>_<seq>` files owned by `uid` whose `<pid>` is
/// dead. Returns the names removed.
pub fn unlink_dead_segments(uid: u32) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(SHM_DIR) else {
        return removed;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let Some(parsed) = names::parse(name) else {
            continue;
        };
        if parsed.uid != uid || !pid_is_dead(parsed.pid) {
            continue;
        }
        // The name says whose it is; the owner must agree before we delete anything.
        let path = names::path_of(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_file() && meta.uid() == uid => {}
            _ => continue,
        }
        if std::fs::remove_file(&path).is_ok() {
            removed.push(name.to_string());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pid_is_alive_and_odd_pids_are_not_dead() {
        assert!(!pid_is_dead(std::process::id() as u64));
        assert!(!pid_is_dead(0));
        assert!(!pid_is_dead(u64::MAX));
    }

    #[test]
    fn reaped_child_is_dead() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as u64;
        child.wait().expect("wait");
        assert!(pid_is_dead(pid));
    }
}
