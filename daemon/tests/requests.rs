//! Requests over the real socket against real /dev/shm segments.
#![allow(clippy::needless_range_loop)] // reference loops mirror upstream's

mod common;

use autozyme_protocol::{
    encode, ArrayRef, DType, ErrorKind, Location, Matrix, Request, Response, PROTOCOL_VERSION,
};
use common::*;
use std::io::Write;

/// A 6 x 6 CSR fixture: a normal row, an empty row, an all-zero row, a full row,
/// a single-entry row and a row dominated by one gene.
struct Fixture {
    n_rows: usize,
    n_cols: usize,
    indptr: Vec<i64>,
    indices: Vec<i32>,
    data: Vec<f64>,
}

fn fixture() -> Fixture {
    let rows: Vec<Vec<(i32, f64)>> = vec![
        vec![(0, 1.0), (2, 2.5), (5, 30.0)],
        vec![],
        vec![(1, 0.0), (3, 0.0)],
        vec![(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4), (4, 0.5), (5, 0.6)],
        vec![(4, 7.0)],
        vec![(1, 1.0), (3, 1e6), (4, 3.0)],
    ];
    let mut f = Fixture {
        n_rows: rows.len(),
        n_cols: 6,
        indptr: vec![0],
        indices: vec![],
        data: vec![],
    };
    for row in rows {
        for (c, v) in row {
            f.indices.push(c);
            f.data.push(v);
        }
        f.indptr.push(f.indices.len() as i64);
    }
    f
}

/// Upstream's `_normalize_csr`, written plainly, over values already in the data
/// dtype (given widened to f64) with `round` rounding to that dtype.
fn reference_row_sums(
    f: &Fixture,
    data: &[f64],
    round: impl Fn(f64) -> f64,
    exclude: Option<f64>,
) -> (Vec<f64>, Vec<u64>) {
    let sums_over = |skip: &dyn Fn(usize) -> bool| -> Vec<f64> {
        (0..f.n_rows)
            .map(|r| {
                let mut c = 0.0f64;
                for j in f.indptr[r] as usize..f.indptr[r + 1] as usize {
                    if !skip(f.indices[j] as usize) {
                        c += data[j];
                    }
                }
                round(c)
            })
            .collect()
    };
    let sums = sums_over(&|_| false);
    let Some(frac) = exclude else {
        return (sums, vec![]);
    };
    let mut hi = vec![false; f.n_cols];
    for r in 0..f.n_rows {
        for j in f.indptr[r] as usize..f.indptr[r + 1] as usize {
            if data[j] > frac * sums[r] {
                hi[f.indices[j] as usize] = true;
            }
        }
    }
    let genes = (0..f.n_cols as u64).filter(|&g| hi[g as usize]).collect();
    (sums_over(&|c| hi[c]), genes)
}

fn csr(f: &Fixture, data: ArrayRef, indices: ArrayRef, indptr: ArrayRef) -> Matrix {
    Matrix::Csr {
        n_rows: f.n_rows as u64,
        n_cols: f.n_cols as u64,
        data,
        indices: Some(indices),
        indptr,
    }
}

/// The same array moved to another byte offset of its segment.
fn at_offset(r: &ArrayRef, offset: u64) -> ArrayRef {
    let Location::Segment { name, .. } = &r.location else {
        panic!("not a segment array")
    };
    ArrayRef {
        location: Location::Segment {
            name: name.clone(),
            offset,
        },
        ..r.clone()
    }
}

/// The same array said to be in another segment.
fn in_segment(r: &ArrayRef, name: String) -> ArrayRef {
    ArrayRef {
        location: Location::Segment {
            name,
            offset: offset_of(r) as u64,
        },
        ..r.clone()
    }
}

fn expect_error(response: Response, kind: ErrorKind) -> String {
    match response {
        Response::Error { kind: k, message } if k == kind => message,
        other => panic!("expected {kind:?}, got {other:?}"),
    }
}

#[test]
fn handshake_ping_and_status() {
    let d = TestDaemon::start(&["--threads", "2", "--idle-timeout", "0"], &[]);
    let mut c = d.connect();
    let build_id = std::process::Command::new(BIN)
        .arg("--build-id")
        .output()
        .unwrap();
    let build_id = String::from_utf8(build_id.stdout)
        .unwrap()
        .trim()
        .to_string();
    match c.hello() {
        Response::Hello {
            protocol_version,
            build_id: id,
            pid,
            threads,
        } => {
            assert_eq!(protocol_version, PROTOCOL_VERSION);
            assert_eq!(id, build_id);
            assert_eq!(pid, d.pid);
            assert_eq!(threads, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call(&Request::Ping), Response::Pong);
    match c.call(&Request::Status) {
        Response::Status(s) => {
            assert_eq!(s.pid, d.pid);
            assert_eq!(s.build_id, build_id);
            assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
            assert_eq!(s.threads, 2);
            assert_eq!(s.idle_timeout_s, 0);
            assert_eq!(s.runtime_dir, d.runtime_dir().display().to_string());
            assert_eq!(s.open_connections, 1);
            assert!(s.rss_bytes > 0 && s.peak_rss_bytes >= s.rss_bytes);
            assert!(s.requests_served >= 2);
            assert!(s.cache.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn handshake_rejects_wrong_version_and_non_hello() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.connect();
    let r = c.call(&Request::Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        build_id: "x".into(),
        client_pid: 1,
    });
    expect_error(r, ErrorKind::Handshake);
    assert_eq!(c.recv(), None, "connection closed after a failed handshake");

    let mut c = d.connect();
    expect_error(c.call(&Request::Ping), ErrorKind::Handshake);
    assert_eq!(c.recv(), None);

    // The daemon still serves.
    let mut c = d.client();
    assert_eq!(c.call(&Request::Ping), Response::Pong);
}

#[test]
fn row_sums_f32_and_f64_with_and_without_exclusion() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let f = fixture();
    let mut seg = Segment::new();
    let data32: Vec<f32> = f.data.iter().map(|&v| v as f32).collect();
    let d32 = seg.f32s(&data32);
    let d64 = seg.f64s(&f.data);
    let i32s = seg.i32s(&f.indices);
    let i64s = seg.i64s(&f.indices.iter().map(|&v| v as i64).collect::<Vec<_>>());
    let p64 = seg.i64s(&f.indptr);
    let p32 = seg.i32s(&f.indptr.iter().map(|&v| v as i32).collect::<Vec<_>>());
    seg.write();

    let widened32: Vec<f64> = data32.iter().map(|&v| v as f64).collect();
    for exclude in [None, Some(0.05), Some(0.5), Some(0.9)] {
        for (data, values, round) in [
            (
                &d32,
                &widened32,
                (|v: f64| v as f32 as f64) as fn(f64) -> f64,
            ),
            (&d64, &f.data, (|v: f64| v) as fn(f64) -> f64),
        ] {
            for (indices, indptr) in [(&i32s, &p64), (&i64s, &p32), (&i32s, &p32)] {
                let x = csr(&f, data.clone(), indices.clone(), indptr.clone());
                let got = c.call(&Request::RowSums {
                    x,
                    exclude_max_fraction: exclude,
                });
                let (sums, genes) = reference_row_sums(&f, values, round, exclude);
                assert_eq!(
                    got,
                    Response::RowSums {
                        sums,
                        highly_expressed: genes
                    },
                    "exclude {exclude:?}, data {:?}",
                    data.dtype
                );
            }
        }
    }
    // Gene 5 (30 of 33.5 in row 0), gene 4 (all of row 4) and gene 3 (1e6 in
    // row 5) dominate their rows.
    let x = csr(&f, d64.clone(), i32s.clone(), p64.clone());
    match c.call(&Request::RowSums {
        x,
        exclude_max_fraction: Some(0.5),
    }) {
        Response::RowSums {
            sums,
            highly_expressed,
        } => {
            assert_eq!(highly_expressed, vec![3, 4, 5]);
            assert_eq!(sums, vec![3.5, 0.0, 0.0, 0.6000000000000001, 0.0, 1.0]);
        }
        other => panic!("{other:?}"),
    }
    // Without indices: plain sums are served, exclusion is refused.
    let no_indices = |exclude| Request::RowSums {
        x: Matrix::Csr {
            n_rows: f.n_rows as u64,
            n_cols: f.n_cols as u64,
            data: d64.clone(),
            indices: None,
            indptr: p64.clone(),
        },
        exclude_max_fraction: exclude,
    };
    let (plain, _) = reference_row_sums(&f, &f.data, |v| v, None);
    assert_eq!(
        c.call(&no_indices(None)),
        Response::RowSums {
            sums: plain,
            highly_expressed: vec![]
        }
    );
    expect_error(c.call(&no_indices(Some(0.5))), ErrorKind::BadRequest);
    match c.call(&Request::Status) {
        Response::Status(s) => {
            assert_eq!(s.mapped_segments, 1);
            assert!(s.mapped_bytes > 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn row_sums_of_dense_is_unsupported() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let mut seg = Segment::new();
    let data = seg.f32s(&[1.0, 2.0, 3.0, 4.0]);
    seg.write();
    let r = c.call(&Request::RowSums {
        x: Matrix::Dense {
            n_rows: 2,
            n_cols: 2,
            data,
        },
        exclude_max_fraction: None,
    });
    expect_error(r, ErrorKind::Unsupported);
}

fn factors_for(f: &Fixture) -> Vec<f64> {
    (0..f.n_rows).map(|r| 0.5 + r as f64 * 1.37).collect()
}

#[test]
fn divide_rows_csr_in_place_and_to_other_arrays() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let f = fixture();
    let mut seg = Segment::new();
    let data32: Vec<f32> = f.data.iter().map(|&v| v as f32).collect();
    let d32 = seg.f32s(&data32);
    let d64 = seg.f64s(&f.data);
    let indices = seg.i32s(&f.indices);
    let indptr = seg.i64s(&f.indptr);
    let out32 = seg.f32s(&vec![0.0; f.data.len()]);
    let out64 = seg.f64s(&vec![0.0; f.data.len()]);
    seg.write();

    let row_of: Vec<usize> = (0..f.n_rows)
        .flat_map(|r| std::iter::repeat_n(r, (f.indptr[r + 1] - f.indptr[r]) as usize))
        .collect();
    let factors64 = factors_for(&f);
    let factors32: Vec<f64> = factors64.iter().map(|&v| v as f32 as f64).collect();

    // f32 data, f32 factors -> f32 division, into a separate f32 array.
    let r = c.call(&Request::DivideRows {
        x: csr(&f, d32.clone(), indices.clone(), indptr.clone()),
        factors: factors32.clone(),
        factors_dtype: DType::F32,
        out: out32.clone(),
    });
    assert_eq!(r, Response::Done);
    let expected: Vec<u32> = data32
        .iter()
        .zip(&row_of)
        .map(|(&v, &r)| (v / factors32[r] as f32).to_bits())
        .collect();
    let got: Vec<u32> = seg.read_f32s(&out32).iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected);

    // f32 data, f64 factors -> f64 division, f64 output.
    let r = c.call(&Request::DivideRows {
        x: csr(&f, d32.clone(), indices.clone(), indptr.clone()),
        factors: factors64.clone(),
        factors_dtype: DType::F64,
        out: out64.clone(),
    });
    assert_eq!(r, Response::Done);
    let expected: Vec<u64> = data32
        .iter()
        .zip(&row_of)
        .map(|(&v, &r)| (v as f64 / factors64[r]).to_bits())
        .collect();
    let got: Vec<u64> = seg.read_f64s(&out64).iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected);

    // f64 data, f32 factors, in place.
    let r = c.call(&Request::DivideRows {
        x: csr(&f, d64.clone(), indices.clone(), indptr.clone()),
        factors: factors32.clone(),
        factors_dtype: DType::F32,
        out: d64.clone(),
    });
    assert_eq!(r, Response::Done);
    let expected: Vec<u64> = f
        .data
        .iter()
        .zip(&row_of)
        .map(|(&v, &r)| (v / factors32[r]).to_bits())
        .collect();
    let got: Vec<u64> = seg.read_f64s(&d64).iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected);

    // f32 data in place with f32 factors.
    let r = c.call(&Request::DivideRows {
        x: csr(&f, d32.clone(), indices.clone(), indptr.clone()),
        factors: factors32.clone(),
        factors_dtype: DType::F32,
        out: d32.clone(),
    });
    assert_eq!(r, Response::Done);
    let expected: Vec<u32> = data32
        .iter()
        .zip(&row_of)
        .map(|(&v, &r)| (v / factors32[r] as f32).to_bits())
        .collect();
    let got: Vec<u32> = seg.read_f32s(&d32).iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, expected);
}

#[test]
fn divide_rows_dense() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let (n_rows, n_cols) = (3usize, 4usize);
    let values: Vec<f32> = (0..n_rows * n_cols).map(|i| i as f32 * 0.7).collect();
    let factors = vec![3.0, 0.1f32 as f64, 7.0];
    let mut seg = Segment::new();
    let data = seg.f32s(&values);
    let out = seg.f64s(&vec![0.0; values.len()]);
    seg.write();
    let x = Matrix::Dense {
        n_rows: n_rows as u64,
        n_cols: n_cols as u64,
        data: data.clone(),
    };
    let r = c.call(&Request::DivideRows {
        x: x.clone(),
        factors: factors.clone(),
        factors_dtype: DType::F64,
        out: out.clone(),
    });
    assert_eq!(r, Response::Done);
    let expected: Vec<f64> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 / factors[i / n_cols])
        .collect();
    assert_eq!(seg.read_f64s(&out), expected);

    let r = c.call(&Request::DivideRows {
        x,
        factors: factors.clone(),
        factors_dtype: DType::F32,
        out: data.clone(),
    });
    assert_eq!(r, Response::Done);
    let expected: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| v / factors[i / n_cols] as f32)
        .collect();
    assert_eq!(seg.read_f32s(&data), expected);
}

#[test]
fn malformed_requests_get_the_right_error_and_the_daemon_keeps_serving() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let f = fixture();
    let mut seg = Segment::new();
    let data = seg.f32s(&f.data.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let indices = seg.i32s(&f.indices);
    let indptr = seg.i64s(&f.indptr);
    let mut bad_indptr_values = f.indptr.clone();
    bad_indptr_values.swap(2, 3); // 0, 3, 5, 3, ...: decreasing
    let bad_indptr = seg.i64s(&bad_indptr_values);
    let mut bad_indices_values = f.indices.clone();
    bad_indices_values[4] = 6; // == n_cols
    let bad_indices = seg.i32s(&bad_indices_values);
    let mut neg_indices_values = f.indices.clone();
    neg_indices_values[0] = -1;
    let neg_indices = seg.i32s(&neg_indices_values);
    let mut wrong_end_values = f.indptr.clone();
    *wrong_end_values.last_mut().unwrap() -= 1;
    let wrong_end = seg.i64s(&wrong_end_values);
    let out = seg.f32s(&vec![0.0; f.data.len()]);
    let seg_empty = seg.f32s(&[]);
    seg.write();
    let good = || csr(&f, data.clone(), indices.clone(), indptr.clone());
    let forged_rows = Matrix::Csr {
        n_rows: 1 << 40,
        n_cols: 6,
        data: data.clone(),
        indices: Some(indices.clone()),
        indptr: ArrayRef {
            len: (1 << 40) + 1,
            ..indptr.clone()
        },
    };
    let sums = |x: Matrix| Request::RowSums {
        x,
        exclude_max_fraction: Some(0.1),
    };
    let divide = |x: Matrix, out: ArrayRef| Request::DivideRows {
        x,
        factors: vec![1.0; 6],
        factors_dtype: DType::F32,
        out,
    };

    let mut cases: Vec<(&str, Request, ErrorKind)> = vec![
        (
            "non-monotone indptr",
            sums(csr(&f, data.clone(), indices.clone(), bad_indptr.clone())),
            ErrorKind::BadMatrix,
        ),
        (
            "index out of range",
            sums(csr(&f, data.clone(), bad_indices.clone(), indptr.clone())),
            ErrorKind::BadMatrix,
        ),
        (
            "negative index",
            sums(csr(&f, data.clone(), neg_indices.clone(), indptr.clone())),
            ErrorKind::BadMatrix,
        ),
        (
            "indptr does not end at nnz",
            sums(csr(&f, data.clone(), indices.clone(), wrong_end.clone())),
            ErrorKind::BadMatrix,
        ),
        (
            "data and indices lengths differ",
            sums(csr(
                &f,
                ArrayRef {
                    len: data.len - 1,
                    ..data.clone()
                },
                indices.clone(),
                indptr.clone(),
            )),
            ErrorKind::BadMatrix,
        ),
        (
            "indptr length is not n_rows + 1",
            sums(Matrix::Csr {
                n_rows: 5,
                n_cols: 6,
                data: data.clone(),
                indices: Some(indices.clone()),
                indptr: indptr.clone(),
            }),
            ErrorKind::BadMatrix,
        ),
        (
            "integer data",
            sums(csr(&f, indices.clone(), indices.clone(), indptr.clone())),
            ErrorKind::BadMatrix,
        ),
        (
            "float indptr",
            sums(csr(&f, data.clone(), indices.clone(), data.clone())),
            ErrorKind::BadMatrix,
        ),
        (
            "segment too small",
            sums(csr(
                &f,
                at_offset(&data, 1 << 20),
                indices.clone(),
                indptr.clone(),
            )),
            ErrorKind::Segment,
        ),
        (
            "length overflowing u64",
            sums(csr(
                &f,
                ArrayRef {
                    len: u64::MAX / 2,
                    ..data.clone()
                },
                ArrayRef {
                    len: u64::MAX / 2,
                    ..indices.clone()
                },
                indptr.clone(),
            )),
            ErrorKind::BadRequest,
        ),
        (
            "misaligned offset",
            sums(csr(
                &f,
                at_offset(&data, offset_of(&data) as u64 + 2),
                indices.clone(),
                indptr.clone(),
            )),
            ErrorKind::BadRequest,
        ),
        (
            "missing segment",
            sums(csr(
                &f,
                in_segment(
                    &data,
                    format!("azm_{}_{}_999999999", euid(), std::process::id()),
                ),
                indices.clone(),
                indptr.clone(),
            )),
            ErrorKind::Segment,
        ),
        (
            "factors length",
            Request::DivideRows {
                x: good(),
                factors: vec![1.0; 5],
                factors_dtype: DType::F32,
                out: out.clone(),
            },
            ErrorKind::BadRequest,
        ),
        (
            "out length",
            divide(
                good(),
                ArrayRef {
                    len: out.len - 1,
                    ..out.clone()
                },
            ),
            ErrorKind::BadRequest,
        ),
        (
            "out partially overlapping data",
            divide(good(), at_offset(&data, offset_of(&data) as u64 + 4)),
            ErrorKind::BadRequest,
        ),
        (
            "out overlapping indices",
            divide(
                good(),
                ArrayRef {
                    dtype: DType::F32,
                    ..indices.clone()
                },
            ),
            ErrorKind::BadRequest,
        ),
        (
            "integer out",
            divide(good(), indices.clone()),
            ErrorKind::BadRequest,
        ),
        (
            "integer factors dtype",
            Request::DivideRows {
                x: good(),
                factors: vec![1.0; 6],
                factors_dtype: DType::I32,
                out: out.clone(),
            },
            ErrorKind::BadRequest,
        ),
        (
            "Sleep without test hooks",
            Request::Sleep { millis: 1 },
            ErrorKind::BadRequest,
        ),
        (
            // Nothing may be sized from a shape its arrays do not back (the
            // fuzzer's crash: one batch of 2^40 rows, allocated before resolving).
            "hvg clipped sums of a forged 2^40-row shape",
            Request::HvgClippedSums {
                x: forged_rows.clone(),
                batches: vec![],
                n_batches: 1,
                clip: vec![0.0; 6],
                only: None,
            },
            ErrorKind::Segment,
        ),
        (
            "hvg means of a forged 2^40-row shape",
            Request::HvgMeanVar {
                x: forged_rows.clone(),
                batches: vec![],
                n_batches: 1,
                partitions: 1,
                check: true,
                with_overall: false,
            },
            ErrorKind::Segment,
        ),
        (
            "hvg batch Welford of a forged 2^40-row shape",
            Request::HvgBatchWelford {
                x: forged_rows.clone(),
                batches: vec![],
                n_batches: 1,
            },
            ErrorKind::Segment,
        ),
    ];
    // Shapes no array backs: a CSR matrix's column count, and a dense matrix's
    // rows with no columns (or columns with no rows). Nothing may be sized or
    // looped over from them beyond the daemon's memory budget.
    let wide = Matrix::Csr {
        n_rows: f.n_rows as u64,
        n_cols: 1 << 44,
        data: data.clone(),
        indices: Some(indices.clone()),
        indptr: indptr.clone(),
    };
    let empty = seg_empty.clone();
    let tall_dense = Matrix::Dense {
        n_rows: 1 << 44,
        n_cols: 0,
        data: empty.clone(),
    };
    let wide_dense = Matrix::Dense {
        n_rows: 0,
        n_cols: 1 << 44,
        data: empty.clone(),
    };
    for (what, x) in [
        ("CSR of 2^44 columns", wide),
        ("dense of 2^44 rows and no columns", tall_dense),
        ("dense of no rows and 2^44 columns", wide_dense),
    ] {
        let n_rows = match &x {
            Matrix::Csr { n_rows, .. } | Matrix::Dense { n_rows, .. } => *n_rows,
        };
        let requests = [
            Request::ScaleStats {
                x: x.clone(),
                rows: None,
                partitions: 2,
                along_rows: false,
            },
            Request::RankGenesGroups {
                x: x.clone(),
                group_of_row: vec![0; n_rows.min(1 << 10) as usize],
                n_groups: 1,
                reference: None,
                tie_correct: true,
                mean_slots: 1,
            },
            Request::RankGenesGroupsGroupSums {
                x: x.clone(),
                group_of_row: vec![0; n_rows.min(1 << 10) as usize],
                n_groups: 1,
                reference: None,
                tie_correct: true,
            },
            Request::HvgMeanVar {
                x: x.clone(),
                batches: vec![],
                n_batches: 1,
                partitions: 1,
                check: true,
                with_overall: false,
            },
            Request::HvgBatchWelford {
                x: x.clone(),
                batches: vec![],
                n_batches: 1,
            },
            Request::Fingerprint { x: x.clone() },
            sums(x.clone()),
        ];
        for request in requests {
            // An error, or (Fingerprint, which only hashes the arrays) an answer.
            match c.call(&request) {
                Response::Error { kind, .. } => assert!(
                    matches!(
                        kind,
                        ErrorKind::TooLarge | ErrorKind::BadRequest | ErrorKind::Unsupported
                    ),
                    "{what}: {kind:?} for {request:?}"
                ),
                Response::Fingerprint { .. } => {}
                other => panic!("{what}: {other:?} for {request:?}"),
            }
            assert_eq!(c.call(&Request::Ping), Response::Pong, "after {what}");
        }
    }

    for name in [
        "../etc/passwd".to_string(),
        "/dev/shm/x".to_string(),
        format!("azm_{}_{}_1", euid() + 1, std::process::id()),
        format!("{}.", seg.name),
        format!("{}/../{}", seg.name, seg.name),
    ] {
        cases.push((
            "bad segment name",
            sums(csr(
                &f,
                in_segment(&data, name),
                indices.clone(),
                indptr.clone(),
            )),
            ErrorKind::Segment,
        ));
    }

    for (what, request, kind) in cases {
        let r = c.call(&request);
        match &r {
            Response::Error { kind: k, message } => {
                assert_eq!(*k, kind, "{what}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{what}: expected {kind:?}, got {other:?}"),
        }
        // Same connection, still served.
        assert_eq!(c.call(&Request::Ping), Response::Pong, "after {what}");
    }
    // A well-formed request on the same data still works.
    assert!(matches!(c.call(&sums(good())), Response::RowSums { .. }));
    match c.call(&Request::Status) {
        Response::Status(s) => assert!(s.requests_failed >= 20, "{s:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn segment_of_another_owner_is_refused() {
    // A correctly named segment file that is not owned by the peer (possible here
    // only when the tests run as root, which can chown).
    if euid() != 0 {
        return;
    }
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let mut seg = Segment::new();
    let data = seg.f32s(&[1.0]);
    let indices = seg.i32s(&[0]);
    let indptr = seg.i32s(&[0, 1]);
    seg.write();
    std::os::unix::fs::chown(&seg.path, Some(12345), None).unwrap();
    let r = c.call(&Request::RowSums {
        x: Matrix::Csr {
            n_rows: 1,
            n_cols: 1,
            data,
            indices: Some(indices),
            indptr,
        },
        exclude_max_fraction: None,
    });
    let message = expect_error(r, ErrorKind::Segment);
    assert!(message.contains("owned by uid 12345"), "{message}");
}

#[test]
fn prefault_maps_valid_segments_and_refuses_bad_names() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let mut seg = Segment::new();
    seg.f32s(&[1.0, 2.0]);
    seg.write();
    let name = seg.path.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(
        c.call(&Request::Prefault {
            segments: vec![name]
        }),
        Response::Done
    );
    match c.call(&Request::Status) {
        Response::Status(s) => assert_eq!(s.mapped_segments, 1),
        other => panic!("{other:?}"),
    }
    for bad in ["../etc/passwd", "azm_1_2", "azm_0_1_2/x"] {
        let r = c.call(&Request::Prefault {
            segments: vec![bad.into()],
        });
        expect_error(r, ErrorKind::Segment);
    }
    assert_eq!(c.call(&Request::Ping), Response::Pong);
}

fn peer<T>(v: &[T], dtype: DType) -> ArrayRef {
    ArrayRef {
        location: Location::Peer {
            address: v.as_ptr() as u64,
        },
        len: v.len() as u64,
        dtype,
    }
}

/// Arrays in the client's own memory (this test process is the client): the
/// daemon copies them in and writes the output back, with the same results as
/// through shared memory.
#[test]
fn peer_memory_arrays_give_the_same_results() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let f = fixture();
    let data: Vec<f32> = f.data.iter().map(|&v| v as f32).collect();
    let indices: Vec<i32> = f.indices.clone();
    let indptr: Vec<i64> = f.indptr.clone();
    let widened: Vec<f64> = data.iter().map(|&v| v as f64).collect();
    let x = Matrix::Csr {
        n_rows: f.n_rows as u64,
        n_cols: f.n_cols as u64,
        data: peer(&data, DType::F32),
        indices: Some(peer(&indices, DType::I32)),
        indptr: peer(&indptr, DType::I64),
    };
    for exclude in [None, Some(0.5)] {
        let (sums, genes) = reference_row_sums(&f, &widened, |v| v as f32 as f64, exclude);
        assert_eq!(
            c.call(&Request::RowSums {
                x: x.clone(),
                exclude_max_fraction: exclude,
            }),
            Response::RowSums {
                sums,
                highly_expressed: genes
            }
        );
    }
    let factors: Vec<f64> = (0..f.n_rows).map(|r| 1.0 + r as f64 * 0.5).collect();
    let mut out = vec![0f32; data.len()];
    let reply = c.call(&Request::DivideRows {
        x: x.clone(),
        factors: factors.clone(),
        factors_dtype: DType::F32,
        out: peer(&out, DType::F32),
    });
    assert_eq!(reply, Response::Done);
    // The daemon wrote into `out` behind the compiler's back.
    let out = std::hint::black_box(&mut out);
    for r in 0..f.n_rows {
        for j in f.indptr[r] as usize..f.indptr[r + 1] as usize {
            let want = data[j] / factors[r] as f32;
            let got = unsafe { std::ptr::read_volatile(&out[j]) };
            assert_eq!(got.to_bits(), want.to_bits(), "row {r}, entry {j}");
        }
    }
    // An address that is not mapped in the client: an error, not a crash.
    let bogus = ArrayRef {
        location: Location::Peer { address: 8 },
        len: 4,
        dtype: DType::F32,
    };
    let bad = Matrix::Csr {
        n_rows: 1,
        n_cols: 2,
        data: bogus,
        indices: None,
        indptr: peer(&[0i64, 4], DType::I64),
    };
    let r = c.call(&Request::RowSums {
        x: bad,
        exclude_max_fraction: None,
    });
    expect_error(r, ErrorKind::BadRequest);
    assert_eq!(c.call(&Request::Ping), Response::Pong);
}

/// The daemon's own segments: lent, given back, lent again, unlinked at exit.
#[test]
fn lease_release_and_cleanup_at_exit() {
    let mut d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    assert_eq!(
        c.call(&Request::Lease {
            bytes: 10_000,
            create: false
        }),
        Response::Leased {
            segment: None,
            size: 0
        }
    );
    let Response::Leased {
        segment: Some(name),
        size,
    } = c.call(&Request::Lease {
        bytes: 10_000,
        create: true,
    })
    else {
        panic!("no segment lent")
    };
    assert_eq!(size, 10_000);
    assert!(
        name.starts_with(&format!("azm_{}_{}_", euid(), d.pid)),
        "{name}"
    );
    let path = std::path::Path::new("/dev/shm").join(&name);
    let mode = std::fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Given back, it is lent again to the next asker of a similar size.
    let release = |segments: Vec<String>| Request::Release { segments };
    assert_eq!(
        c.call(&release(vec![name.clone(), "azm_1_2_3".into()])),
        Response::Done
    );
    assert_eq!(
        c.call(&Request::Lease {
            bytes: 9_000,
            create: false
        }),
        Response::Leased {
            segment: Some(name.clone()),
            size: 10_000
        }
    );
    // Far larger requests do not get it.
    match c.call(&Request::Lease {
        bytes: 1 << 40,
        create: true,
    }) {
        Response::Error { kind, .. } => assert_eq!(kind, ErrorKind::TooLarge),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call(&Request::Shutdown), Response::ShuttingDown);
    d.wait_exit(std::time::Duration::from_secs(15))
        .expect("daemon exits");
    assert!(!path.exists(), "the daemon unlinks its segments at exit");
}

#[test]
fn garbage_closes_only_that_connection() {
    let d = TestDaemon::start(&[], &[]);

    // An undecodable frame after the handshake: BadRequest, then closed.
    let mut c = d.client();
    c.stream
        .write_all(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    expect_error(c.recv().unwrap(), ErrorKind::BadRequest);
    assert_eq!(c.recv(), None);

    // Garbage instead of a handshake.
    let mut c = d.connect();
    c.stream.write_all(&[3, 0, 0, 0, 1, 2, 3]).unwrap();
    expect_error(c.recv().unwrap(), ErrorKind::Handshake);
    assert_eq!(c.recv(), None);

    // An oversized frame announcement: closed without reading it.
    let mut c = d.client();
    c.stream.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(c.recv(), None);

    // A valid frame trickled in byte by byte, across the daemon's read timeouts.
    let mut c = d.client();
    let payload = encode(&Request::Ping);
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&payload);
    for b in frame {
        c.stream.write_all(&[b]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(120));
    }
    assert_eq!(c.recv(), Some(Response::Pong));

    // A client leaving mid-frame does not disturb anyone.
    let mut c = d.client();
    c.stream.write_all(&[100, 0, 0]).unwrap();
    drop(c);

    let mut c = d.client();
    assert_eq!(c.call(&Request::Ping), Response::Pong);
}
