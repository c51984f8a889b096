"""autozyme: a drop-in accelerator for scanpy.

``import autozyme; autozyme.activate("scanpy")`` (or ``%load_ext autozyme`` in
Jupyter) patches scanpy so that supported calls run in the per-user daemon
``autozymed`` and return results bit-identical to upstream; everything else, and
any call the daemon cannot serve, runs upstream unchanged.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .activation import activate, deactivate, is_active
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


def load_ipython_extension(ipython) -> None:
    """``%load_ext autozyme``: scanpy patched, and the magics ``%autozyme`` (status)
    and ``%%autozyme.profile`` (where each call of the cell ran)."""
    activate("scanpy")
    from .magics import register

    register(ipython)


def unload_ipython_extension(ipython) -> None:  # noqa: ARG001
    """``%unload_ext autozyme``: scanpy is upstream again."""
    deactivate()
