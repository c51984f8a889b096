//! Golden byte vectors: each sample message's frame is stored in `protocol/golden/`.
//! The Python codec's tests (`tests/test_codec.py`) build the same messages and must
//! produce, and decode, exactly these bytes. Regenerate with `AUTOZYME_BLESS=1`.

use autozyme_protocol::*;
use std::path::PathBuf;

fn arr(segment: &str, offset: u64, len: u64, dtype: DType) -> ArrayRef {
    ArrayRef {
        location: Location::Segment {
            name: segment.into(),
            offset,
        },
        len,
        dtype,
    }
}

fn peer(address: u64, len: u64, dtype: DType) -> ArrayRef {
    ArrayRef {
        location: Location::Peer { address },
        len,
        dtype,
    }
}

fn csr() -> Matrix {
    Matrix::Csr {
        n_rows: 3,
        n_cols: 5,
        data: arr("azm_1000_42_0", 0, 7, DType::F32),
        indices: Some(arr("azm_1000_42_1", 64, 7, DType::I32)),
        indptr: arr("azm_1000_42_2", 0, 4, DType::I64),
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        (
            "req_hello",
            Request::Hello {
                protocol_version: PROTOCOL_VERSION,
                build_id: "0.1.0+abc".into(),
                client_pid: 4242,
            },
        ),
        ("req_ping", Request::Ping),
        ("req_status", Request::Status),
        ("req_shutdown", Request::Shutdown),
        (
            "req_row_sums",
            Request::RowSums {
                x: csr(),
                exclude_max_fraction: None,
            },
        ),
        (
            "req_row_sums_no_indices",
            Request::RowSums {
                x: Matrix::Csr {
                    n_rows: 1,
                    n_cols: 2,
                    data: peer(0x7f00_1234_5000, 1, DType::F64),
                    indices: None,
                    indptr: arr("azm_1000_42_6", 0, 2, DType::I32),
                },
                exclude_max_fraction: None,
            },
        ),
        (
            "req_row_sums_exclude",
            Request::RowSums {
                x: Matrix::Dense {
                    n_rows: 2,
                    n_cols: 2,
                    data: arr("azm_1000_42_3", 8, 4, DType::F64),
                },
                exclude_max_fraction: Some(0.05),
            },
        ),
        (
            "req_divide_rows",
            Request::DivideRows {
                x: csr(),
                factors: vec![1.0, 0.5, -2.25],
                factors_dtype: DType::F32,
                out: arr("azm_1000_42_4", 0, 7, DType::F64),
            },
        ),
        (
            "req_prefault",
            Request::Prefault {
                segments: vec!["azm_1000_42_7".into(), "azm_1000_42_8".into()],
            },
        ),
        (
            "req_lease",
            Request::Lease {
                bytes: 1 << 30,
                create: true,
            },
        ),
        (
            "req_release",
            Request::Release {
                segments: vec!["azm_1000_7_3".into()],
            },
        ),
        ("req_sleep", Request::Sleep { millis: 1500 }),
        (
            "req_scale_stats",
            Request::ScaleStats {
                x: csr(),
                rows: Some(vec![0, 2]),
                partitions: 2,
                along_rows: false,
            },
        ),
        (
            "req_scale_apply",
            Request::ScaleApply {
                x: csr(),
                rows: None,
                mean: Some(vec![0.5, -1.0, 0.0, 2.0, 1e-3]),
                std: vec![1.0, 2.0, 1.0, 0.25, 3.0],
                per_row: false,
                max_value: Some(8.0),
                out: arr("azm_1000_42_9", 0, 15, DType::F64),
            },
        ),
        (
            "req_hvg_mean_var",
            Request::HvgMeanVar {
                x: csr(),
                batches: vec![0, 2, 1],
                n_batches: 3,
                partitions: 2,
                check: true,
                with_overall: true,
            },
        ),
        (
            "req_hvg_clipped_sums",
            Request::HvgClippedSums {
                x: Matrix::Dense {
                    n_rows: 2,
                    n_cols: 2,
                    data: peer(0x7f00_1234_6000, 4, DType::F32),
                },
                batches: vec![],
                n_batches: 1,
                clip: vec![2.5, 1e10],
                only: Some(0),
            },
        ),
        (
            "req_rank_genes_groups",
            Request::RankGenesGroups {
                x: csr(),
                group_of_row: vec![0, u64::MAX, 1],
                n_groups: 2,
                reference: Some(1),
                tie_correct: true,
                mean_slots: 2,
            },
        ),
        (
            "req_leiden",
            Request::Leiden {
                graph: csr(),
                use_weights: true,
                resolution: 0.8,
                n_iterations: None,
                seed: 7,
            },
        ),
        ("req_fingerprint", Request::Fingerprint { x: csr() }),
        (
            "req_rank_genes_groups_group_sums",
            Request::RankGenesGroupsGroupSums {
                x: csr(),
                group_of_row: vec![0, 2, 1],
                n_groups: 3,
                reference: None,
                tie_correct: false,
            },
        ),
        (
            "req_hvg_batch_welford",
            Request::HvgBatchWelford {
                x: csr(),
                batches: vec![1, 0, 1],
                n_batches: 2,
            },
        ),
        (
            "req_scale_chunk_stats",
            Request::ScaleChunkStats { x: csr() },
        ),
        (
            "req_hvg_clipped_sums_from",
            Request::HvgClippedSumsFrom {
                x: csr(),
                batches: vec![1, 0, 1],
                n_batches: 2,
                clip: vec![2.5, 1e10, 3.0, 4.0],
                sums: vec![0.0, 1.5, 2.0, 0.25],
                squares: vec![0.0, 2.25, 4.0, 0.0625],
            },
        ),
        (
            "req_umap_layout",
            Request::UmapLayout {
                embedding: peer(4096, 6, DType::F32),
                dim: 2,
                head: arr("azm_1000_42_5", 0, 4, DType::I32),
                tail: arr("azm_1000_42_5", 16, 4, DType::I32),
                epochs_per_sample: peer(8192, 4, DType::F64),
                a: 0.583,
                b: 1.334,
                gamma: 1.0,
                initial_alpha: 1.0,
                negative_sample_rate: 5.0,
                n_epochs: 200,
                rng_state: vec![1, u64::MAX, 1 << 40],
            },
        ),
    ]
}

fn responses() -> Vec<(&'static str, Response)> {
    vec![
        (
            "resp_hello",
            Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                build_id: "0.1.0+abc".into(),
                pid: 99,
                threads: 2,
            },
        ),
        ("resp_pong", Response::Pong),
        (
            "resp_status",
            Response::Status(DaemonStatus {
                pid: 99,
                version: "0.1.0".into(),
                build_id: "0.1.0+abc".into(),
                protocol_version: PROTOCOL_VERSION,
                threads: 2,
                uptime_ms: 1234,
                rss_bytes: 1 << 20,
                peak_rss_bytes: 1 << 21,
                requests_served: 7,
                requests_failed: 1,
                open_connections: 1,
                mapped_segments: 3,
                mapped_bytes: 4096,
                cache: vec![CacheEntry {
                    key: "csc:deadbeef".into(),
                    bytes: 100,
                    hits: 2,
                }],
                idle_timeout_s: 600,
                runtime_dir: "/run/user/1000/autozyme".into(),
                cache_budget_bytes: 1 << 31,
                cache_hits: 5,
                cache_misses: 1,
            }),
        ),
        ("resp_shutting_down", Response::ShuttingDown),
        (
            "resp_row_sums",
            Response::RowSums {
                sums: vec![3.0, 0.0, 1e300],
                highly_expressed: vec![1, 4],
            },
        ),
        ("resp_done", Response::Done),
        (
            "resp_leased",
            Response::Leased {
                segment: Some("azm_1000_7_3".into()),
                size: 4096,
            },
        ),
        (
            "resp_leased_none",
            Response::Leased {
                segment: None,
                size: 0,
            },
        ),
        (
            "resp_rank_genes_groups",
            Response::RankGenesGroups {
                n_genes: 2,
                rank_sums: vec![3.5, 1.0],
                tie: vec![1.0, 0.75],
                sums: vec![0.25, 2.0],
                nnz: vec![1, 2],
                rest_sums: vec![],
                rest_nnz: vec![],
                cache_hit: true,
                nonneg_integers: false,
            },
        ),
        (
            "resp_error",
            Response::error(ErrorKind::BadMatrix, "indptr is not monotone at row 2"),
        ),
        (
            "resp_scale_stats",
            Response::ScaleStats {
                sums: vec![1.5, 0.0],
                sq_sums: vec![2.25, -0.0],
            },
        ),
        (
            "resp_hvg_mean_var",
            Response::HvgMeanVar {
                means: vec![0.5, 2.0],
                variances: vec![0.25, -0.0],
                negative: false,
                non_integer: true,
                non_finite: false,
            },
        ),
        (
            "resp_hvg_clipped_sums",
            Response::HvgClippedSums {
                sums: vec![1.0, 3.5],
                squares: vec![1.0, 12.25],
            },
        ),
        (
            "resp_leiden",
            Response::Leiden {
                membership: vec![0, 1, 0, 2],
            },
        ),
        (
            "resp_fingerprint",
            Response::Fingerprint {
                lo: 0x0123_4567_89AB_CDEF,
                hi: u64::MAX,
            },
        ),
        (
            "resp_hvg_batch_welford",
            Response::HvgBatchWelford {
                means: vec![0.5, 2.0],
                variances: vec![1.25, 0.0],
            },
        ),
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn check(name: &str, bytes: Vec<u8>) {
    let path = golden_dir().join(format!("{name}.bin"));
    if std::env::var_os("AUTOZYME_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        return;
    }
    let want = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with AUTOZYME_BLESS=1)", path.display()));
    assert_eq!(
        bytes, want,
        "{name}: wire bytes changed; bump PROTOCOL_VERSION and re-bless"
    );
}

#[test]
fn requests_match_golden_bytes_and_round_trip() {
    for (name, req) in requests() {
        let framed = frame(&req);
        let back: Request = read_frame(&mut &framed[..]).unwrap().unwrap();
        assert_eq!(back, req);
        check(name, framed);
    }
}

#[test]
fn responses_match_golden_bytes_and_round_trip() {
    for (name, resp) in responses() {
        let framed = frame(&resp);
        let back: Response = read_frame(&mut &framed[..]).unwrap().unwrap();
        assert_eq!(back, resp);
        check(name, framed);
    }
}

#[test]
fn oversized_and_truncated_frames_are_errors_not_panics() {
    let big = (MAX_FRAME_BYTES + 1).to_le_bytes();
    assert!(matches!(
        read_payload(&mut &big[..]),
        Err(FrameError::TooLarge(_))
    ));
    let mut framed = frame(&Request::Status);
    framed.pop();
    assert!(read_payload(&mut &framed[..]).is_err());
    // A valid length with garbage: a decode error.
    let junk = [4u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    assert!(read_frame::<_, Request>(&mut &junk[..]).is_err());
    // A vector claiming 2^60 elements must not allocate them.
    let mut huge = vec![];
    huge.extend_from_slice(&5u32.to_le_bytes()); // RowSums response
    huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(decode::<Response>(&huge).is_err());
    // Clean end of stream.
    assert!(read_payload(&mut &[][..]).unwrap().is_none());
}
