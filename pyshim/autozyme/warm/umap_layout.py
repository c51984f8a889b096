"""umap's layout optimisation in the daemon, inside the warm worker's sc.tl.umap.

sc.tl.umap spends almost all of its time in umap-learn's
``optimize_layout_euclidean``: single-threaded numba (upstream never runs it in
parallel when a seed is set, and scanpy always sets one). While the worker runs
upstream's sc.tl.umap, ``served()`` puts ``layout`` in that function's place;
``layout`` has the daemon run the same epochs on two threads, bit for bit
(``Request::UmapLayout``; how, in daemon/src/kernels/umap_layout.rs), and runs
upstream's own function for anything else:

- densMAP, ``parallel=True``, ``verbose``, a list of epochs, a head embedding that
  is not also the tail embedding (umap's ``transform``), ``move_other=False``;
- an embedding that is not a C-contiguous float32 array of 1 to 3 columns, edges
  that are not int32/int64 or not sorted by head, ``n_vertices`` other than the
  embedding's rows;
- no daemon, a daemon error, or a machine where the daemon's arithmetic was not
  found identical to numba's (``probe``, once per process, on a small graph).

The arithmetic is read from numba's compiled code, so ``probe`` compares the
daemon with upstream's own function before ``layout`` serves anything.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import Counter

import numpy as np

from .. import shm
from ..client import DaemonError, get_client
from ..codec import msg
from ..runtime import DaemonUnavailable

MAX_DIM = 3  # the daemon's arithmetic is numba's scalar code below 4 columns

# Layouts this process served ("served"), and why others ran upstream's function.
counts: Counter = Counter()
_probe_lock = threading.Lock()
_probe_result: list = []  # [True or False] once the daemon answered


class NotServed(Exception):
    """The layout runs upstream's function; the message says why."""


def upstream():
    import umap.umap_ as umap_

    return umap_.optimize_layout_euclidean


@contextlib.contextmanager
def served():
    """Within the block, umap's ``optimize_layout_euclidean`` is ``layout``."""
    import umap.umap_ as umap_

    original = umap_.optimize_layout_euclidean
    umap_.optimize_layout_euclidean = _serving(original)
    try:
        yield
    finally:
        umap_.optimize_layout_euclidean = original


def _serving(original):
    def optimize_layout_euclidean(*args, **kwargs):
        try:
            result = layout(original, *args, **kwargs)
        except NotServed as e:
            counts[str(e)] += 1
            return original(*args, **kwargs)
        counts["served"] += 1
        return result

    return optimize_layout_euclidean


def layout(original, *args, **kwargs):
    """``original(*args, **kwargs)`` computed by the daemon; raises NotServed
    (before changing anything) when it cannot be."""
    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    p = bound.arguments
    emb = p["head_embedding"]
    for name, wrong in (("densmap", p["densmap"]), ("parallel", p["parallel"]),
                        ("verbose", p["verbose"]), ("move_other=False", not p["move_other"]),
                        ("a tail embedding of its own", p["tail_embedding"] is not emb),
                        ("a list of epochs", not isinstance(p["n_epochs"], (int, np.integer)))):
        if wrong:
            raise NotServed(name)
    if not (isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.ndim == 2
            and emb.flags.c_contiguous and emb.flags.writeable and 1 <= emb.shape[1] <= MAX_DIM):
        raise NotServed("the embedding is not a writable C-contiguous float32 array of 1-3 columns")
    if int(p["n_vertices"]) != emb.shape[0]:
        raise NotServed("n_vertices differs from the embedding's rows")
    head, tail = (np.ascontiguousarray(p[k]) for k in ("head", "tail"))
    if head.dtype != tail.dtype or head.dtype not in (np.int32, np.int64) or head.ndim != 1:
        raise NotServed("edges that are not int32 or int64 arrays")
    epochs = np.ascontiguousarray(p["epochs_per_sample"], dtype=np.float64)
    rng_state = np.asarray(p["rng_state"])
    if rng_state.shape != (3,) or rng_state.dtype != np.int64:
        raise NotServed("an rng_state that is not three int64 words")
    if not probe(original):
        raise NotServed("the daemon's layout differs from numba's on this machine")
    _daemon_layout(emb, head, tail, epochs, float(p["a"]), float(p["b"]), float(p["gamma"]),
                   float(p["initial_alpha"]), float(p["negative_sample_rate"]),
                   int(p["n_epochs"]), rng_state)
    return emb


def _daemon_layout(emb, head, tail, epochs, a, b, gamma, alpha, rate, n_epochs, rng_state):
    """The daemon's layout, written into ``emb`` only once it succeeded: a reply
    lost after the daemon wrote its result must leave ``emb`` as upstream's
    function (the fallback) needs it."""
    out = np.array(emb, order="C")
    request = msg("UmapLayout", embedding=shm.peer_ref(out), dim=out.shape[1],
                  head=shm.peer_ref(head), tail=shm.peer_ref(tail),
                  epochs_per_sample=shm.peer_ref(epochs), a=a, b=b, gamma=gamma,
                  initial_alpha=alpha, negative_sample_rate=rate, n_epochs=n_epochs,
                  rng_state=rng_state.view(np.uint64))
    try:
        # Not resent on a broken connection: the daemon may already have moved
        # `out`, and a second run would start from the moved coordinates.
        get_client().call(request, retry=False)
    except (DaemonError, DaemonUnavailable) as e:
        raise NotServed(f"daemon: {e}") from e
    emb[...] = out


def probe(original) -> bool:
    """Whether the daemon computes what ``original`` (upstream's numba function)
    computes, on a small graph with self loops, repeated points and every code
    path; checked once per process."""
    with _probe_lock:
        if not _probe_result:
            same = _same_as_upstream(original)
            if same is None:
                return False  # no daemon now: asked again next time
            _probe_result.append(same)
        return _probe_result[0]


def _probe_graph():
    rng = np.random.default_rng(7)
    n, k = 300, 8
    head = np.repeat(np.arange(n, dtype=np.int32), k)
    tail = rng.integers(0, n, n * k).astype(np.int32)
    tail[::50] = head[::50]  # self loops
    weights = rng.uniform(0.05, 1.0, n * k)
    epochs = 40
    keep = weights >= weights.max() / epochs
    head, tail, weights = head[keep], tail[keep], weights[keep]
    per_sample = epochs / (epochs * (weights / weights.max()))
    emb = rng.uniform(0, 10, (n, 2)).astype(np.float32)
    emb[5] = emb[6]  # a repeated point: distance 0
    return emb, head, tail, per_sample, epochs


def _same_as_upstream(original) -> bool | None:
    emb, head, tail, per_sample, epochs = _probe_graph()
    rng_state = np.array([-631472624, 247551186, 1380708704], dtype=np.int64)
    args = (head, tail, epochs, emb.shape[0], per_sample, 0.583, 1.334, rng_state)
    kwargs = dict(gamma=1.0, initial_alpha=1.0, negative_sample_rate=5, move_other=True)
    want = emb.copy()
    original(want, want, *args, **kwargs)
    got = emb.copy()
    try:
        _daemon_layout(got, head, tail, per_sample, 0.583, 1.334, 1.0, 1.0, 5.0, epochs, rng_state)
    except NotServed as e:
        unsupported = isinstance(e.__cause__, DaemonError) and e.__cause__.kind == "Unsupported"
        return False if unsupported else None
    return got.tobytes() == want.tobytes()
