#!/usr/bin/env python3
"""Fetch scanpy's own test suite from the scanpy 1.11.5 sdist on PyPI.

Downloads the sdist (only the .tar.gz; no wheel is built, nothing is installed)
into ``.cache/scanpy-sdist/`` at the repo root and extracts the upstream
``tests/`` directory (test modules, ``conftest.py`` and the ``_data`` files the
tests read) into ``.cache/scanpy-tests-1.11.5/tests/``.

The tests' other helpers (``testing.scanpy._pytest`` and
``testing.scanpy._helpers``) are *not* taken from the sdist: scanpy's wheel
installs them as the top-level ``testing`` package, so the tests run against
the installed scanpy and its installed helpers.

Idempotent: does nothing when the extracted tree is already complete. Run from
anywhere; paths are resolved relative to this file.

    python tests/scanpy_upstream/fetch_scanpy_tests.py [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SCANPY_VERSION = "1.11.5"
SDIST_NAME = f"scanpy-{SCANPY_VERSION}.tar.gz"
# sha256 of the file PyPI serves for scanpy==1.11.5 (PyPI files are immutable).
SDIST_SHA256 = "b2ef5476dfb1144b7dd0fae90b0198699c7988e6b27f083904150642c7ba6b89"

REPO_ROOT = Path(__file__).resolve().parents[2]
SDIST_DIR = REPO_ROOT / ".cache" / "scanpy-sdist"
TESTS_ROOT = REPO_ROOT / ".cache" / f"scanpy-tests-{SCANPY_VERSION}"
# Written last; its content is the sdist hash, so a half-finished or stale
# extraction is redone.
MARKER = TESTS_ROOT / ".complete"

# Members of the sdist to extract, relative to its top directory.
EXTRACT_PREFIXES = ("tests/",)


def log(msg: str) -> None:
    print(f"[fetch_scanpy_tests] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist() -> Path:
    """Return the path of the verified sdist, downloading it with pip if needed."""
    sdist = SDIST_DIR / SDIST_NAME
    if sdist.is_file() and sha256(sdist) == SDIST_SHA256:
        return sdist
    if sdist.exists():
        log(f"{sdist} has the wrong sha256; downloading again")
        sdist.unlink()
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    # Download into a scratch dir first so an interrupted download never
    # leaves a partial file in the cache.
    with tempfile.TemporaryDirectory(dir=SDIST_DIR) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps",
            "--no-binary", ":all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest", tmp,
            f"scanpy=={SCANPY_VERSION}",
        ]  # fmt: skip
        # pip only reads the sdist's metadata here (it may set up hatchling in a
        # throwaway build env to do so); it builds no wheel and installs nothing.
        log("downloading " + SDIST_NAME + " with: " + " ".join(cmd[1:]))
        subprocess.run(cmd, check=True)
        got = Path(tmp) / SDIST_NAME
        if not got.is_file():
            msg = f"pip did not produce {SDIST_NAME}; got {sorted(p.name for p in Path(tmp).iterdir())}"
            raise SystemExit(msg)
        digest = sha256(got)
        if digest != SDIST_SHA256:
            msg = f"sha256 mismatch for {SDIST_NAME}: expected {SDIST_SHA256}, got {digest}"
            raise SystemExit(msg)
        got.replace(sdist)
    return sdist


def extract(sdist: Path) -> None:
    top = f"scanpy-{SCANPY_VERSION}/"
    staging = TESTS_ROOT.with_name(TESTS_ROOT.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    n = 0
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(top):
                continue
            rel = m.name[len(top) :]
            if not rel.startswith(EXTRACT_PREFIXES):
                continue
            if not (m.isfile() or m.isdir()):
                continue  # no links/devices from an archive
            if rel.startswith("/") or ".." in Path(rel).parts:
                msg = f"refusing unsafe path in sdist: {m.name!r}"
                raise SystemExit(msg)
            m.name = rel
            members.append(m)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(staging, members=members, filter="data")
        else:
            tar.extractall(staging, members=members)  # noqa: S202 (checked above)
        n = sum(1 for m in members if m.isfile())
    if TESTS_ROOT.exists():
        shutil.rmtree(TESTS_ROOT)
    staging.rename(TESTS_ROOT)
    MARKER.write_text(SDIST_SHA256 + "\n")
    log(f"extracted {n} files into {TESTS_ROOT.relative_to(REPO_ROOT)}")


def is_complete() -> bool:
    return MARKER.is_file() and MARKER.read_text().strip() == SDIST_SHA256


def fetch(*, force: bool = False) -> Path:
    """Make sure the upstream tests are extracted; return the extraction root."""
    if force or not is_complete():
        extract(download_sdist())
    return TESTS_ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="re-extract even if present")
    args = p.parse_args(argv)
    root = fetch(force=args.force)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
