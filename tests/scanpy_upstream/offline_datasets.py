"""pytest plugin: serve scanpy's downloadable datasets from local files.

Loaded by run_scanpy_tests.py (`-p offline_datasets --scanpy-datasets-from=DIR`, with
this directory on PYTHONPATH) in every run, with or without autozyme.

scanpy's loaders (``sc.datasets.pbmc3k()`` and the like) read
``settings.datasetdir / <file>`` and download the file only when it is missing.
scanpy's own test plugin (``testing.scanpy._pytest``, autouse fixture
``original_settings``) points ``settings.datasetdir`` at the pytest cache directory
``scanpy-data`` before every test, so setting ``datasetdir`` ourselves would be undone.
Instead, at configure time this plugin links every file of DIR into exactly that
directory (``config.cache.mkdir("scanpy-data")``); the loaders then find them and never
touch the network. DIR is where run_scanpy_tests.py wrote the pbmc3k stand-in
(pbmc3k_standin.py).

Must not import scanpy (testing.scanpy._pytest asserts it is not imported yet when it
loads, and `-p` plugins on the command line may load before it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--scanpy-datasets-from",
        metavar="DIR",
        default=None,
        help="link the files of DIR into the directory scanpy's tests use as settings.datasetdir",
    )


@pytest.hookimpl(trylast=True)  # after the cacheprovider has set config.cache
def pytest_configure(config: pytest.Config) -> None:
    src = config.getoption("--scanpy-datasets-from")
    if not src or hasattr(config, "workerinput"):
        return  # pytest-xdist workers: the controller has linked them already
    cache = getattr(config, "cache", None)
    if cache is None:
        msg = "--scanpy-datasets-from needs pytest's cacheprovider (scanpy's fixtures use it too)"
        raise pytest.UsageError(msg)
    dest = Path(cache.mkdir("scanpy-data"))
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or f.name.endswith(".stamp"):
            continue
        link = dest / f.name
        target = f.resolve()
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        # replaces a stale link (or a file left there) atomically, so runs started
        # at the same time on the same cache do not trip over each other
        tmp = dest / f".{f.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)
