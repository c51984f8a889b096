"""The daemon's lifecycle as the shim drives it: auto-start, start races, stop,
stale files, version mismatch, a daemon killed mid-call, and no leaked segments.
Each test uses its own runtime dir and its own daemon."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from _data import assert_identical, counts
from autozyme import client as client_mod
from autozyme import codec, fallback, runtime, shm


@pytest.fixture
def fresh_runtime(monkeypatch):
    """A private runtime dir and a new process-wide client; stops its daemon after."""
    d = tempfile.mkdtemp(prefix="azm-life-")
    monkeypatch.setenv("AUTOZYME_RUNTIME_DIR", d)
    old = client_mod._client
    client_mod._set_client(client_mod.Client())
    yield Path(d)
    client_mod.get_client().shutdown()
    runtime.terminate_daemon()
    client_mod._set_client(old)
    shutil.rmtree(d, ignore_errors=True)


def our_segments() -> list[str]:
    prefix = f"azm_{os.geteuid()}_{os.getpid()}_"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def normalize_both_and_compare(sc, adata):
    """normalize_total by upstream and by autozyme on equal copies: same X."""
    a, b = adata, adata.copy()
    sc.pp.normalize_total.__autozyme_upstream__(a)
    sc.pp.normalize_total(b)
    assert_identical(a.X, b.X)


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_auto_start_permissions_and_status(fresh_runtime):
    c = client_mod.get_client()
    hello = c.connection(autostart=True).hello
    assert hello.build_id == runtime.expected_build_id()
    d = fresh_runtime
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "daemon.sock").st_mode) == 0o600
    assert int((d / "daemon.pid").read_text()) == hello.pid
    st = c.status()
    assert st.pid == hello.pid and st.runtime_dir == str(d)
    print(f"auto-started daemon pid {hello.pid} in {d}")


def test_two_clients_start_one_daemon(fresh_runtime):
    code = (
        "from autozyme.client import get_client; "
        "print(get_client().connection().hello.pid)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    pids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(pids) == 1, pids
    print(f"3 racing starters all reached daemon {pids}")


def test_cli_stop(fresh_runtime):
    pid = client_mod.get_client().connection().hello.pid
    client_mod.get_client().reset()
    out = subprocess.run([sys.executable, "-m", "autozyme.cli", "daemon", "stop"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert wait_until(lambda: not runtime.pid_alive(pid))
    assert not (fresh_runtime / "daemon.sock").exists()


def test_daemon_exits_when_its_runtime_dir_is_removed(fresh_runtime):
    """No client can reach a daemon whose socket is gone: it exits once idle,
    not after its idle timeout (300 s in these tests)."""
    pid = client_mod.get_client().connection().hello.pid
    client_mod.get_client().reset()
    shutil.rmtree(fresh_runtime)
    assert wait_until(lambda: not runtime.pid_alive(pid), timeout=15)


def test_a_connected_client_keeps_the_daemon_until_it_leaves(fresh_runtime):
    c = client_mod.get_client()
    pid = c.connection().hello.pid
    (fresh_runtime / "daemon.sock").unlink()
    time.sleep(2.5)
    assert runtime.pid_alive(pid)
    assert c.call(codec.msg("Ping")).tag == "Pong"
    c.reset()
    assert wait_until(lambda: not runtime.pid_alive(pid), timeout=15)


def test_stale_socket_and_pid_file(fresh_runtime):
    d = fresh_runtime
    # A socket file nobody listens on, and a pid file naming a dead process.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "daemon.sock"))
    s.close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / "daemon.pid").write_text(str(dead.pid))
    hello = client_mod.get_client().connection().hello
    assert hello.pid != dead.pid and runtime.pid_alive(hello.pid)


def test_protocol_mismatch_is_refused(fresh_runtime):
    client_mod.get_client().connection()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(fresh_runtime / "daemon.sock"))
    s.sendall(codec.frame(codec.REQUEST, codec.msg("Hello", protocol_version=999, build_id="x", client_pid=1)))
    n = struct.unpack("<I", s.recv(4))[0]
    reply = codec.decode(codec.RESPONSE, s.recv(n, socket.MSG_WAITALL))
    assert reply.tag == "Error" and reply.kind == "Handshake"
    s.close()


def test_build_mismatch_replaces_the_old_daemon(fresh_runtime, monkeypatch):
    """A daemon from another build is stopped and a new one started; if the new one
    still does not match, the call falls back to upstream (and says why)."""
    import scanpy as sc

    import autozyme

    old_pid = client_mod.get_client().connection().hello.pid
    client_mod.get_client().reset()
    monkeypatch.setattr(runtime, "expected_build_id", lambda: "0.0.0+another-build")
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    autozyme.activate("scanpy", prewarm=False)
    try:
        fallback.reset_counts()
        normalize_both_and_compare(sc, counts(50, 30))
        assert wait_until(lambda: not runtime.pid_alive(old_pid))
        reasons = fallback.counts()["fallbacks"]["normalize_total"]
        assert any("incompatible" in r for r in reasons), reasons
    finally:
        autozyme.deactivate()


@pytest.mark.parametrize("phase", ["before RowSums", "during DivideRows"])
def test_daemon_killed_mid_call(fresh_runtime, monkeypatch, phase):
    """SIGKILL the daemon inside a call: the call returns upstream's result, the
    next call is served by a new daemon, and no segment is left behind."""
    import scanpy as sc

    import autozyme

    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    autozyme.activate("scanpy", prewarm=False)
    try:
        victim = client_mod.get_client().connection().hello.pid
        real_call = client_mod.Connection.call
        fired = []

        def killing_call(self, request, timeout):
            if not fired and request.tag == phase.split()[-1]:
                fired.append(request.tag)
                if phase.startswith("during"):
                    self.sock.sendall(codec.frame(codec.REQUEST, request))
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda: not runtime.pid_alive(victim))
                if phase.startswith("during"):
                    return real_call(self, codec.msg("Ping"), timeout)  # reads the dead socket
            return real_call(self, request, timeout)

        monkeypatch.setattr(client_mod.Connection, "call", killing_call)
        fallback.reset_counts()
        a, b = counts(300, 200, seed=9), counts(300, 200, seed=9)
        sc.pp.normalize_total.__autozyme_upstream__(a, target_sum=1e4)
        sc.pp.normalize_total(b, target_sum=1e4)
        assert fired
        assert_identical(a.X, b.X)
        # The next call restarts the daemon and is served.
        sc.pp.normalize_total.__autozyme_upstream__(a)
        sc.pp.normalize_total(b)
        assert_identical(a.X, b.X)
        served = fallback.counts()["served"].get("normalize_total", 0)
        assert served >= 1, fallback.counts()
        assert client_mod.get_client().connection().hello.pid != victim
        print(f"killed daemon {victim} {phase}: upstream result returned, next call served")
    finally:
        autozyme.deactivate()
    del a, b
    gc.collect()
    shm.clear_pool()
    gc.collect()
    assert our_segments() == [], our_segments()


def test_no_segments_left_after_anndata_is_freed(fresh_runtime):
    import scanpy as sc

    import autozyme

    autozyme.activate("scanpy", prewarm=False)
    try:
        ad = counts(200, 100, seed=10)
        sc.pp.normalize_total(ad)
        sc.pp.normalize_total(ad, exclude_highly_expressed=True)
        assert our_segments()
        del ad
        gc.collect()
        shm.clear_pool()
        gc.collect()
        assert our_segments() == []
    finally:
        autozyme.deactivate()


def test_segment_freed_while_placement_is_busy_does_not_deadlock():
    """A garbage collection can free a segment-backed array inside any allocation,
    including one made while placement holds its lock; the finalizer then runs in
    that same thread and must not wait for the lock (it hung CI once)."""
    code = (
        "import gc, numpy as np; from autozyme import shm\n"
        "a = shm.empty(1000, np.float64); cycle = [a]; cycle.append(cycle); del a, cycle\n"
        "with shm._lock:\n"
        "    for _ in range(3):\n"
        "        gc.collect()\n"
        "# A thread populating the new segment's pages may hold the array a moment longer\n"
        "# (seen on Python 3.13): then it is freed after the lock, within a bound.\n"
        "import time; deadline = time.monotonic() + 5\n"
        "while shm.stats()['segments'] and time.monotonic() < deadline:\n"
        "    time.sleep(0.02); gc.collect()\n"
        "assert shm.stats()['segments'] == 0 and shm.stats()['pooled_segments'] == 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_new_segment_pages_are_populated_in_parallel_and_zero():
    """A new segment (several populate pieces) is fully allocated and reads as
    zeros; freeing it leaves nothing behind."""
    before = set(os.listdir(shm.SHM_DIR))
    n = (3 * shm._POPULATE_PIECE + 4096) // 8
    a = shm.empty(n, np.float64)
    assert not a.any()
    a[:] = 1.5
    assert a.sum() == 1.5 * n
    del a
    # The freed segment is pooled by the release worker, which may still hold it
    # when the pool is first cleared (seen on Python 3.13): clear until it is gone.
    deadline = time.monotonic() + 5
    shm.clear_pool()
    while not set(os.listdir(shm.SHM_DIR)) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
        shm.clear_pool()
    assert set(os.listdir(shm.SHM_DIR)) <= before


def test_full_shared_memory_is_an_error_not_a_sigbus(tmp_path):
    """Populating a segment's pages on a full tmpfs returns an errno (the shim
    turns it into PlacementError and falls back); it never leaves a mapping
    whose first write would kill the process with SIGBUS. Needs a tmpfs of its
    own: skipped without the privilege to mount one."""
    import mmap

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        results = []
        for size in (256 << 10, 4 << 20):
            fd = os.open(tmp_path / f"seg{size}", os.O_CREAT | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            os.close(fd)
            results.append(shm._populate_for_writing(mm))
            mm.close()
    finally:
        subprocess.run(["umount", "-l", str(tmp_path)], capture_output=True)
    assert results[0] == 0
    assert results[1] in (errno.EFAULT, errno.ENOMEM, errno.ENOSPC)


def test_killed_client_segments_are_swept(fresh_runtime):
    """A client killed while holding segments: the daemon's sweeper (and any new
    client's activation) unlinks them."""
    code = (
        "import numpy as np, os, time, sys; from autozyme import shm; "
        "a = shm.copy_of(np.ones(1000)); print(shm.ref(a)['location'].name, flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = p.stdout.readline().strip()
    assert os.path.exists(f"/dev/shm/{name}")
    p.kill()
    p.wait()
    assert shm.sweep_dead_segments() >= 1
    assert not os.path.exists(f"/dev/shm/{name}")


def test_status_reports_counts(fresh_runtime):
    import scanpy as sc

    import autozyme

    autozyme.activate("scanpy", prewarm=False)
    try:
        fallback.reset_counts()
        sc.pp.normalize_total(counts(40, 30))
        sc.pp.log1p(counts(40, 30))
        st = autozyme.status()
        assert st["served"] == {"normalize_total": 1, "log1p": 1}
        assert st["daemon"]["requests_served"] >= 2
        text = autozyme.format_status(st)
        assert "normalize_total 1" in text and "daemon: pid" in text
    finally:
        autozyme.deactivate()


def test_activation_is_idempotent_and_reversible():
    import scanpy as sc

    import autozyme

    upstream = sc.pp.normalize_total
    autozyme.activate("scanpy", prewarm=False)
    autozyme.activate("scanpy", prewarm=False)
    patched = sc.pp.normalize_total
    assert patched is not upstream and patched.__autozyme_upstream__ is upstream
    import scanpy.preprocessing._normalization as priv

    assert priv.normalize_total is patched and sc.preprocessing.normalize_total is patched
    autozyme.deactivate()
    autozyme.deactivate()
    assert sc.pp.normalize_total is upstream and priv.normalize_total is upstream


def test_ipython_extension_round_trip():
    IPython = pytest.importorskip("IPython")
    import scanpy as sc

    upstream = sc.pp.log1p
    shell = IPython.core.interactiveshell.InteractiveShell.instance()
    shell.run_line_magic("load_ext", "autozyme")
    assert sc.pp.log1p is not upstream
    shell.run_line_magic("unload_ext", "autozyme")
    assert sc.pp.log1p is upstream


def test_pytest_plugin_activates_before_collection(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import scanpy as sc\n"
        "def test_probe():\n"
        "    assert hasattr(sc.pp.normalize_total, '__autozyme_upstream__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "autozyme.pytest_plugin", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "autozyme" in out.stdout


def test_install_service_writes_a_user_unit(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "autozyme.cli", "daemon", "install-service"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    unit = (tmp_path / "systemd/user/autozymed.service").read_text()
    assert "ExecStart=" in unit and "--runtime-dir" in unit and "autozymed" in unit
    assert "systemctl --user" in out.stdout and "enable" in out.stdout
    print(out.stdout)


def test_status_command(fresh_runtime):
    client_mod.get_client().connection()
    out = subprocess.run([sys.executable, "-m", "autozyme.cli", "status"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "daemon: pid" in out.stdout and "threads" in out.stdout and "cache:" in out.stdout
    js = subprocess.run([sys.executable, "-m", "autozyme.cli", "daemon", "status", "--json"],
                        capture_output=True, text=True, timeout=60)
    import json

    assert json.loads(js.stdout)["daemon"]["pid"] > 0


def test_warns_once_about_names_imported_into_main(monkeypatch):
    import scanpy as sc

    import autozyme
    from autozyme import activation

    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "normalize_total", sc.pp.normalize_total, raising=False)
    monkeypatch.setattr(activation, "_warned_main", False)
    with pytest.warns(UserWarning, match="normalize_total was imported into __main__"):
        autozyme.activate("scanpy", prewarm=False)
    autozyme.deactivate()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autozyme.activate("scanpy", prewarm=False)  # once only
    autozyme.deactivate()


def test_unverified_scanpy_version_falls_back_with_reason(monkeypatch):
    import scanpy as sc

    import autozyme
    from autozyme import versions

    monkeypatch.setattr(versions, "scanpy_version", lambda: "1.99.0")
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    autozyme.activate("scanpy", prewarm=False)
    try:
        fallback.reset_counts()
        normalize_both_and_compare(sc, counts(40, 30))
        reasons = fallback.counts()["fallbacks"]["normalize_total"]
        assert any("1.99.0 is not verified" in r for r in reasons), reasons
        assert "not verified" in autozyme.status()["version_problems"]["normalize_total"]
        monkeypatch.setenv("AUTOZYME_ALLOW_UNVERIFIED", "1")
        sc.pp.normalize_total(counts(40, 30))
        assert fallback.counts()["served"]["normalize_total"] == 1
    finally:
        autozyme.deactivate()


def test_verify_mode_checks_against_upstream_and_reports_differences(monkeypatch):
    import scanpy as sc

    import autozyme
    from autozyme import verify
    from autozyme.patches import normalize_total as nt

    monkeypatch.setenv("AUTOZYME_VERIFY", "1")
    monkeypatch.setattr(verify, "differences", [])
    monkeypatch.setattr(verify, "checked", 0)
    autozyme.activate("scanpy", prewarm=False)
    try:
        sc.pp.normalize_total(counts(60, 40, seed=13), target_sum=1e4)
        sc.pp.log1p(counts(60, 40, seed=13))
        assert verify.report()["checked"] == 2 and verify.report()["differences"] == []
        # A fast path that is wrong by one factor of two is caught and named.
        real = nt._factors
        monkeypatch.setattr(nt, "_factors", lambda c, t: tuple(v * 2 for v in real(c, t)))
        with pytest.warns(UserWarning, match="normalize_total differs from upstream"):
            sc.pp.normalize_total(counts(60, 40, seed=13), target_sum=1e4)
        assert any("X.data" in d for d in verify.report()["differences"])
        assert "differences" in autozyme.format_status()
    finally:
        autozyme.deactivate()


def test_a_new_process_leases_what_an_exited_one_gave_back(fresh_runtime):
    """Segments lent by the daemon go back to its pool when a client exits, so the
    next client's first call copies into memory that is already allocated; and the
    daemon unlinks them all when it stops."""
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "import autozyme, scanpy as sc\n"
        "from _data import counts\n"
        "from autozyme import shm\n"
        "autozyme.activate('scanpy', prewarm=False)\n"
        "ad = counts(400, 300, seed=3)\n"
        "sc.pp.normalize_total(ad)\n"
        "print('placed' if shm.is_placed(ad.X.data) else 'peer', flush=True)\n"
        "sc.pp.normalize_total(ad)\n"
        "time.sleep(0.5)\n"
    ) % str(Path(__file__).parent)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split() == ["peer"], first.stdout  # an empty daemon pool
    assert second.stdout.split() == ["placed"], second.stdout  # leased at once
    pid = client_mod.get_client().connection().hello.pid
    client_mod.get_client().shutdown()
    assert wait_until(lambda: not runtime.pid_alive(pid))
    prefix = f"azm_{os.geteuid()}_{pid}_"
    assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []


def test_a_daemon_whose_replies_cannot_be_decoded_is_replaced(fresh_runtime):
    """A daemon of another protocol version may answer in a layout we cannot read;
    it is replaced by ours rather than leaving every call to fall back."""
    import threading

    path = str(fresh_runtime / "daemon.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    answered = []

    def serve_garbage():
        server.settimeout(10)
        try:
            conn, _ = server.accept()
            conn.recv(4096)
            conn.sendall(struct.pack("<I", 12) + b"\x06\x00\x00\x00" + b"\xff" * 8)
            answered.append(True)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=serve_garbage, daemon=True)
    t.start()
    hello = client_mod.get_client().connection().hello
    t.join(10)
    server.close()
    assert answered and hello.tag == "Hello" and runtime.pid_alive(hello.pid)
    assert hello.build_id == runtime.expected_build_id()


def test_a_request_sent_at_most_once_is_not_lost_to_a_closed_connection(fresh_runtime):
    """A request that is never resent (``retry=False``: umap's layout writes the
    coordinates it starts from) still reaches a daemon when the one its connection
    led to has left in between (exited idle, replaced): that connection is found
    closed before anything is sent, and a new one is opened."""
    client = client_mod.Client()
    first = client.status(autostart=True)
    assert client_mod.Client().shutdown()  # another client stops that daemon
    assert wait_until(lambda: not runtime.pid_alive(first.pid))
    reply = client.call(codec.msg("Status"), retry=False)
    assert reply.value.pid != first.pid
    client.reset()


def test_adopted_data_in_a_lent_segment_survives_a_daemon_restart(fresh_runtime):
    """A daemon that exits unlinks the segments it lent; a client still holding
    one re-places its data and is served by the next daemon (strict mode on)."""
    import scanpy as sc

    import autozyme

    autozyme.activate("scanpy", prewarm=False)
    try:
        a, b = counts(400, 300, seed=17), counts(400, 300, seed=17)
        up = sc.pp.normalize_total.__autozyme_upstream__
        for _ in range(3):  # the later calls use segments lent by the daemon
            up(a, target_sum=1e4)
            sc.pp.normalize_total(b, target_sum=1e4)
            time.sleep(0.3)
        assert shm.stats()["lent_by_daemon"] > 0
        pid = client_mod.get_client().connection().hello.pid
        client_mod.get_client().shutdown()
        assert wait_until(lambda: not runtime.pid_alive(pid))
        fallback.reset_counts()
        up(a, target_sum=1e4)
        sc.pp.normalize_total(b, target_sum=1e4)  # a new daemon starts and serves it
        assert_identical(a.X, b.X)
        assert fallback.counts()["served"]["normalize_total"] == 1
    finally:
        autozyme.deactivate()
