"""User-facing options: ``autozyme.configure(...)``, each also settable by an
environment variable (the call wins).

- ``leiden``: ``"exact"`` (default; ``sc.tl.leiden(flavor="igraph")`` gives
  upstream's labels, faster) or ``"parallel"`` (both flavors run the daemon's own
  Leiden: same objective, deterministic, not upstream's labels). Environment:
  ``AUTOZYME_LEIDEN``.
"""

from __future__ import annotations

import os

_LEIDEN_MODES = ("exact", "parallel")
_options: dict[str, str] = {}


def configure(*, leiden: str | None = None) -> None:
    """Set options for this process; ``None`` leaves an option as it is."""
    if leiden is not None:
        if leiden not in _LEIDEN_MODES:
            raise ValueError(f"leiden must be one of {_LEIDEN_MODES}, not {leiden!r}")
        _options["leiden"] = leiden


def leiden_mode() -> str:
    if "leiden" in _options:
        return _options["leiden"]
    env = os.environ.get("AUTOZYME_LEIDEN", "").strip().lower()
    return env if env in _LEIDEN_MODES else "exact"


def reset() -> None:
    _options.clear()
