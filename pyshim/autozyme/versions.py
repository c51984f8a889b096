"""Which scanpy this process runs, and whether a patch reproduces it.

Each patch declares, in one place at its top, the scanpy versions it reproduces
(``VERIFIED``) and, where upstream's behaviour differs between them, one record
per version (``UPSTREAM``: version -> a frozen dataclass of the differences).
The fast path asks :func:`pick` for the record of the installed scanpy and
branches on its fields; no other code compares version strings.
"""

from __future__ import annotations

import functools
import os
from typing import TypeVar

T = TypeVar("T")


@functools.lru_cache(maxsize=1)
def scanpy_version() -> str:
    from importlib.metadata import version

    return version("scanpy")


def allow_unverified() -> bool:
    return os.environ.get("AUTOZYME_ALLOW_UNVERIFIED", "") not in ("", "0")


def _key(version: str) -> tuple:
    """A sortable key for a release string ("1.12.4", "1.12.0rc1" sorts before "1.12.0")."""
    from packaging.version import Version

    return (Version(version),)


def problem(verified, version: str | None = None) -> str | None:
    """Why a patch that reproduces ``verified`` must not serve this scanpy, or None."""
    version = scanpy_version() if version is None else version
    if version in verified or allow_unverified():
        return None
    return (
        f"scanpy {version} is not verified (verified: {', '.join(sorted(verified, key=_key))}); "
        "set AUTOZYME_ALLOW_UNVERIFIED=1 to opt in"
    )


def pick(upstream: dict[str, T], version: str | None = None) -> T:
    """The record of upstream's behaviour for the installed scanpy.

    An unverified version (served only when the user opted in) gets the newest
    declared version not newer than it, else the oldest declared."""
    version = scanpy_version() if version is None else version
    if version in upstream:
        return upstream[version]
    declared = sorted(upstream, key=_key)
    older = [v for v in declared if _key(v) <= _key(version)]
    return upstream[older[-1] if older else declared[0]]
