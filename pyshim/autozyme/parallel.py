"""A warmed thread pool for numpy work done in the shim.

Some results must come from numpy's own routines to be bit-identical (its SIMD
``log1p``, its pairwise row sums). numpy releases the GIL inside those loops, so
applying the same ufunc to disjoint blocks from several threads gives the same
bits as one call, in a fraction of the time.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from . import runtime

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_size = 0

# Blocks start at multiples of this many elements, so every block but the last
# has the same alignment and tail handling as the corresponding part of one
# whole-array call.
ALIGN = 64
MIN_BLOCK_BYTES = 1 << 20


def thread_count() -> int:
    return runtime.daemon_threads() or os.cpu_count() or 1


def _get_executor(n: int) -> ThreadPoolExecutor:
    global _executor, _size
    with _lock:
        if _executor is None or _size != n:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="autozyme")
            _size = n
        return _executor


def blocks(n: int, itemsize_per_unit: int, align: int = 1) -> list[tuple[int, int]]:
    """Split range(n) into contiguous blocks, one or a few per thread."""
    if n <= 0:
        return [(0, 0)]
    threads = thread_count()
    max_blocks = max(1, (n * itemsize_per_unit) // MIN_BLOCK_BYTES)
    k = max(1, min(threads, max_blocks))
    step = -(-n // k)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def run_blocks(fn, bounds: list[tuple[int, int]]) -> None:
    """Call fn(a, b) for each block, in parallel; re-raise the first error."""
    if len(bounds) == 1:
        fn(*bounds[0])
        return
    ex = _get_executor(thread_count())
    futures = [ex.submit(fn, a, b) for a, b in bounds]
    for f in futures:
        f.result()


def submit(fn, *args):
    """Run ``fn(*args)`` on the pool; returns its future."""
    return _get_executor(thread_count()).submit(fn, *args)


def warm() -> None:
    run_blocks(lambda a, b: None, [(0, 0)] * thread_count())
