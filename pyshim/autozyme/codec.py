"""Wire codec: the Python twin of ``protocol/src/lib.rs``.

Messages are bincode 1.3.3 with fixed-width little-endian integers, framed by a
``u32`` little-endian payload length. Layout rules (the same as the Rust side):
integers and floats fixed width; ``bool`` one byte; strings and vectors a ``u64``
length then the items; ``Option`` a ``u8`` tag then the value; an enum a ``u32``
variant index then its fields; a struct its fields in order.

Types are described once, as data (``Struct``/``Enum`` below), in the same order as
the Rust definitions; the golden byte vectors in ``protocol/golden/`` hold both
sides to it (``tests/test_codec.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 8
MAX_FRAME_BYTES = 256 << 20


class CodecError(ValueError):
    """A message that does not follow the wire layout."""


class Prim:
    def __init__(self, fmt: str):
        self.st = struct.Struct("<" + fmt)

    def enc(self, v, out: bytearray) -> None:
        out += self.st.pack(v)

    def dec(self, buf: memoryview, pos: int):
        if pos + self.st.size > len(buf):
            raise CodecError("truncated message")
        return self.st.unpack_from(buf, pos)[0], pos + self.st.size


U8, U32, U64, F64 = Prim("B"), Prim("I"), Prim("Q"), Prim("d")


class _Bool:
    def enc(self, v, out):
        out.append(1 if v else 0)

    def dec(self, buf, pos):
        v, pos = U8.dec(buf, pos)
        if v > 1:
            raise CodecError(f"invalid bool {v}")
        return bool(v), pos


class _Str:
    def enc(self, v: str, out):
        b = v.encode()
        U64.enc(len(b), out)
        out += b

    def dec(self, buf, pos):
        n, pos = U64.dec(buf, pos)
        if pos + n > len(buf):
            raise CodecError("truncated string")
        return bytes(buf[pos : pos + n]).decode(), pos + n


BOOL, STR = _Bool(), _Str()


class Vec:
    """``Vec<T>``; vectors of f64/u64 travel as numpy arrays (decoded without a loop)."""

    _np = {id(F64): "<f8", id(U64): "<u8"}

    def __init__(self, item):
        self.item = item

    def enc(self, v, out):
        U64.enc(len(v), out)
        dt = self._np.get(id(self.item))
        if dt is not None:
            out += np.ascontiguousarray(v, dtype=dt).tobytes()
        else:
            for x in v:
                self.item.enc(x, out)

    def dec(self, buf, pos):
        n, pos = U64.dec(buf, pos)
        dt = self._np.get(id(self.item))
        if dt is not None:
            end = pos + 8 * n
            if end > len(buf):
                raise CodecError("truncated vector")
            return np.frombuffer(buf[pos:end], dtype=dt).copy(), end
        items = []
        for _ in range(n):
            x, pos = self.item.dec(buf, pos)
            items.append(x)
        return items, pos


class Opt:
    def __init__(self, item):
        self.item = item

    def enc(self, v, out):
        if v is None:
            out.append(0)
        else:
            out.append(1)
            self.item.enc(v, out)

    def dec(self, buf, pos):
        tag, pos = U8.dec(buf, pos)
        if tag == 0:
            return None, pos
        if tag != 1:
            raise CodecError(f"invalid option tag {tag}")
        return self.item.dec(buf, pos)


@dataclass(frozen=True)
class Msg:
    """A decoded enum value or struct: ``tag`` names the variant (or struct)."""

    tag: str
    fields: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


class Struct:
    def __init__(self, name: str, fields: list[tuple[str, Any]]):
        self.name, self.fields = name, fields

    def enc(self, v: dict | Msg, out):
        d = v.fields if isinstance(v, Msg) else v
        for fname, ftype in self.fields:
            ftype.enc(d[fname], out)

    def dec(self, buf, pos):
        d = {}
        for fname, ftype in self.fields:
            d[fname], pos = ftype.dec(buf, pos)
        return Msg(self.name, d), pos


class Enum:
    """Variants are ``(name, fields)``: fields a list of (name, type) for a struct
    variant, a single type for a newtype variant, or ``[]`` for a unit variant."""

    def __init__(self, name: str, variants: list[tuple[str, Any]]):
        self.name = name
        self.variants = variants
        self.index = {vname: i for i, (vname, _) in enumerate(variants)}

    def enc(self, v: Msg | str, out):
        tag, fields = (v, {}) if isinstance(v, str) else (v.tag, v.fields)
        i = self.index[tag]
        U32.enc(i, out)
        spec = self.variants[i][1]
        if isinstance(spec, list):
            for fname, ftype in spec:
                ftype.enc(fields[fname], out)
        else:
            spec.enc(fields["value"], out)

    def dec(self, buf, pos):
        i, pos = U32.dec(buf, pos)
        if i >= len(self.variants):
            raise CodecError(f"{self.name}: unknown variant {i}")
        vname, spec = self.variants[i]
        if isinstance(spec, list):
            d = {}
            for fname, ftype in spec:
                d[fname], pos = ftype.dec(buf, pos)
            return Msg(vname, d), pos
        value, pos = spec.dec(buf, pos)
        return Msg(vname, {"value": value}), pos


class _UnitEnum(Enum):
    """A fieldless enum, used as plain strings (``"F32"``)."""

    def dec(self, buf, pos):
        m, pos = super().dec(buf, pos)
        return m.tag, pos


DTYPE = _UnitEnum("DType", [("F32", []), ("F64", []), ("I32", []), ("I64", [])])
LOCATION = Enum("Location", [("Segment", [("name", STR), ("offset", U64)]), ("Peer", [("address", U64)])])
ARRAY_REF = Struct("ArrayRef", [("location", LOCATION), ("len", U64), ("dtype", DTYPE)])
MATRIX = Enum(
    "Matrix",
    [
        (
            "Csr",
            [
                ("n_rows", U64),
                ("n_cols", U64),
                ("data", ARRAY_REF),
                ("indices", Opt(ARRAY_REF)),
                ("indptr", ARRAY_REF),
            ],
        ),
        ("Dense", [("n_rows", U64), ("n_cols", U64), ("data", ARRAY_REF)]),
    ],
)
REQUEST = Enum(
    "Request",
    [
        ("Hello", [("protocol_version", U32), ("build_id", STR), ("client_pid", U32)]),
        ("Ping", []),
        ("Status", []),
        ("Shutdown", []),
        ("RowSums", [("x", MATRIX), ("exclude_max_fraction", Opt(F64))]),
        (
            "DivideRows",
            [
                ("x", MATRIX),
                ("factors", Vec(F64)),
                ("factors_dtype", DTYPE),
                ("out", ARRAY_REF),
            ],
        ),
        ("Prefault", [("segments", Vec(STR))]),
        ("Lease", [("bytes", U64), ("create", BOOL)]),
        ("Release", [("segments", Vec(STR))]),
        ("Sleep", [("millis", U64)]),
        (
            "ScaleStats",
            [("x", MATRIX), ("rows", Opt(Vec(U64))), ("partitions", U32), ("along_rows", BOOL)],
        ),
        (
            "ScaleApply",
            [
                ("x", MATRIX),
                ("rows", Opt(Vec(U64))),
                ("mean", Opt(Vec(F64))),
                ("std", Vec(F64)),
                ("per_row", BOOL),
                ("max_value", Opt(F64)),
                ("out", ARRAY_REF),
            ],
        ),
        (
            "HvgMeanVar",
            [
                ("x", MATRIX),
                ("batches", Vec(U64)),
                ("n_batches", U64),
                ("partitions", U64),
                ("check", BOOL),
                ("with_overall", BOOL),
            ],
        ),
        (
            "HvgClippedSums",
            [
                ("x", MATRIX),
                ("batches", Vec(U64)),
                ("n_batches", U64),
                ("clip", Vec(F64)),
                ("only", Opt(U64)),
            ],
        ),
        (
            "RankGenesGroups",
            [
                ("x", MATRIX),
                ("group_of_row", Vec(U64)),
                ("n_groups", U64),
                ("reference", Opt(U64)),
                ("tie_correct", BOOL),
                ("mean_slots", U64),
            ],
        ),
        (
            "Leiden",
            [
                ("graph", MATRIX),
                ("use_weights", BOOL),
                ("resolution", F64),
                ("n_iterations", Opt(U64)),
                ("seed", U64),
            ],
        ),
        ("Fingerprint", [("x", MATRIX)]),
        (
            "RankGenesGroupsGroupSums",
            [
                ("x", MATRIX),
                ("group_of_row", Vec(U64)),
                ("n_groups", U64),
                ("reference", Opt(U64)),
                ("tie_correct", BOOL),
            ],
        ),
        ("HvgBatchWelford", [("x", MATRIX), ("batches", Vec(U64)), ("n_batches", U64)]),
        ("ScaleChunkStats", [("x", MATRIX)]),
        (
            "HvgClippedSumsFrom",
            [
                ("x", MATRIX),
                ("batches", Vec(U64)),
                ("n_batches", U64),
                ("clip", Vec(F64)),
                ("sums", Vec(F64)),
                ("squares", Vec(F64)),
            ],
        ),
        (
            "UmapLayout",
            [
                ("embedding", ARRAY_REF),
                ("dim", U64),
                ("head", ARRAY_REF),
                ("tail", ARRAY_REF),
                ("epochs_per_sample", ARRAY_REF),
                ("a", F64),
                ("b", F64),
                ("gamma", F64),
                ("initial_alpha", F64),
                ("negative_sample_rate", F64),
                ("n_epochs", U64),
                ("rng_state", Vec(U64)),
            ],
        ),
    ],
)
ERROR_KIND = _UnitEnum(
    "ErrorKind",
    [
        ("Handshake", []),
        ("BadRequest", []),
        ("BadMatrix", []),
        ("Segment", []),
        ("TooLarge", []),
        ("Unsupported", []),
        ("Internal", []),
    ],
)
CACHE_ENTRY = Struct("CacheEntry", [("key", STR), ("bytes", U64), ("hits", U64)])
DAEMON_STATUS = Struct(
    "DaemonStatus",
    [
        ("pid", U32),
        ("version", STR),
        ("build_id", STR),
        ("protocol_version", U32),
        ("threads", U32),
        ("uptime_ms", U64),
        ("rss_bytes", U64),
        ("peak_rss_bytes", U64),
        ("requests_served", U64),
        ("requests_failed", U64),
        ("open_connections", U32),
        ("mapped_segments", U32),
        ("mapped_bytes", U64),
        ("cache", Vec(CACHE_ENTRY)),
        ("idle_timeout_s", U64),
        ("runtime_dir", STR),
        ("cache_budget_bytes", U64),
        ("cache_hits", U64),
        ("cache_misses", U64),
    ],
)
RESPONSE = Enum(
    "Response",
    [
        (
            "Hello",
            [("protocol_version", U32), ("build_id", STR), ("pid", U32), ("threads", U32)],
        ),
        ("Pong", []),
        ("Status", DAEMON_STATUS),
        ("ShuttingDown", []),
        ("RowSums", [("sums", Vec(F64)), ("highly_expressed", Vec(U64))]),
        ("Done", []),
        ("Error", [("kind", ERROR_KIND), ("message", STR)]),
        ("Leased", [("segment", Opt(STR)), ("size", U64)]),
        ("ScaleStats", [("sums", Vec(F64)), ("sq_sums", Vec(F64))]),
        (
            "HvgMeanVar",
            [
                ("means", Vec(F64)),
                ("variances", Vec(F64)),
                ("negative", BOOL),
                ("non_integer", BOOL),
                ("non_finite", BOOL),
            ],
        ),
        ("HvgClippedSums", [("sums", Vec(F64)), ("squares", Vec(F64))]),
        (
            "RankGenesGroups",
            [
                ("n_genes", U64),
                ("rank_sums", Vec(F64)),
                ("tie", Vec(F64)),
                ("sums", Vec(F64)),
                ("nnz", Vec(U64)),
                ("rest_sums", Vec(F64)),
                ("rest_nnz", Vec(U64)),
                ("cache_hit", BOOL),
                ("nonneg_integers", BOOL),
            ],
        ),
        ("Leiden", [("membership", Vec(U64))]),
        ("Fingerprint", [("lo", U64), ("hi", U64)]),
        ("HvgBatchWelford", [("means", Vec(F64)), ("variances", Vec(F64))]),
    ],
)


def msg(tag: str, **fields) -> Msg:
    return Msg(tag, fields)


def encode(ty, value) -> bytes:
    out = bytearray()
    ty.enc(value, out)
    return bytes(out)


def decode(ty, payload: bytes | memoryview):
    buf = memoryview(payload)
    value, pos = ty.dec(buf, 0)
    if pos != len(buf):
        raise CodecError(f"{len(buf) - pos} trailing bytes")
    return value


def frame(ty, value) -> bytes:
    payload = encode(ty, value)
    return struct.pack("<I", len(payload)) + payload
