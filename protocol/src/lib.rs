//! Wire types shared by the `autozymed` daemon and the Python shim.
//!
//! Framing: every message is a `u32` little-endian payload length followed by the
//! payload, which is bincode 1.3.3 with fixed-width integers, little endian
//! (see [`encode`]). The layout, which the Python codec in
//! `pyshim/autozyme/codec.py` reproduces by hand, is:
//! integers and floats little-endian fixed width; `bool` one byte; `String` and
//! `Vec<T>` a `u64` length then the items; `Option<T>` a `u8` tag (0 none, 1 some)
//! then the value; an enum a `u32` variant index then its fields in order; a struct
//! its fields in order. Golden byte vectors in `protocol/golden/` pin the layout
//! on both sides (`cargo test -p autozyme-protocol`, `tests/test_codec.py`).

use bincode::Options;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Bumped on any change of the wire types below.
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest frame either side accepts. Bulk data never travels in frames (it lives
/// in shared memory); the largest inline payloads are per-cell or per-gene vectors.
pub const MAX_FRAME_BYTES: u32 = 256 << 20;

/// Element type of an array placed in shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    I32,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// Where an array's elements are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// In a shared-memory segment created by the client: `name` is a bare segment
    /// name (`azm_<uid>_<pid>_<seq>`), never a path; `offset` is in bytes.
    Segment { name: String, offset: u64 },
    /// In the connected client's own memory, at `address`. The daemon copies such
    /// an array in (`process_vm_readv`) or, as an output, out (`process_vm_writev`)
    /// for the peer whose pid the socket reports, instead of mapping it. The shim
    /// uses this for arrays not yet in shared memory when no pooled segment is at
    /// hand: allocating a segment costs several times more than the copy.
    Peer { address: u64 },
}

/// A 1-D array of `len` elements of `dtype`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayRef {
    pub location: Location,
    pub len: u64,
    pub dtype: DType,
}

/// A matrix whose buffers live in shared memory. Dense matrices are C-contiguous.
/// A CSR matrix's `indices` may be left out for requests whose kernels never read
/// them (row sums without exclusion, row division): placing them would cost a copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Matrix {
    Csr {
        n_rows: u64,
        n_cols: u64,
        data: ArrayRef,
        indices: Option<ArrayRef>,
        indptr: ArrayRef,
    },
    Dense {
        n_rows: u64,
        n_cols: u64,
        data: ArrayRef,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// First message on every connection.
    Hello {
        protocol_version: u32,
        build_id: String,
        client_pid: u32,
    },
    Ping,
    Status,
    /// Ask the daemon to finish in-flight requests and exit.
    Shutdown,
    /// normalize_total, step 1: per-row sums of a CSR matrix, each accumulated in
    /// f64 in index order and rounded to the data's dtype (scanpy's `_normalize_csr`).
    /// With `exclude_max_fraction`, genes holding more than that fraction of some
    /// row's sum are left out and the sums are recomputed without them.
    RowSums {
        x: Matrix,
        exclude_max_fraction: Option<f64>,
    },
    /// normalize_total, step 2: `out[i, :] = x[i, :] / factors[i]` over the stored
    /// values. `factors` holds values of `factors_dtype` widened to f64; the division
    /// runs in f32 only when both the data and the factors are f32, else in f64,
    /// and is rounded to `out`'s dtype (numpy's `true_divide` casting).
    /// `out` has as many elements as `x`'s stored values and may be `x`'s own data.
    DivideRows {
        x: Matrix,
        factors: Vec<f64>,
        factors_dtype: DType,
        out: ArrayRef,
    },
    /// Map these segments now (all pages at once) and keep the mappings, so a later
    /// request using them pays no mapping cost. Sent ahead for buffers the client
    /// prepares in the background.
    Prefault {
        segments: Vec<String>,
    },
    /// Lend the client a shared-memory segment of at least `bytes` bytes from the
    /// daemon's pool: segments the daemon created and keeps mapped, returned by
    /// earlier clients (also ones that have exited). With `create`, allocate one
    /// when none fits; without, answer `Leased { segment: None }` at once.
    Lease {
        bytes: u64,
        create: bool,
    },
    /// Give leased segments back to the pool (the client no longer uses them).
    Release {
        segments: Vec<String>,
    },
    /// Test hook, honoured only when the daemon runs with `AUTOZYME_TEST_HOOKS=1`:
    /// occupy a worker for `millis` milliseconds, as a long kernel would.
    Sleep {
        millis: u64,
    },
    /// leiden, parallel mode: Leiden communities maximising modularity with
    /// `resolution` on the undirected graph A + Aᵀ of a square CSR matrix (one edge
    /// per stored non-zero, as igraph sees scanpy's graph; weights, or 1 each
    /// without `use_weights`). `n_iterations`: None iterates until stable.
    /// Deterministic for a `seed`, whatever the thread count.
    Leiden {
        graph: Matrix,
        use_weights: bool,
        resolution: f64,
        n_iterations: Option<u64>,
        seed: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Hello missing or protocol version mismatch.
    Handshake,
    /// A request that cannot be decoded or is not allowed.
    BadRequest,
    /// A matrix whose shape, index arrays or dtypes are inconsistent.
    BadMatrix,
    /// A segment that cannot be opened, is not the peer's, or is too small.
    Segment,
    /// The request needs more memory than the daemon's budget.
    TooLarge,
    /// The daemon cannot serve this combination (the shim falls back).
    Unsupported,
    /// A bug in the daemon; the request's work was abandoned.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub key: String,
    pub bytes: u64,
    pub hits: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub build_id: String,
    pub protocol_version: u32,
    pub threads: u32,
    pub uptime_ms: u64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub requests_served: u64,
    pub requests_failed: u64,
    pub open_connections: u32,
    pub mapped_segments: u32,
    pub mapped_bytes: u64,
    pub cache: Vec<CacheEntry>,
    pub idle_timeout_s: u64,
    pub runtime_dir: String,
}

/// Variant indices of `Request::Hello` (0), `Response::Hello` (0) and
/// `Response::Error` (6) never change, so a client and a daemon of different
/// versions can always tell each other so; new variants are appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        protocol_version: u32,
        build_id: String,
        pid: u32,
        threads: u32,
    },
    Pong,
    Status(DaemonStatus),
    ShuttingDown,
    /// `sums` are values of the data's dtype widened to f64; `highly_expressed`
    /// lists the excluded genes (empty without `exclude_max_fraction`).
    RowSums {
        sums: Vec<f64>,
        highly_expressed: Vec<u64>,
    },
    Done,
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// A lent segment's name and size, or none (see `Request::Lease`).
    Leased {
        segment: Option<String>,
        size: u64,
    },
    /// Community of every node, numbered by decreasing size.
    Leiden { membership: Vec<u64> },
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_FRAME_BYTES as u64)
        .reject_trailing_bytes()
}

#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME_BYTES`].
    TooLarge(u32),
    Decode(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "i/o: {e}"),
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds {MAX_FRAME_BYTES}"),
            FrameError::Decode(e) => write!(f, "undecodable frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Payload bytes of one message, without the length prefix.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    options()
        .serialize(msg)
        .expect("wire types always serialize")
}

pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    options()
        .deserialize(payload)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

/// Length prefix plus payload.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload = encode(msg);
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&frame(msg))?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's payload. `Ok(None)` on a clean end of stream before a frame.
pub fn read_payload<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Some(payload))
}

pub fn read_frame<R: Read, T: for<'a> Deserialize<'a>>(r: &mut R) -> Result<Option<T>, FrameError> {
    match read_payload(r)? {
        None => Ok(None),
        Some(p) => decode(&p).map(Some),
    }
}
