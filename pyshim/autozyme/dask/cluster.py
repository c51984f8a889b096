"""autozyme on a ``dask.distributed`` cluster's workers.

The chunk tasks of a dask call run in worker processes, possibly on other
machines. Each worker process needs autozyme active (its shared-memory sweep and
segment lender, its daemon started ahead of the first chunk) and the client's
behaviour settings (``AUTOZYME_STRICT`` above all: a strict client must not get a
silent fallback from a worker). A worker plugin carries both, registered with
``Client.register_plugin``: the scheduler keeps it and sets it up on every
worker now connected and on every worker that joins or restarts later.

What is *not* carried: where the daemon lives and what the machine allows
(``AUTOZYME_RUNTIME_DIR``, ``AUTOZYMED``, threads, memory budgets, idle
timeout). Every worker uses its own machine's daemon, found and started as in a
notebook on that machine; no socket and no shared memory crosses machines.

``autozyme.activate("scanpy")`` registers the plugin with the default client
when one exists; ``register(client)`` does it for a client created after
activation. ``autozyme.deactivate()`` removes it again (each worker's teardown
deactivates autozyme there and restores its environment).
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
import warnings
import weakref

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "autozyme"

# The settings that decide what a call does (or whether a fallback is an error),
# so a worker must see the client's. Everything else AUTOZYME_* describes the
# machine a process runs on and stays the worker's own.
SHARED_ENV = (
    "AUTOZYME_STRICT",
    "AUTOZYME_ALLOW_UNVERIFIED",
    "AUTOZYME_VERIFY",
    "AUTOZYME_TIMEOUT",
    "AUTOZYME_LEIDEN",
    "AUTOZYME_HVG_CACHE",
)

# Set in a worker process once the plugin ran there: activation on a worker must
# never register a plugin in turn (a task may hold a client to the same cluster).
_on_worker = False
_lock = threading.Lock()
# Clients this process registered the plugin with (removed again on deactivate).
_registered: weakref.WeakSet = weakref.WeakSet()
_TOKEN = uuid.uuid4().hex


def shared_env() -> dict[str, str | None]:
    """This process's values of ``SHARED_ENV`` (None: unset, so unset on workers too)."""
    return {name: os.environ.get(name) for name in SHARED_ENV}


class AutozymeWorkerPlugin(WorkerPlugin):
    """Activates autozyme in a worker process with the client's settings.

    ``idempotent`` stays False: registering again (``register(client)`` after
    changing ``AUTOZYME_STRICT``) replaces the plugin, and each worker tears the
    old one down and sets the new one up."""

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, env: dict[str, str | None] | None = None, options: dict | None = None):
        self.env = shared_env() if env is None else dict(env)
        from .. import settings

        self.options = dict(settings._options) if options is None else dict(options)
        self._saved: dict[str, str | None] = {}
        # A worker in the registering process itself (``processes=False``) shares
        # its autozyme: the plugin must neither re-activate nor deactivate it.
        self._creator = _process_identity()

    def setup(self, worker) -> None:  # noqa: ARG002 - distributed's signature
        global _on_worker
        if self._creator == _process_identity():
            return
        _on_worker = True
        from .. import activation, settings

        self._saved = {name: os.environ.get(name) for name in self.env}
        _set_env(self.env)
        settings.configure(**self.options)
        activation.activate("scanpy")

    def teardown(self, worker) -> None:  # noqa: ARG002
        if self._creator == _process_identity():
            return
        from .. import activation, settings

        activation.deactivate()
        settings.reset()
        _set_env(self._saved)


def _process_identity() -> tuple[str, int]:
    """Tells this process from any other, on any machine (a pid alone could
    repeat on another machine; the token alone in a forked child)."""
    return _TOKEN, os.getpid()


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def register(client) -> None:
    """Activate autozyme on ``client``'s workers, now and on those that join later,
    with this process's shared settings (``AUTOZYME_STRICT`` ...). For a client
    created after ``autozyme.activate("scanpy")``; calling it again re-sends the
    settings. autozyme must be installed in every worker's environment."""
    client.register_plugin(AutozymeWorkerPlugin(), name=PLUGIN_NAME)
    with _lock:
        _registered.add(client)


def _default_client():
    """The running default client of this process, or None (also inside a worker)."""
    if _on_worker or "distributed" not in sys.modules:
        return None
    from distributed import default_client, get_worker

    try:
        get_worker()
        return None  # inside a task: the worker's client is not the user's
    except ValueError:
        pass
    try:
        client = default_client()
    except ValueError:
        return None
    if getattr(client, "asynchronous", False) or getattr(client, "status", None) != "running":
        return None
    return client


def register_default() -> None:
    """``activate``'s hook: register with the default client unless done already.
    Never raises (activation never fails because of the cluster); a failure is
    a warning, since the workers then serve nothing."""
    try:
        client = _default_client()
        if client is None:
            return
        with _lock:
            if client in _registered:
                return
        register(client)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"autozyme: not activated on the dask cluster's workers: {type(e).__name__}: {e}",
                      stacklevel=3)


def unregister_all() -> None:
    """``deactivate``'s hook: remove the plugin from every client it was registered
    with (workers deactivate autozyme in its teardown). Best effort."""
    with _lock:
        clients = list(_registered)
        _registered.clear()
    for client in clients:
        try:
            if getattr(client, "status", None) == "running":
                client.unregister_worker_plugin(PLUGIN_NAME)
        except Exception:  # noqa: BLE001 - deactivation never fails because of the cluster
            pass


def _worker_report() -> dict:
    """Run on each worker by ``workers_status``: its counts and its daemon."""
    from .. import activation, fallback, runtime
    from ..client import Client, DaemonError

    out = {
        "active": activation.is_active(),
        "pid": os.getpid(),
        "runtime_dir": str(runtime.runtime_dir()),
        "strict": fallback.strict(),
        **fallback.counts(),
        "daemon_pid": None,
        "daemon_requests_served": None,
    }
    # A connection of its own: this runs on the worker's event loop, which must
    # not wait behind a chunk task's long request on the process's shared client.
    probe = Client()
    try:
        st = probe.status(autostart=False)
        out["daemon_pid"] = st.pid
        out["daemon_requests_served"] = st.requests_served
    except (runtime.DaemonUnavailable, DaemonError) as e:
        out["daemon_problem"] = str(e)
    finally:
        probe.reset()
    return out


def workers_status() -> dict | None:
    """The workers' counts summed, and each worker's daemon; None without a
    default client. Never raises."""
    try:
        client = _default_client()
        if client is None:
            return None
    except Exception:  # noqa: BLE001
        return None
    out: dict = {"count": 0, "active": 0, "served": {}, "fallbacks": {}, "by_worker": {}}
    try:
        reports = client.run(_worker_report, on_error="return")
    except Exception as e:  # noqa: BLE001
        out["problem"] = f"{type(e).__name__}: {e}"
        return out
    for address, rep in sorted(reports.items()):
        out["count"] += 1
        if not isinstance(rep, dict):
            out["by_worker"][address] = {"problem": f"{type(rep).__name__}: {rep}"}
            continue
        out["active"] += bool(rep["active"])
        for name, n in rep["served"].items():
            out["served"][name] = out["served"].get(name, 0) + n
        for name, reasons in rep["fallbacks"].items():
            mine = out["fallbacks"].setdefault(name, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + n
        out["by_worker"][address] = rep
    return out


def format_workers(w: dict) -> list[str]:
    lines = [f"dask workers: {w['count']}, autozyme active on {w['active']}"]
    if w.get("problem"):
        lines.append(f"  not reachable: {w['problem']}")
    lines.append("  served: " + (", ".join(f"{k} {v}" for k, v in sorted(w["served"].items())) or "none"))
    for name, reasons in sorted(w["fallbacks"].items()):
        for reason, n in sorted(reasons.items()):
            lines.append(f"  fell back: {name}: {n} x {reason}")
    for address, rep in w["by_worker"].items():
        if "runtime_dir" not in rep:
            lines.append(f"  {address}: {rep.get('problem')}")
            continue
        daemon = (f"daemon pid {rep['daemon_pid']} ({rep['daemon_requests_served']} requests served)"
                  if rep["daemon_pid"] is not None else f"no daemon ({rep.get('daemon_problem')})")
        lines.append(f"  {address}: pid {rep['pid']}, {daemon}, runtime dir {rep['runtime_dir']}")
    return lines
