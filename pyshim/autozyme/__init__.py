"""autozyme: a drop-in accelerator for scanpy.

``import autozyme; autozyme.activate("scanpy")`` (or ``%load_ext autozyme`` in
Jupyter) patches scanpy so that supported calls run in the per-user daemon
``autozymed`` and return results bit-identical to upstream; everything else, and
any call the daemon cannot serve, runs upstream unchanged.
"""

from __future__ import annotations

__version__ = "0.1.0"

import sys

from . import activation
from .activation import is_active
from .fallback import AutozymeFallbackError
from .profile import profile
from .settings import configure
from .status import format_status, status

__all__ = [
    "activate",
    "deactivate",
    "is_active",
    "status",
    "format_status",
    "AutozymeFallbackError",
    "profile",
    "configure",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def activate(library: str = "scanpy", *, prewarm: bool = True) -> None:
    """Patch scanpy in this process (``autozyme.activation``) and, with a
    ``dask.distributed`` client here, on its workers too, now and later
    (``autozyme.dask.cluster``). Calling it again after creating a client
    registers the workers' plugin with that client."""
    activation.activate(library, prewarm=prewarm)
    _on_cluster("register_default")


def deactivate() -> None:
    """scanpy is upstream again, here and on the workers of a distributed client."""
    activation.deactivate()
    if "autozyme.dask.cluster" in sys.modules:
        _on_cluster("unregister_all")


def _on_cluster(step: str) -> None:
    """A step of ``autozyme.dask.cluster``, only when the user has imported
    distributed (it is never imported here); never an error."""
    if "distributed" not in sys.modules:
        return
    try:
        from .dask import cluster
    except Exception:  # noqa: BLE001 - e.g. a distributed without the plugin API
        return
    getattr(cluster, step)()


def load_ipython_extension(ipython) -> None:
    """``%load_ext autozyme``: scanpy patched, and the magics ``%autozyme`` (status)
    and ``%%autozyme.profile`` (where each call of the cell ran)."""
    activate("scanpy")
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:  # noqa: ARG001
    """``%unload_ext autozyme``: scanpy is upstream again."""
    deactivate()
