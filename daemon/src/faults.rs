//! Fault injection for the hardening tests: the daemon SIGKILLs itself (or
//! stalls) at a chosen phase of a chosen request, once.
//!
//! `AUTOZYME_TEST_KILL_AT=<Request>:<phase>:<flag file>[:stall ms]`, honoured only
//! with `AUTOZYME_TEST_HOOKS=1`. The fault happens only while the flag file exists,
//! and the file is removed first, so the daemon the shim starts next (which
//! inherits the same environment) serves normally. With a stall, the daemon sleeps
//! that long instead of dying, then carries on (a kernel outliving the client's
//! timeout). Phases:
//! - `received`: the request is decoded, nothing done yet;
//! - `kernel`: between two waves of a kernel, part of its output written;
//! - `reply`: the work is done and the response not yet sent.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Received,
    Kernel,
    Reply,
}

struct Plan {
    request: String,
    phase: Phase,
    flag: PathBuf,
    stall_ms: Option<u64>,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        if std::env::var_os("AUTOZYME_TEST_HOOKS").is_none_or(|v| v != "1") {
            return None;
        }
        let spec = std::env::var("AUTOZYME_TEST_KILL_AT").ok()?;
        let mut parts = spec.splitn(4, ':');
        let request = parts.next()?.to_string();
        let phase = match parts.next()? {
            "received" => Phase::Received,
            "kernel" => Phase::Kernel,
            "reply" => Phase::Reply,
            _ => return None,
        };
        let flag = PathBuf::from(parts.next()?);
        let stall_ms = parts.next().and_then(|v| v.parse().ok());
        Some(Plan {
            request,
            phase,
            flag,
            stall_ms,
        })
    })
    .as_ref()
}

/// The request being handled (tests send one at a time); read by [`point`] when
/// it is called from inside a kernel's scheduling, where the request is unknown.
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Notes which request is being handled (its variant name).
pub fn begin(request: &str) {
    if plan().is_some() {
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = request.to_string();
    }
}

/// Dies (or stalls) here if the plan says so.
pub fn point(phase: Phase) {
    let Some(plan) = plan() else { return };
    if plan.phase != phase || *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) != plan.request {
        return;
    }
    if std::fs::remove_file(&plan.flag).is_err() {
        return;
    }
    if let Some(ms) = plan.stall_ms {
        eprintln!(
            "autozymed: test hook: stalling {ms} ms at {phase:?} of {}",
            plan.request
        );
        std::thread::sleep(std::time::Duration::from_millis(ms));
    } else {
        eprintln!(
            "autozymed: test hook: killed at {phase:?} of {}",
            plan.request
        );
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
