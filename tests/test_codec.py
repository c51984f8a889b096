"""The Python codec against the golden byte vectors written by the Rust side
(protocol/tests/golden.rs): same messages, same bytes, both directions."""

from pathlib import Path

import numpy as np
import pytest

from autozyme import codec
from autozyme.codec import REQUEST, RESPONSE, msg

GOLDEN = Path(__file__).resolve().parents[1] / "protocol" / "golden"


def arr(segment, offset, n, dtype):
    return dict(location=msg("Segment", name=segment, offset=offset), len=n, dtype=dtype)


def peer(address, n, dtype):
    return dict(location=msg("Peer", address=address), len=n, dtype=dtype)


CSR = msg(
    "Csr",
    n_rows=3,
    n_cols=5,
    data=arr("azm_1000_42_0", 0, 7, "F32"),
    indices=arr("azm_1000_42_1", 64, 7, "I32"),
    indptr=arr("azm_1000_42_2", 0, 4, "I64"),
)

REQUESTS = {
    "req_hello": msg("Hello", protocol_version=codec.PROTOCOL_VERSION, build_id="0.1.0+abc", client_pid=4242),
    "req_ping": msg("Ping"),
    "req_status": msg("Status"),
    "req_shutdown": msg("Shutdown"),
    "req_row_sums": msg("RowSums", x=CSR, exclude_max_fraction=None),
    "req_row_sums_no_indices": msg(
        "RowSums",
        x=msg("Csr", n_rows=1, n_cols=2, data=peer(0x7F0012345000, 1, "F64"), indices=None,
              indptr=arr("azm_1000_42_6", 0, 2, "I32")),
        exclude_max_fraction=None,
    ),
    "req_row_sums_exclude": msg(
        "RowSums",
        x=msg("Dense", n_rows=2, n_cols=2, data=arr("azm_1000_42_3", 8, 4, "F64")),
        exclude_max_fraction=0.05,
    ),
    "req_divide_rows": msg(
        "DivideRows",
        x=CSR,
        factors=np.array([1.0, 0.5, -2.25]),
        factors_dtype="F32",
        out=arr("azm_1000_42_4", 0, 7, "F64"),
    ),
    "req_prefault": msg("Prefault", segments=["azm_1000_42_7", "azm_1000_42_8"]),
    "req_lease": msg("Lease", bytes=1 << 30, create=True),
    "req_release": msg("Release", segments=["azm_1000_7_3"]),
    "req_sleep": msg("Sleep", millis=1500),
    "req_scale_stats": msg("ScaleStats", x=CSR, rows=np.array([0, 2], dtype=np.uint64), partitions=2,
                           along_rows=False),
    "req_scale_apply": msg(
        "ScaleApply",
        x=CSR,
        rows=None,
        mean=np.array([0.5, -1.0, 0.0, 2.0, 1e-3]),
        std=np.array([1.0, 2.0, 1.0, 0.25, 3.0]),
        per_row=False,
        max_value=8.0,
        out=arr("azm_1000_42_9", 0, 15, "F64"),
    ),
    "req_hvg_mean_var": msg("HvgMeanVar", x=CSR, batches=np.array([0, 2, 1]), n_batches=3, partitions=2,
                            check=True, with_overall=True),
    "req_hvg_clipped_sums": msg(
        "HvgClippedSums",
        x=msg("Dense", n_rows=2, n_cols=2, data=peer(0x7F0012346000, 4, "F32")),
        batches=np.array([], dtype=np.uint64),
        n_batches=1,
        clip=np.array([2.5, 1e10]),
        only=0,
    ),
    "req_rank_genes_groups": msg(
        "RankGenesGroups", x=CSR, group_of_row=np.array([0, 2**64 - 1, 1], dtype=np.uint64),
        n_groups=2, reference=1, tie_correct=True, mean_slots=2,
    ),
    "req_leiden": msg("Leiden", graph=CSR, use_weights=True, resolution=0.8, n_iterations=None, seed=7),
    "req_umap_layout": msg(
        "UmapLayout", embedding=peer(4096, 6, "F32"), dim=2, head=arr("azm_1000_42_5", 0, 4, "I32"),
        tail=arr("azm_1000_42_5", 16, 4, "I32"), epochs_per_sample=peer(8192, 4, "F64"), a=0.583,
        b=1.334, gamma=1.0, initial_alpha=1.0, negative_sample_rate=5.0, n_epochs=200,
        rng_state=np.array([1, 2**64 - 1, 1 << 40], dtype=np.uint64),
    ),
    "req_fingerprint": msg("Fingerprint", x=CSR),
    "req_rank_genes_groups_group_sums": msg(
        "RankGenesGroupsGroupSums", x=CSR, group_of_row=np.array([0, 2, 1], dtype=np.uint64),
        n_groups=3, reference=None, tie_correct=False,
    ),
    "req_hvg_batch_welford": msg(
        "HvgBatchWelford", x=CSR, batches=np.array([1, 0, 1], dtype=np.uint64), n_batches=2,
    ),
    "req_scale_chunk_stats": msg("ScaleChunkStats", x=CSR),
    "req_hvg_clipped_sums_from": msg(
        "HvgClippedSumsFrom", x=CSR, batches=np.array([1, 0, 1], dtype=np.uint64), n_batches=2,
        clip=np.array([2.5, 1e10, 3.0, 4.0]), sums=np.array([0.0, 1.5, 2.0, 0.25]),
        squares=np.array([0.0, 2.25, 4.0, 0.0625]),
    ),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_bytes_match_rust(name):
    assert codec.frame(REQUEST, REQUESTS[name]) == (GOLDEN / f"{name}.bin").read_bytes()


def test_every_golden_file_is_covered():
    names = {p.stem for p in GOLDEN.glob("*.bin")}
    assert {n for n in names if n.startswith("req_")} == set(REQUESTS)
    assert {n for n in names if n.startswith("resp_")} == {
        "resp_hello", "resp_pong", "resp_status", "resp_shutting_down",
        "resp_row_sums", "resp_done", "resp_error", "resp_leased", "resp_leased_none",
        "resp_scale_stats",
        "resp_hvg_mean_var", "resp_hvg_clipped_sums",
        "resp_rank_genes_groups",
        "resp_row_sums", "resp_done", "resp_error", "resp_leased", "resp_leased_none", "resp_leiden", "resp_fingerprint",
        "resp_hvg_batch_welford",
    }


def _decode_golden(name):
    raw = (GOLDEN / f"{name}.bin").read_bytes()
    assert int.from_bytes(raw[:4], "little") == len(raw) - 4
    value = codec.decode(RESPONSE, raw[4:])
    # And back: re-encoding gives the same bytes.
    assert codec.frame(RESPONSE, value) == raw
    return value


def test_decode_responses():
    hello = _decode_golden("resp_hello")
    assert (hello.tag, hello.pid, hello.threads, hello.build_id) == ("Hello", 99, 2, "0.1.0+abc")
    assert _decode_golden("resp_pong").tag == "Pong"
    st = _decode_golden("resp_status").value
    assert st.pid == 99 and st.runtime_dir == "/run/user/1000/autozyme"
    assert st.cache[0].key == "csc:deadbeef" and st.cache[0].hits == 2
    rs = _decode_golden("resp_row_sums")
    assert rs.sums.tolist() == [3.0, 0.0, 1e300] and rs.highly_expressed.tolist() == [1, 4]
    err = _decode_golden("resp_error")
    assert (err.kind, err.message) == ("BadMatrix", "indptr is not monotone at row 2")
    assert _decode_golden("resp_done").tag == "Done"
    leased = _decode_golden("resp_leased")
    assert (leased.segment, leased.size) == ("azm_1000_7_3", 4096)
    assert _decode_golden("resp_leased_none").segment is None
    assert _decode_golden("resp_shutting_down").tag == "ShuttingDown"
    stats = _decode_golden("resp_scale_stats")
    assert stats.sums.tolist() == [1.5, 0.0] and np.signbit(stats.sq_sums[1])
    welford = _decode_golden("resp_hvg_batch_welford")
    assert welford.means.tolist() == [0.5, 2.0] and welford.variances.tolist() == [1.25, 0.0]
    mv = _decode_golden("resp_hvg_mean_var")
    assert mv.means.tolist() == [0.5, 2.0] and np.signbit(mv.variances[1])
    assert (mv.negative, mv.non_integer, mv.non_finite) == (False, True, False)
    cs = _decode_golden("resp_hvg_clipped_sums")
    assert cs.sums.tolist() == [1.0, 3.5] and cs.squares.tolist() == [1.0, 12.25]
    assert (st.cache_budget_bytes, st.cache_hits, st.cache_misses) == (1 << 31, 5, 1)
    rg = _decode_golden("resp_rank_genes_groups")
    assert rg.n_genes == 2 and rg.rank_sums.tolist() == [3.5, 1.0] and rg.cache_hit
    assert rg.tie.tolist() == [1.0, 0.75] and rg.nnz.tolist() == [1, 2] and len(rg.rest_sums) == 0
    assert rg.nonneg_integers is False
    assert _decode_golden("resp_leiden").membership.tolist() == [0, 1, 0, 2]
    fp = _decode_golden("resp_fingerprint")
    assert (fp.lo, fp.hi) == (0x0123_4567_89AB_CDEF, 2**64 - 1)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x09\x00\x00\x00", b"\x04\x00\x00\x00\x01\x00\x00\x00",
     b"\x06\x00\x00\x00\x07\x00\x00\x00", (4).to_bytes(4, "little") + (1 << 60).to_bytes(8, "little")],
)
def test_malformed_responses_raise_codec_error(payload):
    with pytest.raises(codec.CodecError):
        codec.decode(RESPONSE, payload)
