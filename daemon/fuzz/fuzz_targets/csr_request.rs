//! Structured: a CSR (or dense) matrix of fuzzer-chosen shape, index arrays,
//! dtypes, offsets and lengths, written into a real shared-memory segment, then
//! RowSums / DivideRows over it through the daemon's handler. Every inconsistency
//! (non-monotone indptr, indices out of range, short arrays, offsets past the end,
//! misaligned offsets, wrong output lengths) must come back as an error response.
#![no_main]
use arbitrary::Arbitrary;
use autozyme_protocol::{ArrayRef, DType, Location, Matrix, Request};
use autozymed::config::Config;
use autozymed::handlers::handle;
use autozymed::server::state::Daemon;
use autozymed::shm::Peer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const SEGMENT_BYTES: usize = 1 << 20;

struct Segment {
    name: String,
    base: *mut u8,
}
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

fn segment() -> &'static Segment {
    static SEGMENT: OnceLock<Segment> = OnceLock::new();
    SEGMENT.get_or_init(|| {
        let name = format!(
            "azm_{}_{}_9999999",
            unsafe { libc::geteuid() },
            std::process::id()
        );
        let cname = std::ffi::CString::new(format!("/{name}")).unwrap();
        unsafe {
            let fd = libc::shm_open(cname.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600);
            assert!(fd >= 0, "shm_open");
            assert_eq!(libc::ftruncate(fd, SEGMENT_BYTES as libc::off_t), 0);
            let base = libc::mmap(
                std::ptr::null_mut(),
                SEGMENT_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert!(base != libc::MAP_FAILED);
            libc::close(fd);
            // Unlinked at exit, however the run ends (normal end or a crash report).
            libc::atexit(unlink_segment);
            Segment {
                name,
                base: base as *mut u8,
            }
        }
    })
}

extern "C" fn unlink_segment() {
    let name = format!(
        "/azm_{}_{}_9999999",
        unsafe { libc::geteuid() },
        std::process::id()
    );
    let cname = std::ffi::CString::new(name).unwrap();
    unsafe { libc::shm_unlink(cname.as_ptr()) };
}

fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        // A small memory budget: requests may allocate up to it by design (per-task
        // partials, unbacked dimensions, copies of peer arrays), and the fuzzer's
        // RSS limit is there to catch what exceeds the budget, not what honours it.
        std::env::set_var("AUTOZYME_MAX_BYTES", (256u64 << 20).to_string());
        Daemon::new(Config {
            runtime_dir: std::env::temp_dir(),
            threads: 2,
            idle_timeout_s: 0,
            test_hooks: false,
        })
    })
}

#[derive(Arbitrary, Debug)]
enum Kind {
    RowSums {
        exclude: Option<u8>,
    },
    DivideRows {
        factors: Vec<f32>,
        factors_f64: bool,
        out_dtype: u8,
        out_offset: u16,
    },
    ScaleChunkStats,
}

#[derive(Arbitrary, Debug)]
struct Input {
    n_rows: u8,
    n_cols: u8,
    dense: bool,
    data_dtype: u8,
    index_dtype: u8,
    indptr_dtype: u8,
    indptr: Vec<i16>,
    indices: Vec<i16>,
    data: Vec<f32>,
    /// Extra elements claimed beyond what was written (or fewer, if negative).
    len_skew: [i8; 3],
    /// Byte offsets of the three arrays (may be misaligned or out of range).
    offsets: [u16; 3],
    omit_indices: bool,
    kind: Kind,
}

fn dtype(code: u8) -> DType {
    [DType::F32, DType::F64, DType::I32, DType::I64][code as usize % 4]
}

/// Writes `values` as `dtype` at byte `offset` (clipped to the segment).
fn put(seg: &Segment, offset: usize, dtype: DType, values: impl Iterator<Item = f64>) -> usize {
    let size = dtype.size();
    let mut n = 0;
    for (i, v) in values.enumerate() {
        let at = offset + i * size;
        if at + size > SEGMENT_BYTES {
            break;
        }
        let bytes: Vec<u8> = match dtype {
            DType::F32 => (v as f32).to_le_bytes().to_vec(),
            DType::F64 => v.to_le_bytes().to_vec(),
            DType::I32 => (v as i32).to_le_bytes().to_vec(),
            DType::I64 => (v as i64).to_le_bytes().to_vec(),
        };
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), seg.base.add(at), size) };
        n += 1;
    }
    n
}

fn array(seg: &Segment, offset: u16, written: usize, skew: i8, dtype: DType) -> ArrayRef {
    ArrayRef {
        location: Location::Segment {
            name: seg.name.clone(),
            offset: offset as u64,
        },
        len: (written as i64 + skew as i64).max(0) as u64,
        dtype,
    }
}

fuzz_target!(|input: Input| {
    let seg = segment();
    let (n_rows, n_cols) = (input.n_rows as u64, input.n_cols as u64);
    let data_dtype = dtype(input.data_dtype);
    let written = put(
        seg,
        input.offsets[0] as usize,
        data_dtype,
        input.data.iter().map(|&v| v as f64),
    );
    let data = array(
        seg,
        input.offsets[0],
        written,
        input.len_skew[0],
        data_dtype,
    );
    let x = if input.dense {
        Matrix::Dense {
            n_rows,
            n_cols,
            data,
        }
    } else {
        let it = dtype(input.index_dtype);
        let pt = dtype(input.indptr_dtype);
        let wi = put(
            seg,
            input.offsets[1] as usize,
            it,
            input.indices.iter().map(|&v| v as f64),
        );
        let wp = put(
            seg,
            input.offsets[2] as usize,
            pt,
            input.indptr.iter().map(|&v| v as f64),
        );
        Matrix::Csr {
            n_rows,
            n_cols,
            data,
            indices: (!input.omit_indices)
                .then(|| array(seg, input.offsets[1], wi, input.len_skew[1], it)),
            indptr: array(seg, input.offsets[2], wp, input.len_skew[2], pt),
        }
    };
    let request = match input.kind {
        Kind::RowSums { exclude } => Request::RowSums {
            x,
            exclude_max_fraction: exclude.map(|e| e as f64 / 200.0),
        },
        Kind::DivideRows {
            factors,
            factors_f64,
            out_dtype,
            out_offset,
        } => {
            let out_dtype = dtype(out_dtype);
            let len = written as u64;
            Request::DivideRows {
                x,
                factors: factors.iter().map(|&f| f as f64).collect(),
                factors_dtype: if factors_f64 { DType::F64 } else { DType::F32 },
                out: ArrayRef {
                    location: Location::Segment {
                        name: seg.name.clone(),
                        offset: out_offset as u64,
                    },
                    len,
                    dtype: out_dtype,
                },
            }
        }
        Kind::ScaleChunkStats => Request::ScaleChunkStats { x },
    };
    let peer = Peer {
        uid: daemon().euid,
        pid: std::process::id() as i32,
    };
    let _ = handle(daemon(), peer, request);
});
