"""The warm worker process: ``python -m autozyme.warm.worker --key KEY [--detach]``.

One per key (see :mod:`.wire`): it holds ``warm-KEY.lock`` (flock) for its life,
so a second one started in a race exits at once. It listens on ``warm-KEY.sock``
in the private runtime dir (0700, owner-checked) and serves only peers of its own
uid (SO_PEERCRED). It runs at low priority (nice), compiles the default
pipeline's kernels once (``WARM_STAGES``), then serves requests one at a time:
each runs upstream's own scanpy function on a stand-in AnnData with the caller's
numba thread count and ``sc.settings.n_jobs``. A request that arrives while a
warm-up stage runs waits for it: the stage is the compilation the caller would
otherwise pay itself, already under way.

It exits after ``AUTOZYME_IDLE_TIMEOUT`` seconds without a request (default
1800, 0 = never), or when its socket file or runtime dir is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import struct
import sys
import threading
import time
import traceback
import warnings

from . import umap_layout, wire

DEFAULT_IDLE_TIMEOUT_S = 1800
NICE = 19  # CFS weight 15 against 1024: the user's own calls keep ~98% of a core
# (representation dtype, cells, with umap): scanpy searches euclidean neighbours
# exactly (sklearn) below 8192 cells and with pynndescent from there (other
# metrics from 4096); both feed umap's fuzzy simplicial set. float32 is what
# sc.pp.pca returns for float32 data, the common case, so it comes first.
# umap has its own stage (neighbors on 1,000 cells, compiled by then, then umap),
# so a waiting neighbors call is let in before it.
WARM_STAGES = (("float32", 1000, False), ("float32", 8500, False), ("float32", 1000, True),
               ("float64", 1000, False), ("float64", 8500, False))


def _stages():
    """WARM_STAGES, limited to the dtypes in ``AUTOZYME_WARM_DTYPES`` (comma-separated;
    default both): a float32-only pipeline need not compile float64 kernels up front."""
    wanted = os.environ.get("AUTOZYME_WARM_DTYPES", "float32,float64").replace(" ", "").split(",")
    return [stage for stage in WARM_STAGES if stage[0] in wanted]

_compute = threading.Lock()
# Requests waiting for _compute: the warm-up lets them in between its stages
# (a Lock is not fair; without this the warm-up could take it again at once).
_waiting = [0]
_waiting_lock = threading.Lock()
_state = {"state": "starting", "stage": None, "served": 0, "failed": 0, "warm_seconds": None,
          "started": time.time(), "last_request": time.monotonic()}


def _standin(spec: dict):
    """An AnnData carrying exactly what the caller sent (shape, X, obsm, obsp, uns)."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(index=pd.RangeIndex(spec["n_obs"]).astype(str))
    var = pd.DataFrame(index=pd.RangeIndex(spec["n_vars"]).astype(str))
    a = ad.AnnData(X=spec.get("X"), obs=obs, var=var)
    for k, v in spec.get("obsm", {}).items():
        a.obsm[k] = v
    for k, v in spec.get("obsp", {}).items():
        a.obsp[k] = v
    for k, v in spec.get("uns", {}).items():
        a.uns[k] = v
    return a


def _function(name: str):
    import scanpy as sc

    return {"neighbors": sc.pp.neighbors, "umap": sc.tl.umap}[name]


def _run(req: dict) -> dict:
    """Run upstream's function on the stand-in; return what it wrote."""
    import numba
    import scanpy as sc

    a = _standin(req["adata"])
    before = {slot: dict(getattr(a, slot)) for slot in ("obsm", "obsp", "uns")}
    # Input arrays upstream might change in place (1.11.5's umap zeroes graph values).
    saved = {slot: {k: (v, _values(v).copy()) for k, v in before[slot].items()}
             for slot in ("obsm", "obsp")}
    threads = req["numba_threads"]
    if threads > numba.config.NUMBA_NUM_THREADS:
        return {"ok": False, "kind": "failure",
                "error": f"the caller's {threads} numba threads exceed the worker's "
                         f"{numba.config.NUMBA_NUM_THREADS}"}
    numba.set_num_threads(threads)  # per thread: this handler's
    sc.settings.n_jobs = req["n_jobs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with umap_layout.served() if req["func"] == "umap" else contextlib.nullcontext():
                _function(req["func"])(a, *req["args"], **req["kwargs"])
        except Exception as e:  # noqa: BLE001 - upstream's own error: the caller reruns upstream
            return {"ok": False, "kind": "upstream", "error": f"{type(e).__name__}: {e}"}
    out = {"ok": True, "warnings": [(w.category, str(w.message)) for w in caught]}
    for slot, old in before.items():
        now = getattr(a, slot)
        out[slot] = {k: now[k] for k in now.keys() if k not in old or now[k] is not old[k]}
        out[f"{slot}_removed"] = [k for k in old if k not in now]
        out[f"{slot}_changed"] = {}
        for k, (obj, values) in saved.get(slot, {}).items():
            if k in now and now[k] is obj and not _same(_values(obj), values):
                if _values(obj).shape == values.shape:
                    out[f"{slot}_changed"][k] = obj  # changed in place: the caller does the same
                else:
                    out[slot][k] = obj
    return out


def _values(x):
    """The values of an ndarray or a scipy sparse matrix (its data array)."""
    return x if hasattr(x, "__array_interface__") else x.data


def _same(a, b) -> bool:
    import numpy as np

    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def _warm_stage(dtype: str, n: int, with_umap: bool) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 50)) * 4
    rep = (centers[rng.integers(0, 10, n)] + rng.normal(size=(n, 50))).astype(dtype)
    a = _standin({"n_obs": n, "n_vars": 2000, "obsm": {"X_pca": rep}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _function("neighbors")(a, use_rep="X_pca")
        if with_umap:
            _function("umap")(a, maxiter=5)
            umap_layout.probe(umap_layout.upstream())


def _warm() -> None:
    start = time.perf_counter()
    try:
        for dtype, n, with_umap in _stages():
            while _waiting[0]:
                time.sleep(0.05)
            with _compute:
                _state["stage"] = f"neighbors{' and umap' if with_umap else ''} {dtype} {n} cells"
                _warm_stage(dtype, n, with_umap)
        _state["state"] = "warm"
    except Exception:  # noqa: BLE001 - a warm-up failure only means the first request compiles
        traceback.print_exc()
        _state["state"] = "warm-up failed"
    _state["stage"] = None
    _state["warm_seconds"] = round(time.perf_counter() - start, 2)
    _state["last_request"] = time.monotonic()


def _status(key: str) -> dict:
    return {"pid": os.getpid(), "key": key, "idle_timeout_s": _idle_timeout(),
            "nice": os.nice(0), "umap_layout": dict(umap_layout.counts),
            **{k: v for k, v in _state.items() if k != "last_request"}}


def _handle(conn: socket.socket, key: str) -> None:
    with conn:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.geteuid():
                return
            req = wire.recv(conn)
            if req.get("op") == "status":
                wire.send(conn, _status(key))
                return
            if req.get("op") == "stop":
                try:
                    wire.socket_path(key).unlink()
                except OSError:
                    pass
                wire.send(conn, {"ok": True})
                os._exit(0)
            if req.get("key") != key:
                wire.send(conn, {"ok": False, "kind": "failure",
                                 "error": "the worker runs other package versions"})
                return
            with _waiting_lock:
                _waiting[0] += 1
            try:
                _compute.acquire()
            finally:
                with _waiting_lock:
                    _waiting[0] -= 1
            try:
                _state["last_request"] = time.monotonic()
                try:
                    reply = _run(req)
                except Exception as e:  # noqa: BLE001 - the caller falls back
                    reply = {"ok": False, "kind": "failure",
                             "error": f"worker error {type(e).__name__}: {e}"}
                _state["served" if reply["ok"] else "failed"] += 1
                _state["last_request"] = time.monotonic()
            finally:
                _compute.release()
            wire.send(conn, reply)
        except (OSError, wire.WireError, EOFError):
            pass  # the caller went away; it falls back on its side


def _idle_timeout() -> float:
    text = os.environ.get("AUTOZYME_IDLE_TIMEOUT", "")
    try:
        return float(text) if text else DEFAULT_IDLE_TIMEOUT_S
    except ValueError:
        return DEFAULT_IDLE_TIMEOUT_S


def serve(key: str) -> int:
    from .. import runtime

    if not runtime.runtime_dir().is_dir():
        return 0  # gone since the starter made it (a test session's temporary dir)
    runtime.ensure_runtime_dir()
    lock = open(wire.lock_path(key), "a")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another worker for this key is up
    path = wire.socket_path(key)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(str(path))
    finally:
        os.umask(old)
    srv.listen(16)
    srv.settimeout(1.0)
    inode = os.stat(path).st_ino
    _state["state"] = "warming"
    threading.Thread(target=_warm, name="warm-up", daemon=True).start()
    idle = _idle_timeout()
    while True:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            try:
                if os.stat(path).st_ino != inode:
                    return 0  # replaced or removed: this worker is no longer reachable
            except OSError:
                return 0
            busy = _compute.locked()
            if idle > 0 and not busy and time.monotonic() - _state["last_request"] > idle:
                try:
                    path.unlink()
                except OSError:
                    pass
                return 0
            continue
        conn.settimeout(None)
        threading.Thread(target=_handle, args=(conn, key), daemon=True).start()


def _lower_autogroup() -> None:
    """The worker is a session of its own (started with setsid), and with the
    kernel's autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) sessions
    share the CPU equally whatever their threads' nice values: so the nice value
    of the session's autogroup is what keeps the warm-up from slowing the user's
    calls. Lowering one's own autogroup's priority needs no privilege."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(NICE))
    except OSError:
        pass  # no autogroups (or not Linux): the process's nice value holds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autozyme.warm.worker")
    p.add_argument("--key", required=True)
    p.add_argument("--detach", action="store_true",
                   help="fork once and let the parent exit, so the starter has no child to reap")
    args = p.parse_args(argv)
    if args.detach and os.fork() != 0:
        os._exit(0)
    try:
        os.nice(NICE)
    except OSError:
        pass
    _lower_autogroup()
    if args.key != wire.key():
        print(f"key {args.key} is not this interpreter's {wire.key()}", file=sys.stderr)
        return 2
    return serve(args.key)


if __name__ == "__main__":
    sys.exit(main())
