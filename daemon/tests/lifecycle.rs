//! The daemon's life: startup report, lock, stale files, shutdown paths, idle
//! exit, runtime-dir checks and the segment sweeper.

mod common;

use autozyme_protocol::{Request, Response};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn assert_cleaned_up(runtime_dir: &Path) {
    assert!(
        !runtime_dir.join("daemon.sock").exists(),
        "socket left behind"
    );
    assert!(
        !runtime_dir.join("daemon.pid").exists(),
        "pid file left behind"
    );
}

#[test]
fn runtime_files_and_modes() {
    let d = TestDaemon::start(&[], &[]);
    let dir = d.runtime_dir();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("daemon.pid")), 0o600);
    assert_eq!(mode(&dir.join("daemon.sock")) & 0o077, 0);
    let pid = std::fs::read_to_string(dir.join("daemon.pid")).unwrap();
    assert_eq!(pid.trim(), d.pid.to_string());
}

#[test]
fn second_instance_reports_running() {
    let d = TestDaemon::start(&[], &[]);
    let log = d.base.0.join("second.log");
    let (mut second, line) = start_raw(Some(&d.runtime_dir()), &[], &[], &log);
    assert_eq!(line, format!("RUNNING {}\n", d.pid));
    assert!(second.wait().unwrap().success());
    // The first one is unaffected.
    assert_eq!(d.client().call(&Request::Ping), Response::Pong);
}

#[test]
fn stale_socket_and_pid_file_from_a_dead_daemon() {
    let base = TempBase::new();
    let dir = base.runtime_dir();
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(dir.join("daemon.pid"), format!("{}\n", dead_pid())).unwrap();
    // A real socket file nobody listens on, as a killed daemon leaves it.
    drop(std::os::unix::net::UnixListener::bind(dir.join("daemon.sock")).unwrap());
    assert!(dir.join("daemon.sock").exists());

    let d = TestDaemon::start_in(base, &[], &[]);
    assert_eq!(d.client().call(&Request::Ping), Response::Pong);
    let pid = std::fs::read_to_string(dir.join("daemon.pid")).unwrap();
    assert_eq!(pid.trim(), d.pid.to_string());
}

#[test]
fn shutdown_request() {
    let mut d = TestDaemon::start(&[], &[]);
    let mut idle = d.client(); // an open, silent connection does not block exit
    let mut c = d.client();
    assert_eq!(c.call(&Request::Shutdown), Response::ShuttingDown);
    let status = d.wait_exit(Duration::from_secs(15)).expect("daemon exits");
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert_cleaned_up(&d.runtime_dir());
    assert_eq!(idle.recv(), None);
}

#[test]
fn sigterm_and_sigint() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut d = TestDaemon::start(&[], &[]);
        let _idle = d.client();
        d.signal(signal);
        let status = d.wait_exit(Duration::from_secs(15)).expect("daemon exits");
        assert!(status.success(), "signal {signal}: {status:?}\n{}", d.log());
        assert_cleaned_up(&d.runtime_dir());
    }
}

#[test]
fn idle_timeout_exits_despite_an_open_connection() {
    let started = Instant::now();
    let mut d = TestDaemon::start(&["--idle-timeout", "1"], &[]);
    let mut idle = d.client();
    let status = d.wait_exit(Duration::from_secs(15)).expect("idle exit");
    assert!(status.success());
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_cleaned_up(&d.runtime_dir());
    assert_eq!(idle.recv(), None);
    assert!(d.log().contains("idle"));
}

#[test]
fn settings_from_the_environment() {
    let base = TempBase::new();
    let dir = base.runtime_dir();
    let log = base.0.join("daemon.log");
    let dir_str = dir.display().to_string();
    let env = [
        ("AUTOZYME_RUNTIME_DIR", dir_str.as_str()),
        ("AUTOZYME_THREADS", "1"),
        ("AUTOZYME_IDLE_TIMEOUT", "0"),
    ];
    let (mut child, line) = start_raw(None, &[], &env, &log);
    let socket = dir.join("daemon.sock");
    assert_eq!(line, format!("READY {} {}\n", child.id(), socket.display()));
    let mut c = Client::connect(&socket);
    c.hello();
    match c.call(&Request::Status) {
        Response::Status(s) => {
            assert_eq!(s.threads, 1);
            assert_eq!(s.idle_timeout_s, 0);
            assert_eq!(s.runtime_dir, dir_str);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call(&Request::Shutdown), Response::ShuttingDown);
    assert!(child.wait().unwrap().success());
}

#[test]
fn unsafe_runtime_dirs_are_refused() {
    let base = TempBase::new();
    let open = base.0.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let real = base.0.join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = base.0.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for dir in [&open, &link] {
        let out = std::process::Command::new(BIN)
            .arg("--runtime-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", dir.display());
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("runtime dir"));
    }
}

#[test]
fn sleep_hook_shares_the_daemon_and_yields_to_shutdown() {
    let mut d = TestDaemon::start(&[], &[("AUTOZYME_TEST_HOOKS", "1")]);
    let mut sleeper = d.client();
    sleeper.send(&Request::Sleep { millis: 60_000 });
    std::thread::sleep(Duration::from_millis(100));

    // Another connection is served while the first one sleeps.
    let mut c = d.client();
    let t = Instant::now();
    assert_eq!(c.call(&Request::Ping), Response::Pong);
    assert!(t.elapsed() < Duration::from_secs(1));
    match c.call(&Request::Status) {
        Response::Status(s) => assert_eq!(s.open_connections, 2),
        other => panic!("{other:?}"),
    }

    // Shutdown cuts the long sleep short: the daemon exits well within the drain
    // limit, and the sleeping request still gets its reply.
    let t = Instant::now();
    assert_eq!(c.call(&Request::Shutdown), Response::ShuttingDown);
    assert_eq!(sleeper.recv(), Some(Response::Done));
    let status = d.wait_exit(Duration::from_secs(15)).expect("daemon exits");
    assert!(status.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_cleaned_up(&d.runtime_dir());
}
