"""The fallback contract: a fast path either serves a call or hands it, untouched,
to the captured upstream function, and says why.

Two kinds of reason: ``scope`` (the input or an argument is outside what the fast
path covers; upstream is the designated handler) and ``failure`` (no daemon, a
daemon error, a timeout, an unverified scanpy version). ``AUTOZYME_STRICT=1``
turns every fallback into an :class:`AutozymeFallbackError` naming the reason;
the pytest plugin relaxes it to failures only, so scanpy's own suite may exercise
out-of-scope inputs while no in-scope call can fall back silently.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections import Counter, defaultdict

from . import profile, verify, versions
from .client import DaemonError
from .runtime import DaemonUnavailable
from .shm import PlacementError


class Fallback(Exception):
    """Raised by a fast path, before it changed anything, to hand the call to upstream."""

    kind = "scope"


class Delegate(Exception):
    """Upstream raises for this input (bad arguments, missing layer): let it raise
    its own error. Counted, but never a strict-mode violation."""


class BadInput(ValueError):
    """Input upstream's compiled code would read out of bounds on (a malformed
    sparse structure): refused with a clear error instead of running upstream."""


class AutozymeFallbackError(RuntimeError):
    """Strict mode: a call would have fallen back to upstream."""


class Interrupted(RuntimeError):
    """A fast path failed after it had begun changing the user's own data (an
    in-place kernel in shared memory): upstream must not run on partly changed
    input, so this reaches the user instead of falling back."""


class PassThrough(Exception):
    """Carries an exception upstream raises at the same point of the same call
    (a warning upstream issues, made an error by the user's warning filter, after
    the data was already changed as upstream changes it): ``error`` reaches the
    user as is; running upstream again would change the data twice."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


_lock = threading.Lock()
served: Counter = Counter()
fallbacks: dict[str, Counter] = defaultdict(Counter)
_strict_scope = True
_pure = threading.local()


def strict() -> bool:
    return os.environ.get("AUTOZYME_STRICT", "") not in ("", "0")


def set_strict_scope(on: bool) -> None:
    """Whether strict mode also rejects scope fallbacks (default yes)."""
    global _strict_scope
    _strict_scope = on


def lock() -> threading.Lock:
    """The lock guarding ``served`` and ``fallbacks``."""
    return _lock


def record_fallback(name: str, kind: str, reason: str) -> None:
    with _lock:
        fallbacks[name][f"{kind}: {reason}"] += 1
    if strict() and (kind == "failure" or _strict_scope):
        raise AutozymeFallbackError(f"autozyme {name} fell back to upstream ({kind}): {reason}")


def fast_or_upstream(name: str, fast, upstream, verified=()):
    """Wrap ``upstream`` so that ``fast(upstream, *args, **kwargs)`` serves the call,
    and any Fallback (or daemon trouble before the fast path changed anything)
    runs ``upstream(*args, **kwargs)`` instead. ``verified``: the scanpy versions
    the fast path reproduces; on any other it falls back unless the user opted in.

    An exception the fast path did not expect (a private scanpy name another
    version lacks, a bug of ours) never reaches the user: upstream runs, and only
    when upstream completes is it counted as autozyme's failure (strict mode then
    raises). When upstream raises too, the input was bad: the user gets upstream's
    own error."""

    @functools.wraps(upstream)
    def wrapper(*args, **kwargs):
        if getattr(_pure, "on", False):
            # Inside verify mode's reference run: scanpy calling its own (patched)
            # functions must get upstream too.
            return upstream(*args, **kwargs)
        # Where the call ran and why, for an open ``autozyme.profile()`` (the body
        # stays in this one frame: upstream's warnings name their caller by depth).
        where = ["upstream", "raised before deciding"]
        start = time.perf_counter()
        try:
            reason = versions.problem(verified)
            if reason is not None:
                where[:] = "upstream", f"failure: {reason}"
                record_fallback(name, "failure", reason)
                return upstream(*args, **kwargs)
            check = verify.enabled()
            if check:
                up_args, up_kwargs = verify.snapshot_args(args, kwargs)
            try:
                result = fast(upstream, *args, **kwargs)
            except Delegate as e:
                where[:] = "upstream", f"delegated: {e}"
                with _lock:
                    fallbacks[name][f"delegated: {e}"] += 1
                return upstream(*args, **kwargs)
            except Fallback as e:
                where[:] = "upstream", f"{e.kind}: {e}"
                record_fallback(name, e.kind, str(e))
                return upstream(*args, **kwargs)
            except (DaemonUnavailable, DaemonError, PlacementError) as e:
                if isinstance(e, DaemonError) and e.kind == "BadMatrix":
                    # Malformed structure the shim's O(rows) checks cannot see (a column
                    # index out of range): upstream's compiled code would read out of
                    # bounds on it, so refuse it clearly, as scipy's format check would.
                    # The daemon checks before it writes, so nothing has changed.
                    where[:] = "autozyme", "refused a malformed matrix"
                    raise BadInput(f"autozyme: malformed matrix: {e.message}") from None
                where[:] = "upstream", f"failure: {type(e).__name__}: {e}"
                record_fallback(name, "failure", f"{type(e).__name__}: {e}")
                return upstream(*args, **kwargs)
            except (BadInput, AutozymeFallbackError, Interrupted) as e:
                where[:] = "autozyme", f"raised {type(e).__name__}"
                raise
            except PassThrough as e:
                where[:] = "autozyme", f"raised {type(e.error).__name__}, as upstream does"
                raise e.error from None
            except Exception as e:  # noqa: BLE001 - the user's call must not fail because of us
                where[:] = "upstream", f"failure: unexpected {type(e).__name__} in the fast path"
                return _upstream_after_unexpected(name, e, upstream, args, kwargs)
            where[:] = "autozyme", None
            with _lock:
                served[name] += 1
            if check:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the user saw the call's warnings once
                    _pure.on = True
                    try:
                        up_result = upstream(*up_args, **up_kwargs)
                    finally:
                        _pure.on = False
                verify.compare_calls(name, args, result, up_args, up_result)
            return result
        finally:
            seconds = time.perf_counter() - start
            if profile.recording():
                profile.record(name, where[0], where[1], seconds)
            _log(name, where[0], where[1], seconds)

    wrapper.__autozyme_upstream__ = upstream
    wrapper.__autozyme_verified__ = tuple(verified)
    return wrapper


def _log(name: str, ran: str, reason: str | None, seconds: float) -> None:
    """Where the call ran, through scanpy's logging at the user's verbosity: a hint
    when autozyme served it, info when upstream did (and why)."""
    import sys

    sc_logging = sys.modules.get("scanpy.logging")
    settings = sys.modules.get("scanpy._settings")
    if sc_logging is None or settings is None:
        return
    try:
        verbosity = int(settings.settings.verbosity)
        if ran == "autozyme" and reason is None:
            if verbosity >= 3:
                sc_logging.hint(f"autozyme served {name} ({seconds:.3f} s)")
        elif verbosity >= 2:
            sc_logging.info(f"autozyme: {name} ran in {ran}: {reason}")
    except Exception:  # noqa: BLE001 - a log line never changes a call's outcome
        pass


def _upstream_after_unexpected(name, error, upstream, args, kwargs):
    try:
        result = upstream(*args, **kwargs)
    except Exception:
        # Upstream refuses this input as well: its error is the user's answer.
        with _lock:
            fallbacks[name][f"delegated: upstream raises too ({type(error).__name__} in the fast path)"] += 1
        raise
    record_fallback(name, "failure", f"unexpected {type(error).__name__} in the fast path: {error}")
    return result


def counts() -> dict:
    with _lock:
        return dict(
            served=dict(served),
            fallbacks={k: dict(v) for k, v in fallbacks.items()},
        )


def reset_counts() -> None:
    with _lock:
        served.clear()
        fallbacks.clear()
