"""Where the daemon lives and how to start it (the shim's half of the lifecycle).

The per-user runtime dir holds ``daemon.sock``, ``daemon.pid`` (flock-held by the
running daemon) and ``daemon.log``. The daemon resolves the same dir by the same
rule, and the shim always passes it explicitly with ``--runtime-dir``.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 15.0

_children: list[subprocess.Popen] = []
_daemon_pids: list[int] = []


class DaemonUnavailable(RuntimeError):
    """The daemon cannot be reached or started; the caller falls back."""


def runtime_dir() -> Path:
    explicit = os.environ.get("AUTOZYME_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "autozyme"
    return Path(tempfile.gettempdir()) / f"autozyme-{os.geteuid()}"


def socket_path() -> Path:
    return runtime_dir() / "daemon.sock"


def ensure_runtime_dir() -> Path:
    """Create the runtime dir 0700 and refuse one that another user could touch."""
    d = runtime_dir()
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonUnavailable(f"runtime dir {d} is not a directory")
    if st.st_uid != os.geteuid():
        raise DaemonUnavailable(f"runtime dir {d} belongs to uid {st.st_uid}")
    if st.st_mode & 0o077:
        raise DaemonUnavailable(f"runtime dir {d} is accessible to others (mode {oct(st.st_mode & 0o777)})")
    return d


def daemon_binary() -> str | None:
    """The `autozymed` installed with this package (same bin dir as the interpreter
    for a venv or conda env), else the first on PATH; `AUTOZYMED` overrides."""
    explicit = os.environ.get("AUTOZYMED")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "autozymed"
    if beside.exists():
        return str(beside)
    return shutil.which("autozymed")


@functools.lru_cache(maxsize=4)
def _build_id_of(binary: str, mtime_ns: int) -> str:
    out = subprocess.run([binary, "--build-id"], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise DaemonUnavailable(f"{binary} --build-id failed: {out.stderr.strip()}")
    return out.stdout.strip()


def expected_build_id() -> str:
    """Build id of the daemon binary this shim would start (cached per binary)."""
    binary = daemon_binary()
    if binary is None:
        raise DaemonUnavailable("autozymed binary not found (is the package installed?)")
    return _build_id_of(binary, os.stat(binary).st_mtime_ns)


def daemon_threads() -> int | None:
    """Thread count for a daemon this shim starts: scanpy's n_jobs when set, else
    AUTOZYME_THREADS, else None (the daemon's default: all cores)."""
    sc = sys.modules.get("scanpy")
    n_jobs = getattr(getattr(sc, "settings", None), "n_jobs", None) if sc else None
    # scanpy's default n_jobs is 1, which users leave alone; only a value they
    # chose (-1 = all cores, or more than 1) is taken as a request.
    if isinstance(n_jobs, int) and n_jobs == -1:
        return os.cpu_count() or 1
    if isinstance(n_jobs, int) and n_jobs > 1:
        return n_jobs
    env = os.environ.get("AUTOZYME_THREADS")
    return int(env) if env and env.isdigit() and int(env) > 0 else None


def start_daemon(timeout: float = START_TIMEOUT_S) -> int:
    """Start `autozymed` detached and wait for its startup report. Returns its pid.

    The daemon prints `READY <pid> <socket>` once it listens, or `RUNNING <pid>`
    when another daemon already holds the lock (a starter that lost the race)."""
    binary = daemon_binary()
    if binary is None:
        raise DaemonUnavailable("autozymed binary not found (is the package installed?)")
    d = ensure_runtime_dir()
    args = [binary, "--runtime-dir", str(d)]
    threads = daemon_threads()
    if threads:
        args += ["--threads", str(threads)]
    with open(d / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _children.append(proc)
    _reap_children()
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable(f"autozymed gave no startup report within {timeout:.0f}s")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
    finally:
        proc.stdout.close()
    words = line.decode(errors="replace").split()
    if len(words) >= 2 and words[0] == "RUNNING" and words[1].isdigit():
        proc.wait(timeout=timeout)  # the loser of a start race exits at once
        if proc in _children:  # _reap_children may have collected it already
            _children.remove(proc)
        return int(words[1])
    if len(words) >= 2 and words[0] == "READY" and words[1].isdigit():
        # The daemon outlives this call (and maybe this process): reap it by pid
        # if it exits first, and tell Popen not to warn about a running child.
        if proc in _children:
            _children.remove(proc)
        _daemon_pids.append(proc.pid)
        proc.returncode = 0
        return int(words[1])
    code = proc.poll()
    raise DaemonUnavailable(
        f"autozymed did not start (exit {code}, report {line!r}); see {d / 'daemon.log'}"
    )


def _reap_children() -> None:
    """Collect exited daemons this process started, so they leave no zombies."""
    for p in list(_children):
        if p.poll() is not None:
            _children.remove(p)
    for pid in list(_daemon_pids):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _daemon_pids.remove(pid)


def daemon_pid_from_file() -> int | None:
    try:
        text = (runtime_dir() / "daemon.pid").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    _reap_children()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_daemon(timeout: float = 12.0) -> bool:
    """SIGTERM the daemon named by the pid file (used when it cannot be asked over
    the socket, e.g. an incompatible protocol) and wait for it to go."""
    pid = daemon_pid_from_file()
    if pid is None or not pid_alive(pid) or not _is_autozymed(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def _is_autozymed(pid: int) -> bool:
    """Guard against a stale pid file naming a recycled pid."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "autozymed"
    except OSError:
        return sys.platform != "linux"
