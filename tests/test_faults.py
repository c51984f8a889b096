"""Faults injected inside the daemon: it SIGKILLs itself at a chosen phase of a
chosen request (daemon/src/faults.rs; test hooks only). Whatever the phase and
however the data travels, the call returns upstream's result, the next call is
served (by a restarted daemon), and no segment outlives the sweep."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from _data import assert_identical
from autozyme import client as client_mod
from autozyme import fallback, runtime, shm


def random_counts(big, seed=0):
    """Big: more stored values than one wave of a kernel (4.2 M), so a kill "inside
    a kernel" lands with part of the output written."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    n_cells = 25_000 if big else 2_000
    x = sp.random(n_cells, 1_800, density=0.1, format="csr", dtype=np.float32, random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 30, k).astype(np.float32))
    return ad.AnnData(x)


def segments_of(pid: int) -> list[str]:
    prefix = f"azm_{os.geteuid()}_{pid}_"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


@pytest.fixture
def killable(monkeypatch):
    d = tempfile.mkdtemp(prefix="azm-fault-")
    flag = Path(d) / "kill.flag"
    monkeypatch.setenv("AUTOZYME_RUNTIME_DIR", d)
    monkeypatch.setenv("AUTOZYME_TEST_HOOKS", "1")
    monkeypatch.setenv("AUTOZYME_STRICT", "0")
    old = client_mod._client
    client_mod._set_client(client_mod.Client())
    from autozyme.patches import highly_variable_genes as hvg

    # No kept hvg result from an earlier test may spare a call its requests.
    monkeypatch.setattr(hvg, "_kept", hvg._Kept(hvg.KEPT_RESULTS))

    def arm(request, phase):
        monkeypatch.setenv("AUTOZYME_TEST_KILL_AT", f"{request}:{phase}:{flag}")
        flag.touch()
        return flag

    yield arm
    client_mod.get_client().shutdown()
    runtime.terminate_daemon()
    client_mod._set_client(old)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("transport", ["peer memory", "shared memory"])
@pytest.mark.parametrize("phase", ["received", "kernel", "reply"])
@pytest.mark.parametrize("request_name", ["RowSums", "DivideRows"])
def test_daemon_killed_at_each_phase(killable, monkeypatch, request_name, phase, transport):
    import scanpy as sc

    import autozyme

    flag = killable(request_name, phase)
    monkeypatch.setattr(shm, "reserve", lambda nbytes: transport == "shared memory")
    autozyme.activate("scanpy", prewarm=False)
    try:
        victim = client_mod.get_client().connection().hello.pid
        fallback.reset_counts()
        a, b = random_counts(phase == "kernel"), random_counts(phase == "kernel")
        sc.pp.normalize_total.__autozyme_upstream__(a, target_sum=1e4)
        sc.pp.normalize_total(b, target_sum=1e4)
        assert not flag.exists(), "the daemon did not reach the fault"
        deadline = time.monotonic() + 10  # SIGKILLed; reaped a moment later
        while runtime.pid_alive(victim) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not runtime.pid_alive(victim)
        assert_identical(a.X, b.X)
        first = "served" if fallback.counts()["served"].get("normalize_total") else "fell back"
        # The next call is served by a new daemon, exactly.
        fallback.reset_counts()
        sc.pp.normalize_total.__autozyme_upstream__(a)
        sc.pp.normalize_total(b)
        assert_identical(a.X, b.X)
        assert fallback.counts()["served"].get("normalize_total") == 1, fallback.counts()
        print(f"killed at {request_name}:{phase} ({transport}): call {first} exactly, next call served")
    finally:
        autozyme.deactivate()
    del a, b
    gc.collect()
    shm.clear_pool()
    # The dead daemon's own segments (its lending pool) go with the next sweep.
    deadline = time.monotonic() + 30
    while segments_of(victim) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert segments_of(victim) == []
    assert segments_of(os.getpid()) == []


def test_request_beyond_the_memory_budget_falls_back_with_a_clear_reason(killable, monkeypatch):
    """AUTOZYME_MAX_BYTES caps what the daemon allocates for one request: beyond
    it the daemon answers TooLarge (it never grows into the OOM killer), and the
    call runs upstream, with the reason counted."""
    import scanpy as sc

    import autozyme

    monkeypatch.setenv("AUTOZYME_MAX_BYTES", "100000")
    monkeypatch.setattr(shm, "reserve", lambda nbytes: False)  # peer memory: copied in
    autozyme.activate("scanpy", prewarm=False)
    try:
        fallback.reset_counts()
        a, b = random_counts(False), random_counts(False)
        sc.pp.normalize_total.__autozyme_upstream__(a, target_sum=1e4)
        sc.pp.normalize_total(b, target_sum=1e4)
        assert_identical(a.X, b.X)
        reasons = fallback.counts()["fallbacks"]["normalize_total"]
        print(f"budget 100000 bytes, input {b.X.data.nbytes} bytes: {reasons}")
        assert any("budget" in r for r in reasons), reasons
        assert client_mod.get_client().call(client_mod.msg("Ping")).tag == "Pong"
    finally:
        autozyme.deactivate()


@pytest.mark.parametrize("request_name", ["RowSums", "DivideRows"])
def test_kernel_outliving_the_client_timeout(killable, monkeypatch, request_name):
    """The daemon stalls 3 s inside a request, past the client's 1 s timeout: the
    call runs upstream, the daemon finishes on its own and keeps serving, and its
    late writes land nowhere a later call reads (those segments are quarantined)."""
    import scanpy as sc

    import autozyme

    flag = killable(request_name, "received")
    monkeypatch.setenv("AUTOZYME_TEST_KILL_AT", f"{request_name}:received:{flag}:3000")
    monkeypatch.setattr(shm, "reserve", lambda nbytes: True)  # shared memory: late writes possible
    autozyme.activate("scanpy", prewarm=False)
    try:
        pid = client_mod.get_client().connection().hello.pid
        fallback.reset_counts()
        monkeypatch.setenv("AUTOZYME_TIMEOUT", "1")
        a, b = random_counts(False), random_counts(False)
        sc.pp.normalize_total.__autozyme_upstream__(a, target_sum=1e4)
        sc.pp.normalize_total(b, target_sum=1e4)
        assert_identical(a.X, b.X)
        reasons = fallback.counts()["fallbacks"]["normalize_total"]
        assert any("no reply within" in r for r in reasons), reasons
        monkeypatch.setenv("AUTOZYME_TIMEOUT", "600")
        # Calls right away, while the stalled request is still going to write.
        for seed in range(4):
            c, d = random_counts(False, seed), random_counts(False, seed)
            sc.pp.normalize_total.__autozyme_upstream__(c)
            sc.pp.normalize_total(d)
            time.sleep(0.5)
            assert_identical(c.X, d.X)
        assert client_mod.get_client().connection().hello.pid == pid
        print(f"stalled {request_name} 3 s past a 1 s timeout: {reasons}; daemon {pid} kept serving")
    finally:
        autozyme.deactivate()


@pytest.mark.parametrize("transport", ["peer memory", "shared memory"])
def test_client_killed_in_the_middle_of_a_call(killable, tmp_path, transport):
    """A notebook kernel dies (SIGKILL) while the daemon works on its DivideRows:
    the daemon finishes or abandons the work (the peer is gone), keeps serving
    others, and the dead client's segments are swept."""
    import signal
    import subprocess
    import sys

    flag = killable("DivideRows", "received")
    os.environ["AUTOZYME_TEST_KILL_AT"] += ":1500"  # stall 1.5 s: the client dies meanwhile
    code = (
        "import sys, numpy as np, scipy.sparse as sp, anndata as ad, scanpy as sc, autozyme\n"
        "from autozyme import shm\n"
        f"shm.reserve = lambda nbytes: {transport == 'shared memory'}\n"
        "autozyme.activate('scanpy', prewarm=False)\n"
        "x = ad.AnnData(sp.random(2000, 500, density=0.1, format='csr', dtype=np.float32))\n"
        "print('calling', flush=True)\n"
        "sc.pp.normalize_total(x)\n"
        "print('returned', flush=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "calling"
    deadline = time.monotonic() + 30
    while flag.exists() and time.monotonic() < deadline:  # the daemon reached the stall
        time.sleep(0.01)
    stalled = runtime.daemon_pid_from_file()
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    victim = p.pid
    # The daemon (the same one) serves this process next.
    pid = client_mod.get_client().connection().hello.pid
    assert pid == stalled
    import scanpy as sc

    import autozyme

    autozyme.activate("scanpy", prewarm=False)
    try:
        a, b = random_counts(False), random_counts(False)
        sc.pp.normalize_total.__autozyme_upstream__(a)
        sc.pp.normalize_total(b)
        assert_identical(a.X, b.X)
        assert client_mod.get_client().connection().hello.pid == pid
    finally:
        autozyme.deactivate()
    deadline = time.monotonic() + 30
    while segments_of(victim) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert segments_of(victim) == []
    print(f"client {victim} killed mid-DivideRows ({transport}): daemon {pid} kept serving, "
          "its segments swept")


OTHER_CALLS = {
    "ScaleStats": ("scale", lambda sc, ad: sc.pp.scale(ad, max_value=8)),
    "ScaleApply": ("scale", lambda sc, ad: sc.pp.scale(ad, max_value=8)),
    "HvgMeanVar": ("highly_variable_genes", lambda sc, ad: sc.pp.highly_variable_genes(
        ad, flavor="seurat_v3", n_top_genes=50, batch_key="batch")),
    "Fingerprint": ("highly_variable_genes", lambda sc, ad: sc.pp.highly_variable_genes(
        ad, flavor="seurat_v3", n_top_genes=50, batch_key="batch")),
    "HvgBatchWelford": ("highly_variable_genes", lambda sc, ad: sc.pp.highly_variable_genes(
        ad, flavor="seurat_v3", n_top_genes=50, batch_key="batch")),
    "RankGenesGroups": ("rank_genes_groups", lambda sc, ad: sc.tl.rank_genes_groups(
        ad, "cluster", method="wilcoxon", pts=True)),
    "RankGenesGroupsGroupSums": ("rank_genes_groups", lambda sc, ad: sc.tl.rank_genes_groups(
        ad, "cluster", method="wilcoxon", pts=True)),
}


def sent_on_this_scanpy(request_name: str) -> bool:
    """Whether the installed scanpy's fast path sends this request (per the patch's record)."""
    from autozyme import versions
    from autozyme.patches import highly_variable_genes as hvg
    from autozyme.patches import rank_genes_groups as rgg

    if request_name in ("RankGenesGroups", "RankGenesGroupsGroupSums"):
        aggregate = versions.pick(rgg.UPSTREAM).aggregate_stats
        return aggregate == (request_name == "RankGenesGroupsGroupSums")
    if request_name == "HvgBatchWelford":
        return versions.pick(hvg.UPSTREAM).batch_stats == "welford"
    return True


@pytest.mark.parametrize("phase", ["received", "reply"])
@pytest.mark.parametrize("request_name", list(OTHER_CALLS))
def test_daemon_killed_in_the_other_calls(killable, request_name, phase):
    """The same kills in the requests of scale, hvg and rank_genes_groups: the
    call returns upstream's result and the next call is served."""
    import scanpy as sc

    import autozyme
    from _data import assert_same_anndata, counts

    if not sent_on_this_scanpy(request_name):
        pytest.skip(f"this scanpy's fast path sends no {request_name}")
    flag = killable(request_name, phase)
    name, call = OTHER_CALLS[request_name]
    autozyme.activate("scanpy", prewarm=False)
    try:
        for attempt in ("killed", "next"):
            a = counts(400, 300, seed=21, n_batches=3)
            b = a.copy()
            fallback.reset_counts()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call(sc_upstream(sc, name), a)
                call(sc, b)
            assert_same_anndata(a, b)
            with np.printoptions(threshold=sys.maxsize):  # uns results, in full
                assert repr(dict(a.uns)) == repr(dict(b.uns))
            if attempt == "killed":
                assert not flag.exists(), "the daemon did not reach the fault"
            else:
                assert fallback.counts()["served"].get(name) == 1, fallback.counts()
        print(f"killed at {request_name}:{phase}: {name} returned upstream's result, next call served")
    finally:
        autozyme.deactivate()


@pytest.mark.parametrize("phase", ["received", "reply"])
def test_daemon_killed_in_parallel_leiden(killable, phase):
    """Leiden's parallel mode (its own labels, not upstream's): a killed call
    returns either upstream's labels (fallback) or, resent to a restarted daemon
    (the request is idempotent), the labels an undisturbed daemon gives; the
    next call is served and gives those."""
    import anndata as ad
    import scanpy as sc

    import autozyme

    rng = np.random.default_rng(5)
    n = 600
    centers = rng.integers(0, 6, n)
    rows = np.repeat(np.arange(n), 8)
    cols = np.array([rng.choice(np.flatnonzero(centers == centers[i]), 8) for i in range(n)]).ravel()
    g = sp.csr_matrix((rng.random(rows.size).astype(np.float32) + 0.1, (rows, cols)), shape=(n, n))
    g = g.maximum(g.T).tocsr()

    def labels(run):
        adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
        adata.obsp["connectivities"] = g.copy()
        adata.uns["neighbors"] = {"connectivities_key": "connectivities", "params": {}}
        run(adata, flavor="igraph", n_iterations=2, random_state=3)
        return adata.obs["leiden"].astype(str).to_numpy()

    autozyme.activate("scanpy", prewarm=False)
    autozyme.configure(leiden="parallel")
    try:
        upstream = labels(sc.tl.leiden.__autozyme_upstream__)
        undisturbed = labels(sc.tl.leiden)
        client_mod.get_client().shutdown()  # the next daemon starts with the fault armed
        flag = killable("Leiden", phase)
        fallback.reset_counts()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            killed = labels(sc.tl.leiden)
        assert not flag.exists(), "the daemon did not reach the fault"
        resent = fallback.counts()["served"].get("leiden", 0) == 1
        assert np.array_equal(killed, undisturbed if resent else upstream)
        assert np.array_equal(labels(sc.tl.leiden), undisturbed)
        assert fallback.counts()["served"].get("leiden") == 1 + resent, fallback.counts()
        how = "resent to a restarted daemon" if resent else "upstream's labels returned"
        print(f"killed at Leiden:{phase}: {how}, next call served")
    finally:
        from autozyme import settings

        settings.reset()
        autozyme.deactivate()


def sc_upstream(sc, name):
    """A stand-in for the ``sc`` module whose pp/tl function ``name`` is upstream's."""
    import types

    fn = getattr(sc.pp, name, None) or getattr(sc.tl, name)
    up = fn.__autozyme_upstream__
    ns = types.SimpleNamespace(**{name: up})
    return types.SimpleNamespace(pp=ns, tl=ns)
