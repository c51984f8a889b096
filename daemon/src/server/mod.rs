//! The daemon's life: runtime dir and lock, the startup report, the accept loop,
//! the sweeper, and an orderly exit on a signal, a `Shutdown` request or idleness.

pub mod connection;
pub mod lock;
pub mod state;

use crate::config::{self, Config};
use crate::shm::sweep;
use interprocess::local_socket::traits::Listener as _;
use interprocess::local_socket::{
    GenericFilePath, Listener, ListenerNonblockingMode, ListenerOptions, ToFsName,
};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use lock::{LockOutcome, PidFile};
use state::Daemon;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the accept loop looks for new connections, shutdown and idleness.
const ACCEPT_POLL: Duration = Duration::from_millis(25);
/// In-flight requests get this long to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection threads notice shutdown within their read poll (200 ms).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How often the accept loop checks that its socket is still the runtime dir's.
const SOCKET_CHECK: Duration = Duration::from_secs(1);

/// Exit code for a runtime dir that cannot be used safely.
pub const EXIT_RUNTIME_DIR: i32 = 2;
/// Exit code for any other startup failure.
pub const EXIT_STARTUP: i32 = 1;

/// One line on stderr, which the shim points at `daemon.log`.
pub fn log(message: &str) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    eprintln!("[{secs:.3} autozymed {}] {message}", std::process::id());
}

/// Runs the daemon; returns the process exit code.
pub fn run(config: Config) -> i32 {
    if let Err(e) = config::prepare_runtime_dir(&config.runtime_dir) {
        eprintln!("autozymed: {e}");
        return EXIT_RUNTIME_DIR;
    }

    // 1. The lock decides who the daemon is.
    let mut pid_file = match lock::acquire(&config.pid_path()) {
        Ok(LockOutcome::Acquired(f)) => f,
        Ok(LockOutcome::HeldBy(Some(pid))) => {
            // Lost the race to another starter: the caller just connects to it.
            let mut out = std::io::stdout();
            let _ = writeln!(out, "RUNNING {pid}");
            let _ = out.flush();
            return 0;
        }
        Ok(LockOutcome::HeldBy(None)) => {
            eprintln!(
                "autozymed: {} is locked by a process that has not written its pid",
                config.pid_path().display()
            );
            return EXIT_STARTUP;
        }
        Err(e) => {
            eprintln!(
                "autozymed: cannot lock {}: {e}",
                config.pid_path().display()
            );
            return EXIT_STARTUP;
        }
    };

    let daemon = Arc::new(Daemon::new(config));
    match start(&daemon, &mut pid_file) {
        Ok(listener) => serve(&daemon, listener, pid_file),
        Err(e) => {
            eprintln!("autozymed: {e}");
            let _ = std::fs::remove_file(daemon.config.socket_path());
            pid_file.remove();
            EXIT_STARTUP
        }
    }
}

/// 2.–3.: everything between winning the lock and the READY line.
fn start(daemon: &Arc<Daemon>, pid_file: &mut PidFile) -> Result<BoundSocket, String> {
    let config = &daemon.config;
    pid_file
        .write_pid(daemon.pid)
        .map_err(|e| format!("cannot write {}: {e}", config.pid_path().display()))?;

    let handler_state = Arc::clone(daemon);
    ctrlc::set_handler(move || handler_state.request_shutdown())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let socket_path = config.socket_path();
    // We hold the lock, so any socket file here belongs to a dead daemon.
    match std::fs::remove_file(&socket_path) {
        Ok(()) => log(&format!("removed stale {}", socket_path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot remove stale {}: {e}",
                socket_path.display()
            ))
        }
    }
    let listener = bind(&socket_path)
        .map_err(|e| format!("cannot listen on {}: {e}", socket_path.display()))?;
    let socket_ino = std::fs::symlink_metadata(&socket_path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| format!("cannot stat {}: {e}", socket_path.display()))?;

    rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .thread_name(|i| format!("autozymed-worker-{i}"))
        .build_global()
        .map_err(|e| format!("cannot start {} worker threads: {e}", config.threads))?;
    // Warm the pool: every worker runs once, so the first request pays no thread
    // start-up.
    rayon::broadcast(|_| ());

    let removed = sweep::unlink_dead_segments(daemon.euid);
    if !removed.is_empty() {
        log(&format!("removed segments of dead clients: {removed:?}"));
    }

    // The startup report: the shim reads exactly this line.
    let mut out = std::io::stdout();
    writeln!(out, "READY {} {}", daemon.pid, socket_path.display())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the startup report: {e}"))?;
    detach_stdout();
    log(&format!(
        "serving on {} with {} threads, idle timeout {} s, build {}",
        socket_path.display(),
        config.threads,
        config.idle_timeout_s,
        config::BUILD_ID
    ));
    Ok(BoundSocket {
        listener,
        dev_ino: socket_ino,
    })
}

struct BoundSocket {
    listener: Listener,
    /// The socket file we created, so we never unlink another daemon's.
    dev_ino: (u64, u64),
}

impl BoundSocket {
    /// Whether the file at `path` is still the socket we created (not removed,
    /// not replaced by another daemon's).
    fn is_at(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino)
    }
}

fn bind(path: &Path) -> std::io::Result<Listener> {
    ListenerOptions::new()
        .name(path.to_fs_name::<GenericFilePath>()?)
        .mode(0o600)
        // Accept never blocks, so the loop can watch for shutdown; accepted
        // streams are blocking (with timeouts set per connection).
        .nonblocking(ListenerNonblockingMode::Accept)
        // We unlink the socket ourselves, in the right order (see `serve`).
        .reclaim_name(false)
        .create_sync()
}

/// Points fd 1 at /dev/null so the parent reading our stdout sees EOF after the
/// READY line (and later prints cannot fail on a closed pipe).
fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 with a valid descriptor; `null` is closed after.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// 4.–5.: accept until shutdown, then drain and clean up.
fn serve(daemon: &Arc<Daemon>, socket: BoundSocket, pid_file: PidFile) -> i32 {
    spawn_sweeper(daemon);
    let idle_timeout = Duration::from_secs(daemon.config.idle_timeout_s);
    let socket_path = daemon.config.socket_path();
    let mut last_socket_check = Instant::now();
    let mut next_id = 0u64;
    loop {
        if daemon.shutting_down() {
            log("shutting down");
            break;
        }
        // With its socket removed (the runtime dir deleted) or replaced (a newer
        // daemon took over), no client can reach this daemon again: once nothing
        // is running or connected, exit instead of waiting out the idle timeout.
        if last_socket_check.elapsed() >= SOCKET_CHECK {
            last_socket_check = Instant::now();
            let quiet = daemon.in_flight() == 0 && daemon.open_connections() == 0;
            if !socket.is_at(&socket_path) && quiet {
                log(&format!(
                    "{} is gone or another daemon's; exiting",
                    socket_path.display()
                ));
                daemon.request_shutdown();
                break;
            }
        }
        if !idle_timeout.is_zero() && daemon.idle_for() >= idle_timeout {
            log(&format!("idle for {} s; exiting", idle_timeout.as_secs()));
            daemon.request_shutdown();
            break;
        }
        match socket.listener.accept() {
            Ok(stream) => {
                daemon.touch();
                next_id += 1;
                let id = next_id;
                let conn_state = Arc::clone(daemon);
                let spawned = std::thread::Builder::new()
                    .name(format!("autozymed-conn-{id}"))
                    .spawn(move || connection::serve(&conn_state, stream, id));
                if let Err(e) = spawned {
                    log(&format!("cannot start a thread for connection {id}: {e}"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                // E.g. out of descriptors: wait instead of spinning.
                log(&format!("accept failed: {e}"));
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }

    // Stop accepting before anything else: new clients get "connection refused"
    // and start (or fall back) instead of waiting on a dying daemon.
    if socket.is_at(&socket_path) {
        let _ = std::fs::remove_file(&socket_path);
    }
    drop(socket.listener);

    wait_until(DRAIN_TIMEOUT, || daemon.in_flight() == 0);
    if daemon.in_flight() > 0 {
        log(&format!(
            "{} request(s) still running after {} s; exiting anyway",
            daemon.in_flight(),
            DRAIN_TIMEOUT.as_secs()
        ));
    }
    wait_until(CLOSE_TIMEOUT, || daemon.open_connections() == 0);
    daemon.pool.unlink_all();
    // Last: while we hold the lock, a new daemon cannot start and take over the
    // socket path we were cleaning up.
    pid_file.remove();
    log("exited cleanly");
    0
}

fn wait_until(limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// 6.: every 10 s, forget mappings of segments that are gone and unlink segments
/// whose creator died.
fn spawn_sweeper(daemon: &Arc<Daemon>) {
    let state = Arc::clone(daemon);
    let spawned = std::thread::Builder::new()
        .name("autozymed-sweeper".into())
        .spawn(move || loop {
            let next = Instant::now() + SWEEP_INTERVAL;
            while Instant::now() < next {
                if state.shutting_down() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            state.pool.sweep();
            state.segments.prune();
            crate::shm::peer::trim_scratch();
            let removed = sweep::unlink_dead_segments(state.euid);
            if !removed.is_empty() {
                log(&format!("removed segments of dead clients: {removed:?}"));
            }
        });
    if let Err(e) = spawned {
        log(&format!("cannot start the sweeper: {e}"));
    }
}
