"""The caller's side of the warm worker: start it in the background, ask it to run
a call, report on it. Every problem is a :class:`WorkerUnavailable`, which the
patches turn into a fallback to upstream in this process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from .. import runtime
from . import wire

STATUS_TIMEOUT_S = 2.0
_start_lock = threading.Lock()
STARTING_S = 20.0  # a worker this process spawned this recently may not listen yet
_spawned_at = [float("-inf")]
_starting: list[threading.Thread] = []  # start_in_background's threads, joined by stop()


class WorkerUnavailable(RuntimeError):
    """The warm worker is off, not reachable, or failed; the call falls back."""


def enabled() -> bool:
    return os.environ.get("AUTOZYME_WARM", "1") not in ("0", "")


def _connect(timeout: float | None) -> socket.socket:
    try:
        runtime.ensure_runtime_dir()  # 0700 and ours, or no talking
    except runtime.DaemonUnavailable as e:
        raise WorkerUnavailable(str(e)) from None
    path = wire.socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise WorkerUnavailable(f"warm worker not reachable ({type(e).__name__})") from None
    return sock


_seen = [False]  # this process has had an answer from a worker


def status() -> dict | None:
    """The worker's own report, or None when none runs for this interpreter."""
    try:
        with _connect(STATUS_TIMEOUT_S) as sock:
            wire.send(sock, {"op": "status"})
            st = wire.recv(sock)
    except (WorkerUnavailable, OSError, wire.WireError, EOFError):
        return None
    _seen[0] = True
    return st


def seen() -> bool:
    """Whether a worker has answered this process (so one that no longer answers
    has gone away, rather than never having been started)."""
    return _seen[0]


def start() -> bool:
    """Start the worker for this interpreter's key unless one answers. Returns at
    once (the worker warms up on its own); True when one was started."""
    if not enabled():
        return False
    with _start_lock:
        if status() is not None:
            return False
        d = runtime.ensure_runtime_dir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(wire.log_path(), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "autozyme.warm.worker", "--key", wire.key(), "--detach"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=d, env=env,
                start_new_session=True, close_fds=True,
            )
        proc.wait()  # the first process forks the worker and exits at once
        _spawned_at[0] = time.monotonic()
        return True


def starting() -> bool:
    """A worker for this key is starting (not listening yet): one holds the key's
    lock, or this process spawned one moments ago, or is spawning one now."""
    import fcntl

    if (_start_lock.locked() or any(t.is_alive() for t in _starting)
            or time.monotonic() - _spawned_at[0] < STARTING_S):
        return True
    try:
        with open(wire.lock_path(), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True  # held: a worker runs (and will listen shortly)
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        pass
    return False


def start_in_background() -> None:
    """``start`` on a thread: the caller never waits for it."""
    def go():
        try:
            start()
        except Exception:  # noqa: BLE001 - a worker that does not start means fallback later
            pass

    t = threading.Thread(target=go, name="autozyme-warm-start", daemon=True)
    _starting.append(t)
    t.start()


def wait_warm(timeout: float = 600.0) -> dict | None:
    """Start the worker if needed and wait until it has compiled its warm-up
    stages. Its last status, or None if it did not answer in time."""
    start()
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = status()
        if st is not None and st["state"] in ("warm", "warm-up failed"):
            return st
        time.sleep(0.2)
    return st


def status_when_listening(timeout: float = STARTING_S) -> dict | None:
    """The status of a worker that is starting, once it listens (None if it does
    not within ``timeout`` or stops starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status()
        if st is not None or not starting():
            return st
        time.sleep(0.1)
    return None


def run(func: str, spec: dict, args: tuple, kwargs: dict) -> dict:
    """Run upstream's ``func`` in the worker on the stand-in ``spec``; the reply
    holds what it wrote. Waits while the worker finishes a warm-up stage."""
    import numba

    import scanpy as sc

    req = {"op": "run", "key": wire.key(), "func": func, "adata": spec, "args": args,
           "kwargs": kwargs, "numba_threads": numba.get_num_threads(), "n_jobs": sc.settings.n_jobs}
    try:
        with _connect(None) as sock:
            wire.send(sock, req)
            return wire.recv(sock)
    except (OSError, wire.WireError, EOFError) as e:
        raise WorkerUnavailable(f"warm worker failed mid-call ({type(e).__name__}: {e})") from None


def stop() -> bool:
    """Stop this interpreter's worker (after any start under way here)."""
    while _starting:
        _starting.pop().join(timeout=30)
    try:
        with _connect(STATUS_TIMEOUT_S) as sock:
            wire.send(sock, {"op": "stop"})
            wire.recv(sock)
        return True
    except (WorkerUnavailable, OSError, wire.WireError, EOFError):
        return False
