"""sc.pp.neighbors and sc.tl.umap through the warm worker (a real worker process,
real sockets) give what upstream gives in a fresh process, bit for bit: every
obsp/obsm/uns entry, on both sides of the 4096-cell switch to pynndescent,
float32/float64, use_rep/n_pcs, one and two threads. Out-of-scope calls and a
killed worker fall back (strict mode raises)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
import _warm_cases  # noqa: E402


@pytest.fixture(scope="session")
def upstream_results(tmp_path_factory):
    """Upstream's results for every case, from one fresh process (started first:
    it compiles while the worker warms up)."""
    out = tmp_path_factory.mktemp("warm") / "upstream.pkl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOZYME")}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_warm_cases.py"), str(out)],
                            env=env)
    yield lambda: (proc.wait() == 0 and pickle.loads(out.read_bytes()))
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def warm_worker(upstream_results):
    from autozyme.warm import client

    os.environ["AUTOZYME_WARM"] = "1"
    # The float64 cases are on the exact (sklearn) path: the worker compiles their
    # few kernels on request; its float64 pynndescent stage would only cost time here.
    os.environ["AUTOZYME_WARM_DTYPES"] = "float32"
    st = client.wait_warm(timeout=900)
    assert st is not None and st["state"] == "warm", st
    yield st
    client.stop()


@pytest.fixture
def warm(active, warm_worker):
    return active


def same(a, b, where):
    assert type(a) is type(b), where
    if sp.issparse(a):
        assert a.format == b.format and a.dtype == b.dtype and a.shape == b.shape, where
        for part in ("indptr", "indices", "data"):
            assert np.array_equal(getattr(a, part), getattr(b, part)), f"{where}.{part}"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=True), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("index", range(len(_warm_cases.CASES)), ids=[c[0] for c in _warm_cases.CASES])
def test_bit_identical_to_fresh_upstream(warm, upstream_results, index):
    from autozyme import fallback

    case = _warm_cases.CASES[index]
    got = _warm_cases.run_case(warm, case, index)
    served = fallback.counts()["served"]
    assert served.get("neighbors") == 1, fallback.counts()
    assert served.get("umap", 0) == (case[7] is not None), fallback.counts()
    if case[7] is not None:  # umap's layout ran in the daemon, not in numba
        import autozyme

        layouts = autozyme.status()["warm_worker"]["umap_layout"]
        assert set(layouts) == {"served"}, layouts
    expected = upstream_results()
    assert expected, "the upstream subprocess failed"
    same(got, expected[case[0]], case[0])


def test_writes_back_into_the_users_objects(warm):
    """New entries are assigned; an existing uns entry is replaced as upstream does."""
    a = _warm_cases.make_adata(600, 20, np.float32, "X_pca", 7)
    a.uns["neighbors"] = {"old": 1}
    warm.pp.neighbors(a, n_neighbors=5)
    assert set(a.uns["neighbors"]) >= {"params", "connectivities_key", "distances_key"}
    assert "old" not in a.uns["neighbors"]
    assert a.obsp["distances"].shape == (600, 600)
    import autozyme

    st = autozyme.status()
    assert st["warm_worker"]["state"] == "warm" and st["warm_worker"]["served"] >= 1, st["warm_worker"]
    assert "warm worker (neighbors, umap): pid" in autozyme.format_status(st)


def test_out_of_scope_falls_back_and_strict_raises(warm, monkeypatch):
    from autozyme import AutozymeFallbackError, fallback

    a = _warm_cases.make_adata(300, 10, np.float32, "X_pca", 1)
    with pytest.raises(AutozymeFallbackError, match="transformer"):
        warm.pp.neighbors(a, transformer="sklearn")
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    warm.pp.neighbors(a, transformer="sklearn")
    warm.pp.neighbors(a[:100])  # a view
    warm.pp.neighbors(a, copy=True)
    with pytest.raises(TypeError):
        warm.pp.neighbors(a, no_such_argument=1)  # upstream's own error
    reasons = fallback.counts()["fallbacks"]["neighbors"]
    assert any("transformer" in r for r in reasons) and any("view" in r for r in reasons), reasons
    assert any("copy=True" in r for r in reasons), reasons


def test_killed_worker_falls_back_then_a_new_one_starts(warm, monkeypatch):
    """Last: it replaces the session's worker with one that is still warming."""
    from autozyme import AutozymeFallbackError, fallback
    from autozyme.warm import client

    # activate() (the `warm` fixture) starts the worker in a background thread when
    # none answers; on a loaded machine that thread may run only after the kill
    # below and start a new worker, which makes the call "starting", not a failure.
    for t in list(client._starting):
        t.join()
    monkeypatch.setenv("AUTOZYME_STRICT", "1")
    pid = client.status()["pid"]
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while client.status() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    a = _warm_cases.make_adata(300, 10, np.float32, "X_pca", 1)
    # Strict mode: a failure naming the worker, or, when a new worker is already
    # being started (by this process's background start, or a spawn moments ago),
    # the call runs here as delegated ("starting"). Never a wrong or missing result.
    try:
        warm.pp.neighbors(a)
    except AutozymeFallbackError as e:
        assert "warm worker" in str(e)
    else:
        assert any("warm worker is starting" in r for r in fallback.counts()["fallbacks"]["neighbors"])
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    warm.pp.neighbors(a)  # upstream, here
    assert "distances" in a.obsp
    assert any("warm worker" in r for r in fallback.counts()["fallbacks"]["neighbors"])
    # The new worker runs at the lowest priority (its process and its session's
    # autogroup), so on a loaded machine it may take minutes to listen.
    deadline = time.monotonic() + 600
    st = None
    while st is None and time.monotonic() < deadline:
        st = client.status()
        time.sleep(0.2)
    assert st is not None and st["pid"] != pid, st
    assert client.stop()
