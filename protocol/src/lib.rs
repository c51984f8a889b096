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
pub const PROTOCOL_VERSION: u32 = 8;

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
    /// scale, step 1: per-gene sums of the values and of their squares, each in
    /// f64, for scanpy's `_get_mean_var` (the shim turns them into mean and
    /// variance with upstream's own numpy expressions).
    ///
    /// `along_rows: false` (CSR or dense `x`): per column. The rows (all, or only
    /// `rows`, in that order) are dealt round-robin into `partitions` parts, as
    /// scanpy's numba kernel deals them to its threads; each part adds its rows in
    /// order, starting from 0.0, and the parts' sums are then added in part order
    /// to 0.0. A square is taken in the data's dtype, then widened (numba's and
    /// numpy's `x * x`). Dense input with one partition is numpy's `mean(axis=0)`
    /// over a C-contiguous matrix with more than one column.
    /// `along_rows: true` (CSR `x`, typically a CSC matrix's transpose): per row,
    /// values widened to f64 before squaring, added in index order (scanpy's
    /// major-axis kernel); `rows` and `partitions` are ignored.
    ScaleStats {
        x: Matrix,
        rows: Option<Vec<u64>>,
        partitions: u32,
        along_rows: bool,
    },
    /// scale, step 2: one fused pass writing `out` (dense, C-contiguous, x's
    /// shape) from `x`: centre (when `mean` is given), divide by `std`, clip.
    ///
    /// CSR `x` (upstream densifies, `x.todense() - mean`): `out` is F64; each row
    /// is first densified in the data's dtype (duplicates added in index order),
    /// then `(v - mean) / std` in f64. Dense `x` (dtype T): `out` has dtype T and
    /// may be `x`'s own data (in place); the subtraction and the division each
    /// run in f64 and round to T (numpy's in-place `-=` and `true_divide`).
    /// Clipping compares in f64: above `max_value` becomes `max_value`, and with
    /// `mean` given, below `-max_value` becomes `-max_value` (numba's clip).
    /// With `rows` (dense only), only those rows are transformed; the others are
    /// copied from `x` when `out` is a separate array. `mean` and `std` hold one
    /// value per column, or with `per_row` one per row: the shim sends a CSC or
    /// F-ordered matrix as its transpose, whose rows are the genes, and gets the
    /// transposed (F-ordered) result upstream returns for such input.
    ScaleApply {
        x: Matrix,
        rows: Option<Vec<u64>>,
        mean: Option<Vec<f64>>,
        std: Vec<f64>,
        per_row: bool,
        max_value: Option<f64>,
        out: ArrayRef,
    },
    /// highly_variable_genes (seurat_v3), step 1: per-gene means and biased
    /// variances (before upstream's `n / (n - 1)`) of each batch, as scanpy's
    /// `_get_mean_var` computes them (CSR: numba's kernel with its rows dealt to
    /// `partitions` accumulators, numba's thread count in the client; dense:
    /// numpy's row-order sums). `batches` holds each cell's batch in
    /// `0..n_batches`; empty means one batch of all cells (`n_batches` 1). CSR
    /// needs its indices. With `check`, every column index is validated up front
    /// (a bad one is a `BadMatrix` error) and every stored value checked (see
    /// `Response::HvgMeanVar`); without, the flags are all false and bad indices
    /// are only skipped (for repeat requests over a matrix already checked).
    /// With `with_overall`, all cells' statistics come first in the reply (as
    /// upstream computes them over the whole matrix; from the batches' sums when
    /// those are exact in any order, i.e. non-negative integer counts).
    HvgMeanVar {
        x: Matrix,
        batches: Vec<u64>,
        n_batches: u64,
        partitions: u64,
        check: bool,
        with_overall: bool,
    },
    /// highly_variable_genes (seurat_v3), step 2: per batch and gene, the sums of
    /// the values clipped to `clip` (`n_batches × n_cols`, row-major) and of their
    /// squares, in upstream's order. `batches` as for `HvgMeanVar`; column
    /// indices are not validated up front (send `HvgMeanVar` with `check` first),
    /// bad ones are skipped. With `only`, just that batch: `clip` then holds its
    /// `n_cols` values and the reply its `n_cols` sums (so the client can ask for
    /// each batch as soon as its clip values are known).
    HvgClippedSums {
        x: Matrix,
        batches: Vec<u64>,
        n_batches: u64,
        clip: Vec<f64>,
        only: Option<u64>,
    },
    /// rank_genes_groups(method="wilcoxon"): per-gene Wilcoxon rank sums, tie
    /// correction, per-group sums and non-zero counts of `x` (cells x genes), from
    /// a value-sorted per-gene structure the daemon caches by `x`'s content.
    /// `group_of_row[r]` is the group index of cell `r` (`< n_groups`) or
    /// `u64::MAX` for a cell in no selected group. `reference`: a group index
    /// (ranks over that group's and each other group's cells), or none (ranks
    /// over all cells). `mean_slots`: the number of per-thread partial sums
    /// upstream's numba kernel adds each group's values into (row `i` of a group
    /// goes to partial `i % mean_slots`), 1 for dense input.
    RankGenesGroups {
        x: Matrix,
        group_of_row: Vec<u64>,
        n_groups: u64,
        reference: Option<u64>,
        tie_correct: bool,
        mean_slots: u64,
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
    /// A 128-bit fingerprint of a matrix's content (kind, shape, dtypes and the
    /// bytes of every array), the key the daemon's derived-data cache uses; a
    /// client keys results it keeps on it.
    Fingerprint {
        x: Matrix,
    },
    /// rank_genes_groups(method="wilcoxon") as scanpy 1.12.3 and later compute
    /// it: as `RankGenesGroups` with `mean_slots` 1 (each group's values added in
    /// f64 in cell order, as `sc.get.aggregate` adds them), but without the
    /// per-group rest statistics: the reply's `rest_sums` and `rest_nnz` are
    /// empty (upstream derives the rest from the groups' sums; the shim sends the
    /// cells of no selected group as one more group).
    RankGenesGroupsGroupSums {
        x: Matrix,
        group_of_row: Vec<u64>,
        n_groups: u64,
        reference: Option<u64>,
        tie_correct: bool,
    },
    /// highly_variable_genes (seurat_v3) as scanpy 1.12.2 and later compute it
    /// with a `batch_key`: per batch and gene, the mean and the biased variance
    /// (M2 / n, before upstream's `n / (n - 1)`) by Welford's algorithm, as
    /// `sc.get.aggregate(func=["mean", "var"])` computes them (CSR: over the
    /// stored values in row order, then the implicit zeros merged in closed form;
    /// dense: over every value). `batches` as for `HvgMeanVar`; column indices are
    /// not validated up front (send `HvgMeanVar` with `check` first), bad ones
    /// are skipped.
    HvgBatchWelford {
        x: Matrix,
        batches: Vec<u64>,
        n_batches: u64,
    },
    /// One chunk's share of sc.pp.scale on a dask array (scanpy 1.12): per
    /// column, the f64 sum of the values and of their squares, all rows in
    /// order from 0.0 (one part), each value widened to f64 before it is
    /// squared, as fast-array-utils' dask `mean_var` sums a chunk (`x` and
    /// `power(x, 2, dtype=float64)`). CSR (duplicates added one by one) or dense
    /// (more than one column: numpy's row-by-row `sum(axis=0)`). Replies
    /// `Response::ScaleStats`.
    ScaleChunkStats {
        x: Matrix,
    },
    /// highly_variable_genes (seurat_v3) on a dask array (scanpy 1.12), one row
    /// chunk's share of the clipped sums: as `HvgClippedSums` without `only`
    /// (CSR only), but each batch's two sums start from `sums` and `squares`
    /// (`n_batches × n_cols`, row-major) instead of 0.0. Upstream adds a block
    /// of `data[batch == b]` whose rows dask gathered from several chunks in one
    /// sequence; the client carries that sequence from chunk to chunk. Replies
    /// `Response::HvgClippedSums`.
    HvgClippedSumsFrom {
        x: Matrix,
        batches: Vec<u64>,
        n_batches: u64,
        clip: Vec<f64>,
        sums: Vec<f64>,
        squares: Vec<f64>,
    },
    /// sc.tl.umap's layout optimisation: umap-learn's `optimize_layout_euclidean`
    /// (0.5.x) with `move_other` and no densMAP, for `n_epochs` epochs, on
    /// `embedding` (`n × dim` f32, row-major; the result replaces it) for the
    /// edges `head[i] → tail[i]` (i32 or i64, sorted by head) with
    /// `epochs_per_sample` (f64). `rng_state`: the three int64 words upstream
    /// draws, as their bits. Bit for bit what umap's numba code computes on an
    /// x86-64 CPU with FMA for `dim` up to 3 (the client checks that on a small
    /// graph first); anything else is Unsupported. Replies `Done`.
    UmapLayout {
        embedding: ArrayRef,
        dim: u64,
        head: ArrayRef,
        tail: ArrayRef,
        epochs_per_sample: ArrayRef,
        a: f64,
        b: f64,
        gamma: f64,
        initial_alpha: f64,
        negative_sample_rate: f64,
        n_epochs: u64,
        rng_state: Vec<u64>,
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
    /// Memory budget of the derived-matrix cache (`AUTOZYME_CACHE_BYTES`).
    pub cache_budget_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
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
    /// Per-gene (or per-row) sums and sums of squares (see `Request::ScaleStats`).
    ScaleStats {
        sums: Vec<f64>,
        sq_sums: Vec<f64>,
    },
    /// `means` and `variances` are `n_batches × n_cols` row-major, after one row
    /// for all cells with `with_overall`.
    /// `negative`: some value has its sign bit set; `non_integer`: some finite
    /// value has a fractional part; `non_finite`: some value is NaN or infinite.
    HvgMeanVar {
        means: Vec<f64>,
        variances: Vec<f64>,
        negative: bool,
        non_integer: bool,
        non_finite: bool,
    },
    /// `n_batches × n_cols` row-major (`n_cols` with `only`).
    HvgClippedSums {
        sums: Vec<f64>,
        squares: Vec<f64>,
    },
    /// Per-gene results of `Request::RankGenesGroups`, each a row-major
    /// `[rows x n_genes]` matrix flattened. `rank_sums`, `sums`, `nnz`:
    /// `n_groups` rows (the reference group's rank sums are 0); `rest_sums`,
    /// `rest_nnz`: `n_groups` rows without a reference, else empty; `tie`: the
    /// tie-correction factors (1 row without a reference, `n_groups` with one; all
    /// 1 without `tie_correct`). `sums` are f64 sums in upstream's order.
    RankGenesGroups {
        n_genes: u64,
        rank_sums: Vec<f64>,
        tie: Vec<f64>,
        sums: Vec<f64>,
        nnz: Vec<u64>,
        rest_sums: Vec<f64>,
        rest_nnz: Vec<u64>,
        cache_hit: bool,
        /// Upstream's `check_nonnegative_integers` of the matrix.
        nonneg_integers: bool,
    },
    /// Community of every node, numbered by decreasing size.
    Leiden {
        membership: Vec<u64>,
    },
    /// `Request::Fingerprint`: the low and high 64 bits.
    Fingerprint {
        lo: u64,
        hi: u64,
    },
    /// `Request::HvgBatchWelford`: `n_batches × n_cols` row-major.
    HvgBatchWelford {
        means: Vec<f64>,
        variances: Vec<f64>,
    },
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
