"""Patching scanpy in place, and undoing it.

A target is replaced wherever scanpy binds it (``sc.pp``, ``scanpy.preprocessing``,
the private module, and any scanpy module that imported it by name), so scanpy's
own internal callers get the fast path too.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings

from . import fallback, shm, versions

# name -> (module that defines it, attribute, patch module)
TARGETS = {
    "normalize_total": ("scanpy.preprocessing._normalization", "normalize_total", "normalize_total"),
    "log1p": ("scanpy.preprocessing._simple", "log1p", "log1p"),
    "scale": ("scanpy.preprocessing._scale", "scale", "scale"),
    "highly_variable_genes": (
        "scanpy.preprocessing._highly_variable_genes", "highly_variable_genes", "highly_variable_genes"
    ),
    "rank_genes_groups": ("scanpy.tools._rank_genes_groups", "rank_genes_groups", "rank_genes_groups"),
    "leiden": ("scanpy.tools._leiden", "leiden", "leiden"),
    "neighbors": ("scanpy.neighbors", "neighbors", "neighbors"),
    "umap": ("scanpy.tools._umap", "umap", "umap"),
}

_lock = threading.RLock()
# name -> (upstream function, wrapper, [(module, attribute)])
_patched: dict[str, tuple] = {}
_warned_main = False


def is_active() -> bool:
    return bool(_patched)


def verified_versions() -> dict[str, tuple[str, ...]]:
    """scanpy call -> the scanpy versions its fast path reproduces."""
    return {
        name: tuple(importlib.import_module(f"autozyme.patches.{patch_name}").VERIFIED)
        for name, (_, _, patch_name) in TARGETS.items()
    }


def version_problems() -> dict[str, str]:
    """scanpy call -> why its fast path must not run on this scanpy (calls that may run are absent)."""
    out = {}
    for name, verified in verified_versions().items():
        reason = versions.problem(verified)
        if reason is not None:
            out[name] = reason
    return out


def _scanpy_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "scanpy" or name.startswith("scanpy."))]


def activate(library: str = "scanpy", *, prewarm: bool = True) -> None:
    if library != "scanpy":
        raise ValueError(f"autozyme accelerates 'scanpy', not {library!r}")
    import scanpy  # noqa: F401  (imports every module that binds a target)

    with _lock:
        if _patched:
            return
        for name, (modname, attr, patch_name) in TARGETS.items():
            upstream = getattr(importlib.import_module(modname), attr)
            upstream = getattr(upstream, "__autozyme_upstream__", upstream)
            patch = importlib.import_module(f"autozyme.patches.{patch_name}")
            wrapper = fallback.fast_or_upstream(name, patch.fast, upstream, patch.VERIFIED)
            sites = []
            for mod in _scanpy_modules():
                for key, value in list(vars(mod).items()):
                    if value is upstream:
                        setattr(mod, key, wrapper)
                        sites.append((mod, key))
            _patched[name] = (upstream, wrapper, sites)
        _attribute_upstream_warnings_past_autozyme(True)
        _warn_main_bindings()
    shm.sweep_dead_segments()
    from .client import lease_segment, release_segments

    shm.set_lender(lease_segment, release_segments)
    if prewarm:
        threading.Thread(target=_prewarm, name="autozyme-prewarm", daemon=True).start()


def _prewarm() -> None:
    """Connect (starting the daemon if needed) and warm the shim's thread pool, so
    the first call pays neither. Never raises: failure just means fallback later."""
    from . import parallel
    from .client import get_client

    try:
        if "neighbors" in _patched and "neighbors" not in version_problems():
            from .warm import client as warm_client

            warm_client.start()  # detached, niced; returns at once
        parallel.warm()
        get_client().connection()
    except Exception:  # noqa: BLE001 - activation never fails because of the daemon
        pass


def _attribute_upstream_warnings_past_autozyme(on: bool) -> None:
    """scanpy 1.12 attributes its warnings to the first frame outside the packages
    in ``scanpy._compat._FILE_PREFIXES`` (read when it warns). When a call falls
    back, upstream runs under autozyme's wrapper, whose frame would be named
    instead of the user's line: list autozyme's package there while active. scanpy
    1.11.5 has no such list (nothing to do)."""
    from pathlib import Path

    compat = sys.modules.get("scanpy._compat")
    prefixes = getattr(compat, "_FILE_PREFIXES", None)
    if not isinstance(prefixes, tuple):
        return
    ours = str(Path(__file__).parent)
    if on and ours not in prefixes:
        compat._FILE_PREFIXES = (*prefixes, ours)
    elif not on and ours in prefixes:
        compat._FILE_PREFIXES = tuple(p for p in prefixes if p != ours)


def _warn_main_bindings() -> None:
    """A name imported into __main__ before activation keeps pointing at upstream."""
    global _warned_main
    main = sys.modules.get("__main__")
    if main is None or _warned_main:
        return
    stale = [key for key, value in vars(main).items()
             for upstream, _, _ in _patched.values() if value is upstream]
    if stale:
        _warned_main = True
        warnings.warn(
            f"autozyme: {', '.join(sorted(stale))} was imported into __main__ before activation "
            "and still refers to upstream scanpy; call it as sc.pp.<name> or re-import it.",
            stacklevel=3,
        )


def deactivate() -> None:
    with _lock:
        for upstream, wrapper, sites in _patched.values():
            for mod, key in sites:
                if getattr(mod, key, None) is wrapper:
                    setattr(mod, key, upstream)
        _patched.clear()
        _attribute_upstream_warnings_past_autozyme(False)


def patched_targets() -> list[str]:
    return sorted(_patched)
