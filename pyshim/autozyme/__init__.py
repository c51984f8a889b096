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
from .settings import configure
from .status import format_status, status

__all__ = [
    "activate",
    "deactivate",
    "is_active",
    "status",
    "format_status",
    "AutozymeFallbackError",
    "configure",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython) -> None:  # noqa: ARG001 - IPython's hook signature
    """``%load_ext autozyme``."""
    activate("scanpy")


def unload_ipython_extension(ipython) -> None:  # noqa: ARG001
    """``%unload_ext autozyme``: scanpy is upstream again."""
    deactivate()
