//! Helpers for the integration tests: a real `autozymed` process in a private
//! runtime dir, a socket client, and real segments in /dev/shm.
#![allow(dead_code)] // each test binary uses a different subset

use autozyme_protocol::{
    decode, read_payload, write_frame, ArrayRef, DType, Location, Request, Response,
    PROTOCOL_VERSION,
};
use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, Stream, ToFsName};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_autozymed");

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::SeqCst)
}

pub fn euid() -> u32 {
    unsafe { libc::geteuid() }
}

/// A fresh private base directory; the runtime dir is `<base>/rt` (not created).
pub struct TempBase(pub PathBuf);

impl TempBase {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("azm-it-{}-{}", std::process::id(), unique()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempBase(dir)
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.0.join("rt")
    }
}

impl Drop for TempBase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the daemon binary and returns the child plus its first stdout line.
/// `runtime_dir` goes on the command line when given.
pub fn start_raw(
    runtime_dir: Option<&Path>,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> (Child, String) {
    let mut cmd = Command::new(BIN);
    if let Some(dir) = runtime_dir {
        cmd.arg("--runtime-dir").arg(dir);
    }
    cmd.args(args)
        .env_remove("AUTOZYME_RUNTIME_DIR")
        .env_remove("AUTOZYME_IDLE_TIMEOUT")
        .env_remove("AUTOZYME_THREADS")
        .env_remove("AUTOZYME_TEST_HOOKS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    let mut child = cmd.spawn().expect("spawn autozymed");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no startup report within 20 s");
    (child, line)
}

pub struct TestDaemon {
    pub base: TempBase,
    pub child: Child,
    pub pid: u32,
    pub socket: PathBuf,
}

impl TestDaemon {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let base = TempBase::new();
        Self::start_in(base, args, env)
    }

    pub fn start_in(base: TempBase, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = base.0.join("daemon.log");
        let (child, line) = start_raw(Some(&base.runtime_dir()), args, env, &log);
        let mut parts = line.trim_end_matches('\n').splitn(3, ' ');
        assert_eq!(parts.next(), Some("READY"), "startup report {line:?}");
        let pid: u32 = parts.next().unwrap().parse().unwrap();
        let socket = PathBuf::from(parts.next().unwrap());
        assert_eq!(pid, child.id());
        assert_eq!(socket, base.runtime_dir().join("daemon.sock"));
        TestDaemon {
            base,
            child,
            pid,
            socket,
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.base.runtime_dir()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base.0.join("daemon.log")).unwrap_or_default()
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// A connected client that has completed the handshake.
    pub fn client(&self) -> Client {
        let mut c = self.connect();
        c.hello();
        c
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid as i32, signal);
        }
    }

    /// Waits for the daemon to exit; `None` on timeout.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Client {
    pub stream: Stream,
}

impl Client {
    pub fn connect(socket: &Path) -> Self {
        let name = socket.to_fs_name::<GenericFilePath>().unwrap();
        let stream = Stream::connect(name).expect("connect to the daemon");
        stream
            .set_recv_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client { stream }
    }

    pub fn send(&mut self, request: &Request) {
        write_frame(&mut &self.stream, request).expect("send request");
    }

    /// The next response; `None` when the daemon closed the connection.
    pub fn recv(&mut self) -> Option<Response> {
        match read_payload(&mut &self.stream) {
            Ok(Some(p)) => Some(decode(&p).expect("decodable response")),
            Ok(None) => None,
            Err(_) => None,
        }
    }

    pub fn call(&mut self, request: &Request) -> Response {
        self.send(request);
        self.recv().expect("a response")
    }

    pub fn hello(&mut self) -> Response {
        let r = self.call(&Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            build_id: String::new(),
            client_pid: std::process::id(),
        });
        assert!(matches!(r, Response::Hello { .. }), "{r:?}");
        r
    }
}

/// A real segment `/dev/shm/azm_<euid>_<pid>_<n>` that arrays are appended to.
pub struct Segment {
    pub name: String,
    pub path: PathBuf,
    bytes: Vec<u8>,
}

impl Segment {
    pub fn new() -> Self {
        Self::named_for_pid(std::process::id() as u64)
    }

    pub fn named_for_pid(pid: u64) -> Self {
        let name = format!("azm_{}_{}_{}", euid(), pid, 1000 + unique());
        Segment {
            path: PathBuf::from("/dev/shm").join(&name),
            name,
            bytes: Vec::new(),
        }
    }

    fn push(&mut self, raw: &[u8], dtype: DType, len: usize) -> ArrayRef {
        while !self.bytes.len().is_multiple_of(8) {
            self.bytes.push(0);
        }
        let offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(raw);
        ArrayRef {
            location: Location::Segment {
                name: self.name.clone(),
                offset,
            },
            len: len as u64,
            dtype,
        }
    }

    pub fn f32s(&mut self, v: &[f32]) -> ArrayRef {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(&raw, DType::F32, v.len())
    }
    pub fn f64s(&mut self, v: &[f64]) -> ArrayRef {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(&raw, DType::F64, v.len())
    }
    pub fn i32s(&mut self, v: &[i32]) -> ArrayRef {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(&raw, DType::I32, v.len())
    }
    pub fn i64s(&mut self, v: &[i64]) -> ArrayRef {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(&raw, DType::I64, v.len())
    }

    /// Writes the file (the segment exists from now on).
    pub fn write(&self) {
        std::fs::write(&self.path, &self.bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.set_len(self.bytes.len() as u64).unwrap();
    }

    pub fn read_f32s(&self, r: &ArrayRef) -> Vec<f32> {
        let bytes = std::fs::read(&self.path).unwrap();
        let start = offset_of(r);
        bytes[start..start + 4 * r.len as usize]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn read_f64s(&self, r: &ArrayRef) -> Vec<f64> {
        let bytes = std::fs::read(&self.path).unwrap();
        let start = offset_of(r);
        bytes[start..start + 8 * r.len as usize]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// The byte offset of an array placed in a test segment.
pub fn offset_of(r: &ArrayRef) -> usize {
    match &r.location {
        Location::Segment { offset, .. } => *offset as usize,
        Location::Peer { .. } => panic!("not a segment array"),
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid of a process that has certainly exited (and been reaped).
pub fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}
