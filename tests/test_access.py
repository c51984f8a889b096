"""Who may reach a user's daemon: the runtime dir is 0700 and the socket 0600,
both owned by the user; and even with those loosened, the daemon itself refuses
a peer of another uid (SO_PEERCRED), so the file modes are not the only guard."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import tempfile
from pathlib import Path

import pytest

from autozyme import client as client_mod
from autozyme import codec, runtime

OTHER_UID = 65534  # nobody


def _hello_frame() -> bytes:
    return codec.frame(
        codec.REQUEST,
        codec.msg("Hello", protocol_version=codec.PROTOCOL_VERSION, build_id="x", client_pid=os.getpid()),
    )


def _try_as(uid: int, sock_path: str) -> str:
    """Fork, drop to ``uid`` (no exec: the interpreter may live where that user
    cannot read), connect, greet; returns what happened, as the child saw it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        outcome = "?"
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(sock_path)
            except PermissionError:
                outcome = "connect refused by file modes"
            else:
                try:
                    s.sendall(_hello_frame())
                    head = s.recv(4)
                except (ConnectionResetError, BrokenPipeError):
                    head = b""  # closed before reading our greeting: a reset
                outcome = "closed by daemon" if len(head) < 4 else f"answered {struct.unpack('<I', head)[0]} bytes"
        except Exception as e:  # noqa: BLE001 - reported to the parent
            outcome = f"error {type(e).__name__}: {e}"
        os.write(w, outcome.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def own_daemon(monkeypatch):
    # Under /tmp itself, so that only our own directories' modes stand in the way.
    parent = Path(tempfile.mkdtemp(prefix="azm-access-"))
    d = parent / "rt"
    monkeypatch.setenv("AUTOZYME_RUNTIME_DIR", str(d))
    old = client_mod._client
    client_mod._set_client(client_mod.Client())
    client_mod.get_client().call(codec.msg("Ping"))
    yield d
    client_mod.get_client().shutdown()
    runtime.terminate_daemon()
    client_mod._set_client(old)
    shutil.rmtree(parent, ignore_errors=True)


def test_runtime_dir_and_socket_are_private(own_daemon):
    sock = next(p for p in own_daemon.iterdir() if stat.S_ISSOCK(p.stat().st_mode))
    assert stat.S_IMODE(own_daemon.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert own_daemon.stat().st_uid == sock.stat().st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user (nobody)")
def test_another_uid_is_refused(own_daemon):
    sock = next(p for p in own_daemon.iterdir() if stat.S_ISSOCK(p.stat().st_mode))
    # As the files are: the kernel stops the other user at the directory.
    own_daemon.parent.chmod(0o711)
    first = _try_as(OTHER_UID, str(sock))
    print(f"uid {OTHER_UID}, modes as created: {first}")
    assert first == "connect refused by file modes"
    # Loosened by hand (a user's mistake): the daemon's own uid check still refuses.
    own_daemon.chmod(0o711)
    sock.chmod(0o666)
    second = _try_as(OTHER_UID, str(sock))
    print(f"uid {OTHER_UID}, modes loosened: {second}")
    assert second == "closed by daemon"
    # And the daemon still serves its owner.
    assert client_mod.get_client().call(codec.msg("Ping")).tag == "Pong"
