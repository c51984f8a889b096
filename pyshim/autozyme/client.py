"""The socket client: connect (starting the daemon if none listens), handshake,
one request at a time per connection, timeouts, one reconnect."""

from __future__ import annotations

import atexit
import os
import socket
import struct
import threading
import time

from . import codec, runtime
from .codec import REQUEST, RESPONSE, msg
from .runtime import DaemonUnavailable

CONNECT_TIMEOUT_S = 5.0


def request_timeout() -> float:
    """Seconds a call waits for the daemon before falling back (AUTOZYME_TIMEOUT)."""
    try:
        return float(os.environ.get("AUTOZYME_TIMEOUT", "600"))
    except ValueError:
        return 600.0


def segment_names(value) -> list[str]:
    """Every shared-memory segment a request refers to."""
    if isinstance(value, codec.Msg):
        if value.tag == "Segment":
            return [value.name]
        value = list(value.fields.values())
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in segment_names(v)]
    return []


class DaemonError(RuntimeError):
    """The daemon answered with an error (kind is the wire ErrorKind)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Connection:
    def __init__(self, sock: socket.socket, hello: codec.Msg):
        self.sock = sock
        self.hello = hello

    def call(self, request: codec.Msg, timeout: float) -> codec.Msg:
        self.sock.settimeout(timeout)
        self.sock.sendall(codec.frame(REQUEST, request))
        head = self._recv_exact(4)
        (n,) = struct.unpack("<I", head)
        if n > codec.MAX_FRAME_BYTES:
            raise DaemonUnavailable(f"daemon sent a frame of {n} bytes")
        return codec.decode(RESPONSE, self._recv_exact(n))

    def open(self) -> bool:
        """Whether the daemon still holds this connection: false once it has closed
        it (it exited or was replaced since the last request). Nothing is sent."""
        try:
            self.sock.setblocking(False)
            try:
                return self.sock.recv(1, socket.MSG_PEEK) != b""
            finally:
                self.sock.setblocking(True)
        except BlockingIOError:
            return True  # open, nothing to read
        except OSError:
            return False

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("daemon closed the connection")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _connect_once(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT_S)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def _handshake(sock: socket.socket) -> codec.Msg:
    conn = Connection(sock, None)
    reply = conn.call(
        msg("Hello", protocol_version=codec.PROTOCOL_VERSION, build_id=runtime.expected_build_id(),
            client_pid=os.getpid()),
        timeout=CONNECT_TIMEOUT_S,
    )
    return reply


class Client:
    """Process-wide client; thread-safe (one request in flight per connection)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    # -- connection management -------------------------------------------------
    def _open(self, autostart: bool) -> Connection:
        path = str(runtime.socket_path())
        expected = runtime.expected_build_id()
        replaced_once = started = False
        deadline = time.monotonic() + runtime.START_TIMEOUT_S
        while True:
            try:
                sock = _connect_once(path)
            except (FileNotFoundError, ConnectionRefusedError):
                if not autostart:
                    raise DaemonUnavailable("no daemon is running") from None
                if not started:
                    runtime.start_daemon()
                    started = True
                elif time.monotonic() > deadline:
                    raise DaemonUnavailable("daemon started but its socket never accepted") from None
                else:
                    # Another starter won the race and is still binding its socket.
                    time.sleep(0.02)
                continue
            except OSError as e:
                raise DaemonUnavailable(f"cannot connect to {path}: {e}") from e
            try:
                hello = _handshake(sock)
            except codec.CodecError as e:
                # A reply we cannot read: a daemon of an incompatible version.
                hello = codec.Msg("Undecodable", {"error": str(e)})
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise DaemonUnavailable(f"handshake failed: {e}") from e
                time.sleep(0.05)
                continue
            except BaseException:
                # Never leave a socket to the garbage collector: its ResourceWarning
                # is an error under scanpy's own test config.
                sock.close()
                raise
            if hello.tag == "Hello" and hello.build_id == expected:
                return Connection(sock, hello)
            # An incompatible daemon (older install, other protocol): replace it once.
            sock.close()
            if replaced_once or not autostart:
                raise DaemonUnavailable(f"daemon is incompatible: {hello}")
            replaced_once = True
            self._stop_incompatible(path, hello)
            runtime.start_daemon()
            started = True

    @staticmethod
    def _stop_incompatible(path: str, hello: codec.Msg) -> None:
        if hello.tag == "Hello":  # speaks our protocol: ask it politely
            try:
                conn = Connection(_connect_once(path), None)
            except OSError:
                conn = None
            if conn is not None:
                try:
                    conn.call(msg("Hello", protocol_version=codec.PROTOCOL_VERSION,
                                  build_id="", client_pid=os.getpid()), CONNECT_TIMEOUT_S)
                    conn.call(msg("Shutdown"), CONNECT_TIMEOUT_S)
                except (OSError, codec.CodecError, DaemonUnavailable):
                    pass
                finally:
                    conn.close()
            deadline = time.monotonic() + 12
            while os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.02)
        if os.path.exists(path):
            runtime.terminate_daemon()

    def connection(self, autostart: bool = True) -> Connection:
        if self._conn is None:
            self._conn = self._open(autostart)
        return self._conn

    def reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- requests --------------------------------------------------------------
    def call(self, request: codec.Msg, *, timeout: float | None = None,
             retry: bool = True, autostart: bool = True) -> codec.Msg:
        """Send one request; on a broken connection reconnect once (restarting the
        daemon if needed) and resend when ``retry`` (the request is idempotent).
        A daemon error reply raises DaemonError; anything else DaemonUnavailable."""
        timeout = request_timeout() if timeout is None else timeout
        with self._lock:
            if not retry and self._conn is not None and not self._conn.open():
                # A request that must not be sent twice goes on a connection the
                # daemon still holds: one it closed since would fail it unsent.
                self.reset()
            for attempt in (0, 1):
                try:
                    reply = self.connection(autostart).call(request, timeout)
                    break
                except socket.timeout as e:
                    # The connection's state is unknown: drop it. The daemon finishes
                    # or abandons the work on its own; its reply goes nowhere, and
                    # the segments it may still write are never reused.
                    self.reset()
                    from . import shm

                    shm.quarantine(segment_names(request))
                    raise DaemonUnavailable(f"no reply within {timeout:.0f}s") from e
                except (OSError, codec.CodecError) as e:
                    self.reset()
                    if attempt or not retry:
                        raise DaemonUnavailable(f"connection lost: {e}") from e
        if reply.tag == "Error":
            raise DaemonError(reply.kind, reply.message)
        return reply

    def status(self, autostart: bool = False) -> codec.Msg:
        return self.call(msg("Status"), timeout=CONNECT_TIMEOUT_S, autostart=autostart).value

    def shutdown(self) -> bool:
        try:
            self.call(msg("Shutdown"), timeout=CONNECT_TIMEOUT_S, retry=False, autostart=False)
        except DaemonUnavailable:
            return False
        finally:
            self.reset()
        return True


_client: Client | None = None
_client_lock = threading.Lock()


def get_client() -> Client:
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            _set_client(Client())
        return _client


_client_pid = os.getpid()
_background: Client | None = None
_background_pid = os.getpid()


def _set_client(c: Client) -> None:
    """A new process-wide client; the background one follows it (to the same
    daemon), its old connection closed here: a process's first call often
    leases a segment (the background connection) before its first request, and
    dropping that client unclosed left a ResourceWarning to the garbage
    collector (an error under scanpy's test config)."""
    global _client, _client_pid, _background
    # Replaced clients close their sockets; in a forked child that closes only the
    # child's copies of the descriptors, the parent's connections stay open.
    old = [x for x in (_client, _background) if x is not None]
    _client, _client_pid, _background = c, os.getpid(), None
    for x in old:
        x.reset()


@atexit.register
def _close_at_exit() -> None:
    """Sockets still open at interpreter exit would each print a ResourceWarning."""
    for c in (_client, _background):
        if c is not None:
            c.reset()


def _background_client() -> Client:
    """A second connection for work off the caller's path (spares, leases,
    releases), so a foreground call never waits behind it."""
    global _background, _background_pid
    with _client_lock:
        if _background is None or _background_pid != os.getpid():
            if _background is not None:
                _background.reset()  # a forked child's inherited copy
            _background, _background_pid = Client(), os.getpid()
        return _background


def prefault_in_background(name: str) -> None:
    """Ask the daemon to map segment ``name`` now. Best effort: a failure only
    means the first use pays the mapping."""
    try:
        _background_client().call(msg("Prefault", segments=[name]), timeout=CONNECT_TIMEOUT_S,
                                  autostart=False)
    except (DaemonUnavailable, DaemonError):
        pass


def lease_segment(nbytes: int, create: bool) -> tuple[str, int] | None:
    """A segment lent from the daemon's pool, or None (none fits, or no daemon)."""
    try:
        reply = _background_client().call(msg("Lease", bytes=int(nbytes), create=create),
                                          timeout=CONNECT_TIMEOUT_S if not create else None,
                                          autostart=False)
    except (DaemonUnavailable, DaemonError):
        return None
    return (reply.segment, reply.size) if reply.segment is not None else None


def release_segments(names: list[str]) -> None:
    """Give leased segments back to the daemon's pool. Best effort: a daemon that
    is gone has unlinked them already, and one that missed this reclaims them when
    this process dies."""
    try:
        _background_client().call(msg("Release", segments=list(names)), timeout=CONNECT_TIMEOUT_S,
                                  retry=False, autostart=False)
    except (DaemonUnavailable, DaemonError):
        pass
