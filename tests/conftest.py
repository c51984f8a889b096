"""Integration tests run a real daemon, started by the shim the way a user's
notebook starts it, in a private runtime dir; upstream scanpy is the oracle."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_RUNTIME = tempfile.mkdtemp(prefix="azm-test-")
os.environ["AUTOZYME_RUNTIME_DIR"] = _RUNTIME
os.environ.setdefault("AUTOZYME_STRICT", "1")
os.environ.setdefault("AUTOZYME_IDLE_TIMEOUT", "300")
# activate() starts the warm worker for neighbors and umap in the background: only
# the tests about it want one (test_warm.py turns it on), not every activating test
# and subprocess, each a warm-up of a minute of CPU beside the tests.
os.environ.setdefault("AUTOZYME_WARM", "0")


@pytest.fixture(scope="session", autouse=True)
def _daemon_session():
    yield
    from autozyme.client import get_client

    get_client().shutdown()
    from autozyme import runtime

    runtime.terminate_daemon()
    shutil.rmtree(_RUNTIME, ignore_errors=True)


@pytest.fixture(scope="session")
def runtime_dir():
    return _RUNTIME


@pytest.fixture
def active():
    """autozyme active; yields (fast, upstream) lookups by scanpy name."""
    import scanpy as sc

    import autozyme
    from autozyme import fallback

    autozyme.activate("scanpy", prewarm=False)
    fallback.reset_counts()
    yield sc
    autozyme.deactivate()
