//! `ScaleStats` and `ScaleApply` over the real socket against real segments,
//! and malformed scale requests: errors, never a crash.
#![allow(clippy::needless_range_loop)] // reference loops mirror upstream's

mod common;

use autozyme_protocol::{ArrayRef, DType, ErrorKind, Matrix, Request, Response};
use common::*;

/// 5 x 4 CSR: an empty row, a full row, a duplicate-free sparse rest.
fn rows() -> Vec<Vec<(i32, f32)>> {
    vec![
        vec![(0, 1.5), (3, 2.0)],
        vec![],
        vec![(0, 0.25), (1, 3.0), (2, 1.0), (3, 0.5)],
        vec![(2, 7.0)],
        vec![(1, 0.1), (3, 4.0)],
    ]
}

struct Csr {
    indptr: Vec<i64>,
    indices: Vec<i32>,
    data: Vec<f32>,
}

fn csr_parts() -> Csr {
    let mut m = Csr {
        indptr: vec![0],
        indices: vec![],
        data: vec![],
    };
    for row in rows() {
        for (c, v) in row {
            m.indices.push(c);
            m.data.push(v);
        }
        m.indptr.push(m.indices.len() as i64);
    }
    m
}

fn expect_error(response: Response, kind: ErrorKind) -> String {
    match response {
        Response::Error { kind: k, message } if k == kind => message,
        other => panic!("expected {kind:?}, got {other:?}"),
    }
}

fn stats(x: &Matrix, rows: Option<Vec<u64>>, partitions: u32, along_rows: bool) -> Request {
    Request::ScaleStats {
        x: x.clone(),
        rows,
        partitions,
        along_rows,
    }
}

fn apply(x: &Matrix, mean: Option<Vec<f64>>, std: Vec<f64>, out: &ArrayRef) -> Request {
    Request::ScaleApply {
        x: x.clone(),
        rows: None,
        mean,
        std,
        per_row: false,
        max_value: Some(1.0),
        out: out.clone(),
    }
}

#[test]
fn stats_and_apply_match_plain_references() {
    let d = TestDaemon::start(&["--threads", "2"], &[]);
    let mut c = d.client();
    let m = csr_parts();
    let mut seg = Segment::new();
    let data = seg.f32s(&m.data);
    let indices = seg.i32s(&m.indices);
    let indptr = seg.i64s(&m.indptr);
    let out = seg.f64s(&[0.0; 20]);
    let dense_values: Vec<f32> = (0..20).map(|i| (i % 7) as f32 * 0.3).collect();
    let dense = seg.f32s(&dense_values);
    seg.write();
    let x = Matrix::Csr {
        n_rows: 5,
        n_cols: 4,
        data,
        indices: Some(indices),
        indptr,
    };

    // Two parts: rows 0, 2, 4 and rows 1, 3, each summed in row order.
    let Response::ScaleStats { sums, sq_sums } = c.call(&stats(&x, None, 2, false)) else {
        panic!("no stats");
    };
    let mut want = [[0.0f64; 4]; 2];
    let mut want_sq = [[0.0f64; 4]; 2];
    for (r, row) in rows().iter().enumerate() {
        for &(col, v) in row {
            want[r % 2][col as usize] += v as f64;
            want_sq[r % 2][col as usize] += (v * v) as f64;
        }
    }
    for col in 0..4 {
        assert_eq!(sums[col], 0.0 + want[0][col] + want[1][col]);
        assert_eq!(sq_sums[col], 0.0 + want_sq[0][col] + want_sq[1][col]);
    }
    // Along rows (a CSC's columns): f64 squares.
    let Response::ScaleStats { sums, sq_sums } = c.call(&stats(&x, None, 1, true)) else {
        panic!("no stats");
    };
    assert_eq!(sums[2], 0.25 + 3.0 + 1.0 + 0.5);
    assert_eq!(sq_sums[4], (0.1f32 as f64).powi(2) + 16.0);

    // Densify, centre, scale, clip at 1.
    let mean = vec![0.5, 1.0, 2.0, 1.0];
    let std = vec![1.0, 2.0, 4.0, 0.5];
    assert_eq!(
        c.call(&apply(&x, Some(mean.clone()), std.clone(), &out)),
        Response::Done
    );
    let got = seg.read_f64s(&out);
    for (r, row) in rows().iter().enumerate() {
        let mut dense_row = [0.0f32; 4];
        for &(col, v) in row {
            dense_row[col as usize] += v;
        }
        for col in 0..4 {
            let v = (dense_row[col] as f64 - mean[col]) / std[col];
            assert_eq!(got[r * 4 + col], v.clamp(-1.0, 1.0));
        }
    }

    // Dense f32 in place, selected rows only.
    let x_dense = Matrix::Dense {
        n_rows: 5,
        n_cols: 4,
        data: dense.clone(),
    };
    let r = c.call(&Request::ScaleApply {
        x: x_dense,
        rows: Some(vec![1, 3]),
        mean: None,
        std: std.clone(),
        per_row: false,
        max_value: None,
        out: dense.clone(),
    });
    assert_eq!(r, Response::Done);
    let got = seg.read_f32s(&dense);
    for i in 0..20 {
        let want = if [1, 3].contains(&(i / 4)) {
            (dense_values[i] as f64 / std[i % 4]) as f32
        } else {
            dense_values[i]
        };
        assert_eq!(got[i], want);
    }
}

#[test]
fn malformed_scale_requests_get_errors_and_the_daemon_keeps_serving() {
    let d = TestDaemon::start(&[], &[]);
    let mut c = d.client();
    let m = csr_parts();
    let mut seg = Segment::new();
    let data = seg.f32s(&m.data);
    let indices = seg.i32s(&m.indices);
    let indptr = seg.i64s(&m.indptr);
    let out = seg.f64s(&[0.0; 20]);
    let out32 = seg.f32s(&[0.0; 20]);
    let bad_indices = seg.i32s(&[0, 3, 0, 1, 9, 3, 2, 1, 3]);
    let dense = seg.f64s(&[1.0; 20]);
    seg.write();
    let x = Matrix::Csr {
        n_rows: 5,
        n_cols: 4,
        data: data.clone(),
        indices: Some(indices.clone()),
        indptr: indptr.clone(),
    };
    let std = vec![1.0; 4];
    let mean = Some(vec![0.0; 4]);

    expect_error(c.call(&stats(&x, None, 0, false)), ErrorKind::BadRequest);
    expect_error(
        c.call(&stats(&x, Some(vec![0, 5]), 2, false)),
        ErrorKind::BadRequest,
    );
    expect_error(
        c.call(&stats(&x, Some(vec![u64::MAX]), 1, false)),
        ErrorKind::BadRequest,
    );
    let bad = Matrix::Csr {
        n_rows: 5,
        n_cols: 4,
        data: data.clone(),
        indices: Some(bad_indices),
        indptr: indptr.clone(),
    };
    expect_error(c.call(&stats(&bad, None, 2, false)), ErrorKind::BadMatrix);
    expect_error(
        c.call(&apply(&bad, mean.clone(), std.clone(), &out)),
        ErrorKind::BadMatrix,
    );
    let x_dense = Matrix::Dense {
        n_rows: 5,
        n_cols: 4,
        data: dense.clone(),
    };
    expect_error(
        c.call(&stats(&x_dense, None, 1, true)),
        ErrorKind::Unsupported,
    );

    // Statistics of the wrong length, a missing mean for CSR, wrong out dtype or
    // size, out overlapping the input.
    expect_error(
        c.call(&apply(&x, mean.clone(), vec![1.0; 3], &out)),
        ErrorKind::BadRequest,
    );
    expect_error(
        c.call(&apply(&x, Some(vec![0.0; 5]), std.clone(), &out)),
        ErrorKind::BadRequest,
    );
    expect_error(
        c.call(&apply(&x, None, std.clone(), &out)),
        ErrorKind::Unsupported,
    );
    expect_error(
        c.call(&apply(&x, mean.clone(), std.clone(), &out32)),
        ErrorKind::BadRequest,
    );
    let short = ArrayRef {
        len: 19,
        ..out.clone()
    };
    expect_error(
        c.call(&apply(&x, mean.clone(), std.clone(), &short)),
        ErrorKind::BadRequest,
    );
    let over_data = ArrayRef {
        dtype: DType::F64,
        len: 20,
        ..data.clone()
    };
    expect_error(
        c.call(&apply(&x, mean.clone(), std.clone(), &over_data)),
        ErrorKind::BadRequest,
    );
    expect_error(
        c.call(&apply(&x_dense, mean.clone(), std.clone(), &out32)),
        ErrorKind::BadRequest,
    );
    let mut rows_req = apply(&x_dense, mean.clone(), std.clone(), &dense);
    if let Request::ScaleApply { rows, .. } = &mut rows_req {
        *rows = Some(vec![7]);
    }
    expect_error(c.call(&rows_req), ErrorKind::BadRequest);
    // A per-row request whose statistics are per column.
    let mut per_row = apply(&x_dense, mean.clone(), std.clone(), &dense);
    if let Request::ScaleApply { per_row: p, .. } = &mut per_row {
        *p = true;
    }
    expect_error(c.call(&per_row), ErrorKind::BadRequest);

    assert_eq!(c.call(&Request::Ping), Response::Pong);
    assert_eq!(c.call(&apply(&x, mean, std, &out)), Response::Done);
}
