"""Shared-memory placement: numpy arrays backed by POSIX segments the daemon maps.

A segment is named ``azm_<uid>_<pid>_<seq>`` (the daemon maps only names of its
peer's uid; a sweep unlinks segments whose creating pid is dead). Its memory
lives as long as a mapping does: the name is unlinked when the last numpy array
over it is freed (a ``weakref.finalize`` on the ``mmap``), and the daemon drops
its cached mapping once the name is gone.

Page faults on fresh memory are the dominant cost on the machines we measured
(first touch of a new 4 KiB page costs ~10x a warm write), so segments are
populated in bulk at creation and recycled through a small pool: a kernel that
produces a new array (upstream allocates one too) writes into a pooled segment
that both processes have already mapped.

Python's ``multiprocessing.shared_memory`` would register every segment with the
3.11 resource tracker, which unlinks them when *a* process exits even while the
daemon or another array still uses them; so segments are opened here with the
same ``_posixshmem`` primitive, untracked.
"""

from __future__ import annotations

import itertools
import mmap
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import _posixshmem
import numpy as np

SHM_DIR = "/dev/shm"
_PREFIX = f"azm_{os.geteuid()}_"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
           np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}

_seq = itertools.count()
_lock = threading.Lock()


class PlacementError(RuntimeError):
    """No room in shared memory (the caller falls back to upstream)."""


@dataclass
class _Live:
    name: str
    addr: int
    size: int
    mm: weakref.ref


_live: dict[str, _Live] = {}
# Recycled segments: name -> (mmap, last use); held strongly so they stay mapped.
_pool: dict[str, tuple[mmap.mmap, float]] = {}
_pool_bytes = 0


def pool_limit() -> int:
    env = os.environ.get("AUTOZYME_POOL_BYTES")
    if env and env.isdigit():
        return int(env)
    return 4 << 30


POOL_MAX_AGE_S = 300.0


def dtype_tag(dtype) -> str | None:
    return _DTYPES.get(np.dtype(dtype))


def _unlink(name: str, creator: int) -> None:
    with _lock:
        _live.pop(name, None)
    if os.getpid() != creator:  # a forked child must not remove its parent's segments
        return
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _create(nbytes: int) -> tuple[str, mmap.mmap]:
    size = max(int(nbytes), 1)
    name = f"{_PREFIX}{os.getpid()}_{next(_seq)}"
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            # Reserve the pages now: a full /dev/shm then fails here with ENOSPC,
            # instead of a SIGBUS when the memory is first written.
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            _posixshmem.shm_unlink("/" + name)
            raise PlacementError(f"cannot allocate {size} bytes in {SHM_DIR}: {e}") from e
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    addr = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
    weakref.finalize(mm, _unlink, name, os.getpid())
    with _lock:
        _live[name] = _Live(name, addr, size, weakref.ref(mm))
    return name, mm


def _take_from_pool(nbytes: int) -> mmap.mmap | None:
    """A pooled segment of at least nbytes and not more than twice that."""
    global _pool_bytes
    with _lock:
        best = None
        for name, (mm, _) in _pool.items():
            if nbytes <= len(mm) <= 2 * max(nbytes, 4096) and (best is None or len(mm) < len(_pool[best][0])):
                best = name
        if best is None:
            return None
        mm, _ = _pool.pop(best)
        _pool_bytes -= len(mm)
        return mm


def empty(shape, dtype) -> np.ndarray:
    """A new array backed by a (possibly recycled) segment; contents undefined."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    mm = _take_from_pool(nbytes)
    if mm is None:
        _trim_pool(0)
        _, mm = _create(nbytes)
    # The array's base is the mmap itself, so any view of it keeps the array (not
    # only the mmap) alive: the array's refcount tells whether anything sees it.
    return np.ndarray(shape, dtype=dtype, buffer=mm)


def copy_of(arr: np.ndarray) -> np.ndarray:
    out = empty(arr.shape, arr.dtype)
    np.copyto(out, arr, casting="no")
    return out


def ref(arr: np.ndarray) -> dict | None:
    """The wire ArrayRef of a C-contiguous array lying inside a live segment."""
    tag = dtype_tag(arr.dtype)
    if tag is None or not arr.flags.c_contiguous:
        return None
    addr = arr.__array_interface__["data"][0]
    end = addr + arr.nbytes
    with _lock:
        for seg in _live.values():
            if seg.addr <= addr and end <= seg.addr + seg.size and seg.mm() is not None:
                return dict(segment=seg.name, offset=addr - seg.addr, len=arr.size, dtype=tag)
    return None


def is_placed(arr) -> bool:
    return isinstance(arr, np.ndarray) and ref(arr) is not None


def placed(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself if it already lies in a segment, else a segment-backed copy."""
    return arr if ref(arr) is not None else copy_of(np.ascontiguousarray(arr))


def replace_attr(holder, attr: str, new) -> None:
    """``setattr(holder, attr, new)``; when the replaced array lay in a segment and
    nothing but ``holder`` referenced it (no view, no other matrix, no user
    variable), its segment goes back to the pool for the next result to reuse:
    then replacing (upstream's behaviour) and recycling cannot be told apart."""
    global _pool_bytes
    old = getattr(holder, attr)
    mm = old.base if isinstance(old, np.ndarray) else None
    # References to `old`: holder's attribute, this local, getrefcount's argument;
    # to `mm`: old.base, this local, the argument.
    unshared = (
        isinstance(mm, mmap.mmap)
        and sys.getrefcount(old) <= 3
        and sys.getrefcount(mm) <= 3
        and len(mm) <= pool_limit()
    )
    setattr(holder, attr, new)
    del old
    if not unshared:
        return
    with _lock:
        name = next((s.name for s in _live.values() if s.mm() is mm), None)
        if name is None or name in _pool:
            return
        _pool[name] = (mm, time.monotonic())
        _pool_bytes += len(mm)
    _trim_pool(pool_limit())


def _trim_pool(limit: int) -> None:
    """Drop pooled segments beyond ``limit`` bytes (oldest first) or unused for
    POOL_MAX_AGE_S. Dropping the last reference unmaps and unlinks them."""
    global _pool_bytes
    now = time.monotonic()
    dropped = []
    with _lock:
        for name, (mm, used) in sorted(_pool.items(), key=lambda kv: kv[1][1]):
            if _pool_bytes > limit or now - used > POOL_MAX_AGE_S:
                dropped.append(_pool.pop(name)[0])
                _pool_bytes -= len(mm)
    del dropped


def clear_pool() -> None:
    _trim_pool(-1)


def stats() -> dict:
    with _lock:
        live = [s for s in _live.values() if s.mm() is not None]
        return dict(
            segments=len(live),
            bytes=sum(s.size for s in live),
            pooled_segments=len(_pool),
            pooled_bytes=_pool_bytes,
        )


def sweep_dead_segments() -> int:
    """Unlink this user's segments whose creating process is gone."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        parts = name[len(_PREFIX):].split("_")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            _posixshmem.shm_unlink("/" + name)
            removed += 1
        except OSError:
            pass
    return removed
