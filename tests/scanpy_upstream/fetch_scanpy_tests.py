#!/usr/bin/env python3
"""Fetch scanpy's own test suite from the sdist of the installed scanpy version on PyPI.

Reads the installed scanpy's version (importlib.metadata, without importing
scanpy), downloads that version's sdist (only the .tar.gz; no wheel is built,
nothing is installed) into ``.cache/scanpy-sdist/`` at the repo root, checks it
against the sha256 recorded in ``SDIST_SHA256`` below, and extracts the upstream
``tests/`` directory (test modules, ``conftest.py`` and the ``_data`` files the
tests read) into ``.cache/scanpy-tests-<version>/tests/``. A version without a
recorded sha256 is refused: its tests have not been mapped either (see
run_scanpy_tests.py).

The tests' other helpers (``testing.scanpy._pytest`` and
``testing.scanpy._helpers``) are *not* taken from the sdist: scanpy's wheel
installs them as the top-level ``testing`` package, so the tests run against
the installed scanpy and its installed helpers.

Idempotent: does nothing when the extracted tree is already complete. Run from
anywhere; paths are resolved relative to this file.

    python tests/scanpy_upstream/fetch_scanpy_tests.py [--force] [--version X.Y.Z]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path

# sha256 of the sdist PyPI serves for each scanpy version whose tests we run (PyPI
# files are immutable). The one table of supported versions: add a version here,
# and its FUNCTION_TESTS entry, pytest-<version>.{ini,toml} and deselect-<version>.txt.
SDIST_SHA256: dict[str, str] = {
    "1.11.5": "b2ef5476dfb1144b7dd0fae90b0198699c7988e6b27f083904150642c7ba6b89",
    "1.12.4": "b87a5b1413ab33b69691df69c2084ff4ea8b389728e1542b22145825f88b5037",
}

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
SDIST_DIR = CACHE_DIR / "scanpy-sdist"

# Members of the sdist to extract, relative to its top directory.
EXTRACT_PREFIXES = ("tests/",)


def installed_scanpy_version() -> str:
    """The version of the scanpy distribution installed for this interpreter."""
    try:
        return dist_version("scanpy")
    except PackageNotFoundError:
        msg = f"scanpy is not installed for {sys.executable}"
        raise SystemExit(msg) from None


def check_supported(version: str) -> str:
    if version not in SDIST_SHA256:
        msg = (
            f"scanpy {version} is not supported by tests/scanpy_upstream "
            f"(known: {', '.join(SDIST_SHA256)}); record its sdist sha256 in "
            "fetch_scanpy_tests.py and map its tests in run_scanpy_tests.py"
        )
        raise SystemExit(msg)
    return version


def tests_root(version: str) -> Path:
    """Where the tests of scanpy `version` are extracted."""
    return CACHE_DIR / f"scanpy-tests-{version}"


def log(msg: str) -> None:
    print(f"[fetch_scanpy_tests] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(version: str) -> Path:
    """Return the path of the verified sdist, downloading it with pip if needed."""
    sdist_name = f"scanpy-{version}.tar.gz"
    expected = SDIST_SHA256[version]
    sdist = SDIST_DIR / sdist_name
    if sdist.is_file() and sha256(sdist) == expected:
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
            f"scanpy=={version}",
        ]  # fmt: skip
        # pip only reads the sdist's metadata here (it may set up hatchling in a
        # throwaway build env to do so); it builds no wheel and installs nothing.
        log("downloading " + sdist_name + " with: " + " ".join(cmd[1:]))
        subprocess.run(cmd, check=True)
        got = Path(tmp) / sdist_name
        if not got.is_file():
            msg = f"pip did not produce {sdist_name}; got {sorted(p.name for p in Path(tmp).iterdir())}"
            raise SystemExit(msg)
        digest = sha256(got)
        if digest != expected:
            msg = f"sha256 mismatch for {sdist_name}: expected {expected}, got {digest}"
            raise SystemExit(msg)
        got.replace(sdist)
    return sdist


def extract(sdist: Path, version: str) -> None:
    top = f"scanpy-{version}/"
    root = tests_root(version)
    staging = root.with_name(root.name + ".partial")
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
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    # Written last; its content is the sdist hash, so a half-finished or stale
    # extraction is redone.
    marker(version).write_text(SDIST_SHA256[version] + "\n")
    log(f"extracted {n} files into {root.relative_to(REPO_ROOT)}")


def sdist_pytest_config(version: str) -> dict:
    """scanpy `version`'s own pytest table, read from its (verified) sdist's pyproject.toml:
    `[tool.pytest.ini_options]` or, from 1.12 on, `[tool.pytest]`."""
    import tomllib

    sdist = download_sdist(version)
    with tarfile.open(sdist, "r:gz") as tar:
        f = tar.extractfile(f"scanpy-{version}/pyproject.toml")
        if f is None:
            msg = f"no pyproject.toml in {sdist.name}"
            raise SystemExit(msg)
        tool_pytest = tomllib.load(f).get("tool", {}).get("pytest", {})
    return tool_pytest.get("ini_options") or {
        k: v for k, v in tool_pytest.items() if k != "ini_options"
    }


def marker(version: str) -> Path:
    return tests_root(version) / ".complete"


def is_complete(version: str) -> bool:
    m = marker(version)
    return m.is_file() and m.read_text().strip() == SDIST_SHA256[version]


def fetch(version: str | None = None, *, force: bool = False) -> Path:
    """Make sure the tests of scanpy `version` (default: the installed one) are
    extracted; return the extraction root."""
    version = check_supported(version or installed_scanpy_version())
    if force or not is_complete(version):
        extract(download_sdist(version), version)
    return tests_root(version)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="re-extract even if present")
    p.add_argument(
        "--version",
        choices=list(SDIST_SHA256),
        help="scanpy version whose tests to fetch (default: the installed one)",
    )
    args = p.parse_args(argv)
    root = fetch(args.version, force=args.force)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
