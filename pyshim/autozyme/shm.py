"""Shared-memory placement: numpy arrays backed by POSIX segments the daemon maps.

A segment is named ``azm_<uid>_<pid>_<seq>``; the daemon maps only names of its
peer's uid, and a sweep (here and in the daemon) unlinks segments whose creating
pid is dead, so a killed client leaks nothing for long.

Lifetime. Each segment's mapping has one root array (a uint8 array whose
``base`` is the mmap); arrays handed out are views of it, and numpy makes every
further view keep the root alive. When the root is freed, nothing in Python can
reach that memory any more: its finalizer moves the still-mapped segment to a
pool instead of unlinking it. Its pages stay allocated and the daemon's mapping
of it stays valid, so the next array of a similar size (a call's result, or the
copy of a fresh input) costs neither allocation nor page faults on either side. The pool is bounded (``AUTOZYME_POOL_BYTES``), ages out after
``POOL_MAX_AGE_S`` and is unlinked at exit.

Why the pool matters: allocating shared memory is the dominant cost of a call
here. tmpfs hands out 4 KiB pages (shared memory rarely gets transparent huge
pages), so a fresh 150 MB segment costs ~100 ms to allocate and map, where the
kernels themselves take ~20 ms.

The daemon keeps a pool of its own as well, which outlives client processes:
segments are leased from it (``Lease``) when this process has none that fits,
and given back (``Release``) instead of unlinked, also at exit, so the first
call of the next notebook kernel finds memory already allocated and mapped.

Python's ``multiprocessing.shared_memory`` would register every segment with the
3.11 resource tracker, which unlinks them when *a* process exits even while the
daemon or another array still uses them; so segments are opened here with the
same ``_posixshmem`` primitive, untracked.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import functools
import itertools
import mmap
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import _posixshmem
import numpy as np

from .codec import Msg

SHM_DIR = "/dev/shm"
_PREFIX = f"azm_{os.geteuid()}_"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
           np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
POOL_MAX_AGE_S = 600.0

_seq = itertools.count()
_lock = threading.Lock()
_exiting = False
# Names of segments whose root array was freed. A finalizer may run inside any
# allocation, including one made while this thread holds ``_lock`` (a garbage
# collection there frees an AnnData cycle): it must never take a lock itself, so
# it only queues the name (SimpleQueue.put is safe there) and the pooling is done
# by a worker thread, or by the next call here, whichever comes first.
_released_names: queue.SimpleQueue = queue.SimpleQueue()
# Segments named in a request the daemon did not answer in time: it may still
# write into them, so once free they are never pooled or given back, only dropped
# (and unlinked if ours), and no later call can receive a late write.
_quarantined: set[str] = set()
_release_worker: list[int] = []  # pid of the process whose worker runs
_libc = ctypes.CDLL(None, use_errno=True)


class PlacementError(RuntimeError):
    """No room in shared memory (the caller falls back to upstream)."""


@dataclass
class _Live:
    name: str
    addr: int
    size: int
    mm: mmap.mmap
    root: weakref.ref
    lent: bool  # leased from the daemon: given back, never unlinked, by us


_live: dict[str, _Live] = {}
# Pooled segments, still mapped: name -> (mmap, time released, lent by the daemon).
_free: dict[str, tuple[mmap.mmap, float, bool]] = {}
# The daemon's segment pool, when activation has wired it: lease(nbytes, create)
# -> (name, size) | None, and release(names).
_lender = None
# Spares being allocated in the background: size -> thread.
_spares_pending: dict[int, threading.Thread] = {}


def pool_limit() -> int:
    """Bytes of pooled segments kept at most: ``AUTOZYME_POOL_BYTES``, else 4 GiB
    or a quarter of the machine's memory where that is more (so a large result,
    such as scale's 4.3 GB on 180,000 x 3,000, is kept for the next call)."""
    env = os.environ.get("AUTOZYME_POOL_BYTES")
    if env and env.isdigit():
        return int(env)
    return max(4 << 30, _physical_memory() // 4)


@functools.lru_cache(maxsize=1)
def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def set_lender(lease, release) -> None:
    global _lender
    _lender = (lease, release)


def dtype_tag(dtype) -> str | None:
    return _DTYPES.get(np.dtype(dtype))


def _new_name() -> str:
    return f"{_PREFIX}{os.getpid()}_{next(_seq)}"


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _create(name: str, size: int) -> mmap.mmap:
    """Create segment ``name`` of ``size`` bytes, every page allocated, and map it.

    Fresh memory dominates the cost of a large new segment, so its pages are
    faulted in for writing by several threads at once (``MADV_POPULATE_WRITE``,
    Linux 5.14; ctypes releases the GIL), which also reports a full /dev/shm as
    an error here instead of a SIGBUS at first write. Older kernels reserve the
    pages with posix_fallocate and map them all at once."""
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = _allocate_pages(fd, size)
    except OSError as e:
        _unlink(name)
        raise PlacementError(f"cannot allocate {size} bytes in {SHM_DIR}: {e}") from e
    finally:
        os.close(fd)
    return mm


_MADV_POPULATE_WRITE = 23
_POPULATE_PIECE = 64 << 20


def _populate_for_writing(mm: mmap.mmap) -> int:
    """Fault in every page of ``mm`` for writing; returns 0 or the first errno.

    The first piece here (an old kernel says EINVAL at once), the rest spread
    over one thread a core at nice +10: a spare is often populated in the
    background while the next call runs, which must not wait behind it."""
    size = len(mm)
    if size == 0:
        return 0
    view = np.frombuffer(mm, np.uint8)
    base = view.ctypes.data
    pieces = [(a, min(_POPULATE_PIECE, size - a)) for a in range(0, size, _POPULATE_PIECE)]
    errors: list[int] = []

    def work(mine, lower_priority):
        if lower_priority:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only
            except OSError:
                pass
        for a, n in mine:
            if errors:
                return
            if _libc.madvise(ctypes.c_void_p(base + a), ctypes.c_size_t(n), _MADV_POPULATE_WRITE):
                errors.append(ctypes.get_errno())
                return

    try:
        work(pieces[:1], False)
        rest = pieces[1:]
        k = min(os.cpu_count() or 1, 8, len(rest))
        if rest and not errors:
            threads = [threading.Thread(target=work, args=(rest[i::k], True)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        del view  # the mmap can be closed only once no array exports it
    return errors[0] if errors else 0


def _map(fd: int, size: int) -> mmap.mmap:
    """Map an existing segment, all pages at once (bulk population is ~10x
    cheaper than faulting 4 KiB pages in one by one)."""
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


def _allocate_pages(fd: int, size: int) -> mmap.mmap:
    """Map the sized, empty segment ``fd`` and allocate every page of it
    (``_populate_for_writing``; posix_fallocate on kernels before 5.14)."""
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    err = _populate_for_writing(mm)
    if err == errno.EINVAL:  # the kernel predates MADV_POPULATE_WRITE
        mm.close()
        os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    elif err:
        mm.close()
        raise OSError(errno.ENOSPC if err == errno.EFAULT else err, "cannot allocate the pages")
    return mm


def _map_new(fd: int, size: int) -> mmap.mmap:
    """Map a segment the daemon has just created for us, its pages not yet
    allocated, and allocate them here, in low-priority threads of this process.
    Done in the daemon, that work would take CPU from this process's next call
    whatever its threads' nice value: the kernel's autogroups share the CPU
    equally between the two processes' sessions (docs/bench/pipeline.md)."""
    try:
        return _allocate_pages(fd, size)
    finally:
        os.close(fd)


def _root(name: str, mm: mmap.mmap, lent: bool) -> np.ndarray:
    """Register a mapped segment as live and return its root array."""
    _start_release_worker()
    root = np.ndarray(len(mm), dtype=np.uint8, buffer=mm)
    weakref.finalize(root, _released, name, os.getpid())
    with _lock:
        _live[name] = _Live(name, root.ctypes.data, len(mm), mm, weakref.ref(root), lent)
    return root


def _released(name: str, creator: int) -> None:
    """Finalizer of segment ``name``'s root array: queue it for pooling (no lock
    may be taken here, see ``_released_names``)."""
    if os.getpid() == creator:  # a forked child must not touch its parent's segments
        _released_names.put(name)


def _pool_released(name: str) -> None:
    """The root array of segment ``name`` is gone: pool the segment."""
    with _lock:
        seg = _live.pop(name, None)
        if seg is None:
            return
        if name in _quarantined:
            _quarantined.discard(name)
            if not seg.lent:
                _unlink(name)
            return  # dropping the mmap unmaps it here
        _free[name] = (seg.mm, time.monotonic(), seg.lent)
    if not _exiting:
        _trim_pool()


def quarantine(names) -> None:
    """The daemon may still write into these segments (a request timed out)."""
    with _lock:
        for name in names:
            if name in _live:
                _quarantined.add(name)
            elif name in _free:  # pooled meanwhile: drop it now
                _, _, lent = _free.pop(name)
                if not lent:
                    _unlink(name)


def _drain_released() -> None:
    """Pool every segment released so far (called before looking at the pools)."""
    while True:
        try:
            name = _released_names.get_nowait()
        except queue.Empty:
            return
        _pool_released(name)


def _start_release_worker() -> None:
    if _release_worker and _release_worker[0] == os.getpid():
        return
    _release_worker[:] = [os.getpid()]

    def work():
        while True:
            _pool_released(_released_names.get())

    threading.Thread(target=work, name="autozyme-release", daemon=True).start()


def _pooled_bytes() -> int:
    return sum(len(m) for m, _, _ in _free.values())


def _fits(want: int, size: int) -> bool:
    return want <= size <= 2 * max(want, 4096)


def _pop_free(want: int) -> tuple[str, mmap.mmap, bool] | None:
    """The smallest pooled segment of at least ``want`` bytes and at most twice that."""
    with _lock:
        for name in [n for n, (_, _, lent) in _free.items() if lent and not _still_linked(n)]:
            del _free[name]  # its daemon exited; dropping the mmap unmaps it
        fits = [(len(m), name) for name, (m, _, _) in _free.items() if _fits(want, len(m))]
        if not fits:
            return None
        _, name = min(fits)
        mm, _, lent = _free.pop(name)
        return name, mm, lent


def _lease(want: int, create: bool) -> str | None:
    """Lease a segment from the daemon's pool into ours; its name, if one came."""
    if _lender is None:
        return None
    got = _lender[0](want, create)
    if got is None:
        return None
    name, size = got
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0o600)
        mm = _map_new(fd, size) if create else _map(fd, size)
    except OSError:
        _lender[1]([name])
        return None
    with _lock:
        _free[name] = (mm, time.monotonic(), True)
    return name


def reserve(nbytes: int) -> bool:
    """Whether a segment of about ``nbytes`` is at hand: in our pool, being
    prepared, or lent now from the daemon's pool (never newly allocated here)."""
    want = max(nbytes, 1)
    _drain_released()
    with _lock:
        if any(
            _fits(want, len(m)) and (not lent or _still_linked(n)) for n, (m, _, lent) in _free.items()
        ) or any(_fits(want, size) for size in _spares_pending):
            return True
    return _lease(want, create=False) is not None


def _wait_for_spare(want: int) -> bool:
    """Wait for a fitting spare that is being allocated right now (cheaper than
    allocating a second one beside it)."""
    with _lock:
        pending = [t for size, t in _spares_pending.items() if _fits(want, size)]
    for t in pending:
        t.join()
    return bool(pending)


def empty(shape, dtype) -> np.ndarray:
    """A new array backed by a (preferably pooled) segment; contents undefined."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    want = max(nbytes, 1)
    _drain_released()
    found = _pop_free(want)
    if found is None and _wait_for_spare(want):
        found = _pop_free(want)
    # Trim only after taking ours: a segment just leased for this call may alone
    # exceed the pool's limit (a 4.3 GB scale result), and trimming first gave it
    # back and allocated a second one.
    _trim_pool()
    if found is None:
        name = _new_name()
        found = name, _create(name, want), False
    root = _root(*found)
    return root[:nbytes].view(dtype).reshape(shape)


def ensure_spare(nbytes: int, on_ready=None) -> None:
    """Make sure a pooled segment of ``nbytes`` will be there for the next call
    (re-running a call on the same object needs a fresh output while the input is
    still in use). Allocated in a background thread, off the caller's path;
    ``on_ready(name)`` then runs there too (the daemon maps it ahead of use)."""
    want = max(nbytes, 1)
    with _lock:
        if any(_fits(want, s) for s in _spares_pending) or any(
            _fits(want, len(m)) for m, _, _ in _free.values()
        ):
            return
        if _pooled_bytes() + want > pool_limit():
            return

        def allocate():
            try:
                try:  # this thread only: the spare is prepared while the next call runs
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
                except OSError:
                    pass
                # The daemon's pool first: it creates the segment (we allocate
                # its pages), then maps it ahead of use.
                leased = _lease(want, create=True)
                if leased is not None:
                    if on_ready is not None:
                        on_ready(leased)
                    return
                name = _new_name()
                mm = _create(name, want)
                if on_ready is not None:
                    on_ready(name)
                with _lock:
                    _free[name] = (mm, time.monotonic(), False)
            except Exception:  # noqa: BLE001 - a spare is an optimisation only
                pass
            finally:
                with _lock:
                    _spares_pending.pop(want, None)

        t = threading.Thread(target=allocate, name="autozyme-spare", daemon=True)
        _spares_pending[want] = t
    t.start()


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
            if seg.addr <= addr and end <= seg.addr + seg.size and seg.root() is not None:
                if seg.lent and not _still_linked(seg.name):
                    # Lent by a daemon that has since exited and unlinked it: the
                    # memory is still ours, but no daemon can open it by name.
                    return None
                location = Msg("Segment", dict(name=seg.name, offset=addr - seg.addr))
                return dict(location=location, len=arr.size, dtype=tag)
    return None


def _still_linked(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def peer_ref(arr: np.ndarray) -> dict | None:
    """The wire ArrayRef of a C-contiguous array in this process's own memory, for
    the daemon to copy in or out (the caller keeps ``arr`` alive meanwhile)."""
    tag = dtype_tag(arr.dtype)
    if tag is None or not arr.flags.c_contiguous:
        return None
    location = Msg("Peer", dict(address=arr.__array_interface__["data"][0]))
    return dict(location=location, len=arr.size, dtype=tag)


# Set when the kernel forbids the daemon to read this process's memory (Yama
# ptrace_scope): requests then place their inputs in shared memory. (scale's
# in-memory and dask paths share it; the other calls keep a flag of their own.)
_peer_reads_refused = False


def peer_reads_refused() -> bool:
    return _peer_reads_refused


def refuse_peer_reads() -> None:
    global _peer_reads_refused
    _peer_reads_refused = True


def leased_empty(shape, dtype) -> np.ndarray:
    """A new segment-backed array for a result: a pooled segment when one is at
    hand (ours, or lent by the daemon's pool), else one the daemon creates and
    lends, so that it returns to the daemon's pool when this process is done
    with it (also at exit) and the next process's first call finds it ready."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if not reserve(nbytes):
        _lease(max(nbytes, 1), create=True)
    return empty(shape, dtype)


def peer_ready(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself when the daemon can read it in place (C-contiguous, each item
    at an address aligned to its size), else an aligned contiguous copy. Arrays a
    process did not allocate itself (unpickled from a Dask transfer, read from a
    buffer) may start at any byte."""
    arr = np.ascontiguousarray(arr)
    if arr.__array_interface__["data"][0] % max(1, arr.dtype.alignment):
        arr = arr.copy()
    return arr


def private_empty(shape, dtype) -> np.ndarray:
    """A new array in this process's own memory, with its pages populated in one
    go (several times cheaper here than taking a fault per 4 KiB page on first
    write), for a result the daemon writes into directly."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < (1 << 20):
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.ndarray(shape, dtype=dtype, buffer=mmap.mmap(-1, nbytes, flags=flags))


def is_placed(arr) -> bool:
    return isinstance(arr, np.ndarray) and ref(arr) is not None


def placed(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself if it already lies in a segment, else a segment-backed copy."""
    return arr if ref(arr) is not None else copy_of(np.ascontiguousarray(arr))


def _trim_pool(limit: int | None = None, max_age: float = POOL_MAX_AGE_S) -> None:
    """Let go of pooled segments beyond ``limit`` bytes (oldest first) or older
    than ``max_age``: ours are unlinked, the daemon's given back to it. Dropping
    the mmap unmaps them here."""
    limit = pool_limit() if limit is None else limit
    if limit < 0:
        _drain_released()
    now = time.monotonic()
    unlink, give_back = [], []
    with _lock:
        total = _pooled_bytes()
        for name, (mm, released, lent) in sorted(_free.items(), key=lambda kv: kv[1][1]):
            if total > limit or now - released > max_age:
                (give_back if lent else unlink).append(name)
                total -= len(mm)
                del _free[name]
    for name in unlink:
        _unlink(name)
    if give_back and _lender is not None:
        _lender[1](give_back)


def clear_pool() -> None:
    """Unlink every pooled segment (after any spare still being allocated)."""
    with _lock:
        pending = list(_spares_pending.values())
    for t in pending:
        t.join()
    _trim_pool(limit=-1)


@atexit.register
def _at_exit() -> None:
    """Unlink our segments; give the daemon's back, including ones still under
    live arrays (this process is ending), for the next process to lease."""
    global _exiting
    _exiting = True
    clear_pool()
    with _lock:
        lent = [name for name, seg in _live.items() if seg.lent]
    if lent and _lender is not None:
        _lender[1](lent)


def stats() -> dict:
    _drain_released()
    with _lock:
        return dict(
            segments=len(_live),
            bytes=sum(s.size for s in _live.values()),
            pooled_segments=len(_free),
            pooled_bytes=_pooled_bytes(),
            lent_by_daemon=sum(s.lent for s in _live.values()) + sum(l for _, _, l in _free.values()),
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
        _unlink(name)
        removed += 1
    return removed
