"""What a caller and the warm worker must agree on: the key, the socket, the framing.

The key names everything that can change the worker's results or the compiled
code it holds: the interpreter, the versions of the packages the calls run, the
machine, and the environment variables that choose thread counts and numba's
threading layer. A caller whose key differs (an upgrade, another venv) talks to
another worker (or starts one); a stale worker idles out.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import socket
import struct
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import runtime

PACKAGES = ("scanpy", "anndata", "numpy", "scipy", "scikit-learn", "numba", "llvmlite",
            "pynndescent", "umap-learn", "pandas")
ENVIRONMENT = ("NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_OPT", "NUMBA_FASTMATH",
               "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "AUTOZYME_RUNTIME_DIR")
# A frame: 8-byte big-endian length, then a pickle (protocol 5) of that length.
HEADER = struct.Struct(">Q")
MAX_FRAME = 1 << 36


class WireError(ConnectionError):
    """The peer closed the connection or sent something that is not a frame."""


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def key_fields() -> dict:
    from .. import __version__

    return {
        "python": sys.executable,
        "python_version": sys.version,
        "autozyme": __version__,
        "autozyme_path": str(Path(__file__).resolve().parent.parent),
        # The worker's own code: an edited checkout gets a new worker.
        "worker_code": [p.stat().st_mtime_ns for p in sorted(Path(__file__).parent.glob("*.py"))],
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()}",
        **{name: _version(name) for name in PACKAGES},
        **{f"env {name}": os.environ.get(name, "") for name in ENVIRONMENT},
    }


_key_cache: str | None = None


def key() -> str:
    global _key_cache
    if _key_cache is None:
        text = repr(sorted(key_fields().items())).encode()
        _key_cache = hashlib.sha256(text).hexdigest()[:16]
    return _key_cache


def socket_path(k: str | None = None) -> Path:
    return runtime.runtime_dir() / f"warm-{k or key()}.sock"


def lock_path(k: str | None = None) -> Path:
    return runtime.runtime_dir() / f"warm-{k or key()}.lock"


def log_path(k: str | None = None) -> Path:
    return runtime.runtime_dir() / f"warm-{k or key()}.log"


def send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(HEADER.pack(len(data)))
    sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError("the peer closed the connection")
        got += k
    return buf


def recv(sock: socket.socket):
    (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if n > MAX_FRAME:
        raise WireError(f"frame of {n} bytes refused")
    return pickle.loads(_recv_exact(sock, n))
