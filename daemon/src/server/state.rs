//! State shared by the accept loop, the connection threads and the sweeper.

use crate::config::Config;
use crate::shm::{SegmentCache, SegmentPool};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub config: Config,
    pub pid: u32,
    pub euid: u32,
    pub started: Instant,
    pub segments: SegmentCache,
    /// Segments the daemon owns and lends to clients.
    pub pool: SegmentPool,
    /// Derived matrices keyed by content (see `crate::cache`).
    pub cache: crate::cache::Cache,
    pub requests_served: AtomicU64,
    pub requests_failed: AtomicU64,
    pub open_connections: AtomicU32,
    shutdown: AtomicBool,
    in_flight: AtomicU32,
    /// Milliseconds after `started` of the last request received or finished.
    last_activity_ms: AtomicU64,
}

impl Daemon {
    pub fn new(config: Config) -> Self {
        Daemon {
            config,
            pid: std::process::id(),
            euid: crate::config::euid(),
            started: Instant::now(),
            segments: SegmentCache::new(),
            pool: SegmentPool::default(),
            cache: crate::cache::Cache::default(),
            requests_served: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            open_connections: AtomicU32::new(0),
            shutdown: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            last_activity_ms: AtomicU64::new(0),
        }
    }

    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Marks activity now (resets the idle clock).
    pub fn touch(&self) {
        let now = self.uptime().as_millis() as u64;
        self.last_activity_ms.fetch_max(now, Ordering::SeqCst);
    }

    /// How long the daemon has been idle: zero while a request is being processed,
    /// else the time since the last request was received or finished.
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_activity_ms.load(Ordering::SeqCst);
        Duration::from_millis((self.uptime().as_millis() as u64).saturating_sub(last))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> u32 {
        self.open_connections.load(Ordering::SeqCst)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn begin_request(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self)
    }
}

pub struct InFlight<'a>(&'a Daemon);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts an open connection until dropped.
pub struct ConnectionGuard<'a>(&'a Daemon);

impl<'a> ConnectionGuard<'a> {
    pub fn new(daemon: &'a Daemon) -> Self {
        daemon.open_connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(daemon)
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}
