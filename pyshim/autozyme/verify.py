"""Verify mode (``AUTOZYME_VERIFY=1``): each served call also runs upstream on a
copy of the user's own input, and any difference in the result or in the
AnnData it leaves behind is reported (a warning, and ``autozyme.status()``).

Meant for trying autozyme on new data or a scanpy version it was not verified
against (with ``AUTOZYME_ALLOW_UNVERIFIED=1``); it costs an upstream run per call.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings

import numpy as np
import scipy.sparse as sp

_lock = threading.Lock()
differences: list[str] = []
checked = 0


def enabled() -> bool:
    return os.environ.get("AUTOZYME_VERIFY", "") not in ("", "0")


def snapshot_args(args: tuple, kwargs: dict):
    """Deep copies of the call's inputs, for upstream to run on."""
    from anndata import AnnData

    def dup(v):
        return v.copy() if isinstance(v, AnnData) else copy.deepcopy(v)

    return tuple(dup(a) for a in args), {k: dup(v) for k, v in kwargs.items()}


def compare_calls(name: str, fast_args: tuple, fast_result, up_args: tuple, up_result) -> None:
    """Compare results and the (possibly modified) first argument of both runs."""
    global checked
    found = _diff("result", fast_result, up_result)
    if fast_args and up_args:
        found += _diff("input after the call", fast_args[0], up_args[0])
    with _lock:
        checked += 1
        for d in found:
            differences.append(f"{name}: {d}")
    if found:
        warnings.warn(f"autozyme verify: {name} differs from upstream: {'; '.join(found)}", stacklevel=3)


def _diff(where: str, a, b) -> list[str]:
    from anndata import AnnData

    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs upstream {type(b).__name__}"]
    if isinstance(a, AnnData):
        out = _diff(f"{where}.X", a.X, b.X)
        for attr in ("layers", "obsm"):
            ma, mb = getattr(a, attr), getattr(b, attr)
            if set(ma) != set(mb):
                out.append(f"{where}.{attr} keys {sorted(ma)} vs {sorted(mb)}")
            else:
                out += [d for k in ma for d in _diff(f"{where}.{attr}[{k!r}]", ma[k], mb[k])]
        for attr in ("obs", "var"):
            fa, fb = getattr(a, attr), getattr(b, attr)
            if list(fa.columns) != list(fb.columns):
                out.append(f"{where}.{attr} columns differ")
            else:
                out += [d for c in fa.columns
                        for d in _diff(f"{where}.{attr}[{c!r}]", fa[c].to_numpy(), fb[c].to_numpy())]
        if set(a.uns) != set(b.uns):
            out.append(f"{where}.uns keys {sorted(a.uns)} vs {sorted(b.uns)}")
        return out
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in _diff(f"{where}[{k!r}]", a[k], b[k])]
    if sp.issparse(a):
        if a.format != b.format or a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.format} {a.dtype}{a.shape} vs {b.format} {b.dtype}{b.shape}"]
        if not (np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)):
            return [f"{where}: sparsity structure differs"]
        return _diff(f"{where}.data", np.asarray(a.data), np.asarray(b.data))
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"]
        if a.dtype.hasobject:
            return [] if a.tolist() == b.tolist() else [f"{where}: values differ"]
        if a.flags.f_contiguous != b.flags.f_contiguous or a.flags.c_contiguous != b.flags.c_contiguous:
            return [f"{where}: memory order differs"]
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        bad = np.count_nonzero(a.view(np.uint8).reshape(-1) != b.view(np.uint8).reshape(-1)) if a.size else 0
        return [f"{where}: {bad} bytes differ"] if bad else []
    try:
        return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
    except Exception:  # noqa: BLE001 - incomparable values are not reported as different
        return []


def report() -> dict:
    with _lock:
        return dict(enabled=enabled(), checked=checked, differences=list(differences))
