"""autozyme on a real dask.distributed cluster: two worker processes under Nannies,
each with its own runtime dir, hence its own daemon (two "machines" on one).

- The worker plugin activates autozyme on every worker with the client's
  AUTOZYME_STRICT, and leaves each worker's runtime dir its own.
- Chunk tasks on each worker are served by that worker's daemon, and
  ``autozyme.status()`` on the client sums the workers' counts.
- Faults: a worker process killed mid-computation (Dask reruns its tasks) and a
  daemon killed under a worker: the result stays exact, and no segment of the
  killed worker outlives the sweep.

The chunk function here is a test's own: a ``RowSums`` request on a CSR chunk,
under ``autozyme.dask.chunks.run``'s fallback contract, with integer-valued data
so the daemon's f64 sums and numpy's are equal whatever the order.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

da = pytest.importorskip("dask.array")
pytest.importorskip("distributed")
pytest.importorskip("scanpy")
from importlib.metadata import version  # noqa: E402

if tuple(int(p) for p in version("scanpy").split(".")[:2]) < (1, 12):
    pytest.skip("dask paths are served on scanpy >= 1.12 only", allow_module_level=True)

import cloudpickle  # noqa: E402

import autozyme  # noqa: E402
from autozyme import fallback  # noqa: E402
from autozyme.dask import chunks  # noqa: E402
from autozyme.dask import cluster as azm_cluster  # noqa: E402

# Workers unpickle this module's chunk functions without importing it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CALL = "cluster test row sums"
CHUNK_COUNTER = chunks.counter_name(CALL)
N_WORKERS = 2


# --- the chunk function (runs in the worker processes) -----------------------------

def _row_sums_fast(x, place, marker_dir, pause):
    from autozyme.client import get_client
    from autozyme.codec import msg
    from autozyme.patches import _common

    # place=True copies the chunk into this worker's shared memory (segments
    # named after its pid), else the daemon reads the worker's own memory.
    matrix, *_keep = _common.csr_refs(x, with_indices=False, peer=not place)
    if marker_dir:
        # Tells the test this task is under way (and holds its segment).
        Path(marker_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    if pause:
        time.sleep(pause)
    reply = get_client().call(msg("RowSums", x=matrix, exclude_max_fraction=None))
    return np.asarray(reply.sums, dtype=np.float64).reshape(-1, 1)


def _row_sums_upstream(x, place, marker_dir, pause):  # noqa: ARG001 - same signature as fast
    return np.asarray(x.sum(axis=1, dtype=np.float64)).reshape(-1, 1)


def row_sums_chunk(x, place=False, marker_dir=None, pause=0.0):
    return chunks.run(CALL, _row_sums_fast, _row_sums_upstream, x, place, marker_dir, pause)


def dask_row_sums(x, **kw):
    return x.map_blocks(row_sums_chunk, **kw, dtype=np.float64, chunks=(x.chunks[0], (1,)),
                        meta=np.empty((0, 0), np.float64))


def counts_matrix(n_cells=600, n_genes=200, seed=0):
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=0.1, format="csr", dtype=np.float32, random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 30, k).astype(np.float32))
    x = sp.csr_matrix(x)
    x.data[x.indptr[5]:x.indptr[6]] = 0  # an all-zero cell
    x.eliminate_zeros()
    return x


def dask_csr(x, rows):
    """A dask array of CSR chunks spanning all genes."""
    dense = da.from_array(x.toarray(), chunks=(rows, -1))
    return dense.map_blocks(sp.csr_matrix, dtype=x.dtype, meta=sp.csr_matrix((0, 0), dtype=x.dtype))


def expected_row_sums(x):
    return np.asarray(x.sum(axis=1, dtype=np.float64)).reshape(-1, 1)


# --- helpers run on the workers ----------------------------------------------------

def _worker_env():
    return {k: os.environ.get(k) for k in ("AUTOZYME_STRICT", "AUTOZYME_RUNTIME_DIR", "AUTOZYMED")}


def _reset_counts():
    fallback.reset_counts()


def segments_of(pid: int) -> list[str]:
    prefix = f"azm_{os.geteuid()}_{pid}_"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def _stop_daemon(runtime_dir: str) -> None:
    """SIGTERM the daemon serving ``runtime_dir`` (it unlinks its pool on the way out)."""
    try:
        pid = int(Path(runtime_dir, "daemon.pid").read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() != "autozymed":
            return
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)


def wait_until(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def workers_status():
    w = autozyme.status()["workers"]
    assert w is not None
    return w


# --- the cluster ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, Nanny, Scheduler, SpecCluster

    base = tempfile.mkdtemp(prefix="azm-cluster-")
    dirs = {f"w{i}": os.path.join(base, f"w{i}") for i in range(N_WORKERS)}
    common = {
        # Workers start non-strict: strictness must come from the client, by the plugin.
        "AUTOZYME_STRICT": "0",
        "AUTOZYME_IDLE_TIMEOUT": "120",
        "AUTOZYME_THREADS": "1",
    }
    if os.environ.get("AUTOZYMED"):
        common["AUTOZYMED"] = os.environ["AUTOZYMED"]
    workers = {
        name: {"cls": Nanny, "options": {
            "nthreads": 1, "memory_limit": 0, "dashboard_address": ":0",
            "env": {**common, "AUTOZYME_RUNTIME_DIR": d},
        }}
        for name, d in dirs.items()
    }
    spec = SpecCluster(
        workers=workers,
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0", "dashboard": False}},
    )
    client = Client(spec)
    client.wait_for_workers(N_WORKERS)
    # The client here is strict (conftest), as a user's would be.
    assert os.environ.get("AUTOZYME_STRICT") == "1"
    autozyme.activate("scanpy", prewarm=False)  # registers the worker plugin
    try:
        yield client, dirs
    finally:
        autozyme.deactivate()
        client.close()
        spec.close()
        for d in dirs.values():
            _stop_daemon(d)
        shutil.rmtree(base, ignore_errors=True)


def test_plugin_activates_workers_with_client_settings(cluster):
    client, dirs = cluster
    env = client.run(_worker_env)
    assert len(env) == N_WORKERS
    # The client's strictness reached every worker; each keeps its own runtime dir.
    assert {e["AUTOZYME_STRICT"] for e in env.values()} == {"1"}
    assert sorted(e["AUTOZYME_RUNTIME_DIR"] for e in env.values()) == sorted(dirs.values())
    assert os.environ["AUTOZYME_RUNTIME_DIR"] not in dirs.values()
    w = workers_status()
    assert w["count"] == N_WORKERS and w["active"] == N_WORKERS


def test_each_worker_served_by_its_own_daemon(cluster):
    client, dirs = cluster
    client.run(_reset_counts)
    x = counts_matrix()
    # One task pinned to each worker, so both talk to their daemons whatever
    # the scheduler would choose; then a whole dask computation.
    sub = [x[i * 100:(i + 1) * 100] for i in range(N_WORKERS)]
    addrs = sorted(client.scheduler_info()["workers"])
    futs = [client.submit(row_sums_chunk, part, workers=[a], pure=False) for part, a in zip(sub, addrs)]
    for f, part in zip(futs, sub):
        assert np.array_equal(f.result(), expected_row_sums(part))
    got = dask_row_sums(dask_csr(x, 70)).compute()
    assert np.array_equal(got, expected_row_sums(x))

    w = workers_status()
    reps = list(w["by_worker"].values())
    assert len(reps) == N_WORKERS
    assert len({r["daemon_pid"] for r in reps}) == N_WORKERS, reps
    assert None not in {r["daemon_pid"] for r in reps}
    assert sorted(r["runtime_dir"] for r in reps) == sorted(dirs.values())
    for r in reps:
        assert r["served"].get(CHUNK_COUNTER, 0) >= 1, r
        assert r["daemon_requests_served"] >= 1, r
        assert r["fallbacks"] == {}, r
    # Every chunk (2 pinned + 9 of the array) was served, summed over the workers.
    assert w["served"][CHUNK_COUNTER] == 2 + 9
    text = autozyme.format_status()
    assert "dask workers: 2, autozyme active on 2" in text
    assert f"{CHUNK_COUNTER} 11" in text


def test_status_without_cluster_is_quiet():
    # No client in a fresh process: no workers entry, and distributed not imported.
    import subprocess

    code = ("import sys, autozyme; st = autozyme.status(); "
            "assert st['workers'] is None; assert 'distributed' not in sys.modules; "
            "autozyme.format_status(st)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_worker_killed_mid_computation(cluster):
    client, _ = cluster
    x = counts_matrix(seed=1)
    markers = tempfile.mkdtemp(prefix="azm-markers-")
    try:
        arr = dask_row_sums(dask_csr(x, 75), place=True, marker_dir=markers, pause=0.3)
        fut = client.compute(arr)
        first = wait_until(lambda: os.listdir(markers), what="a chunk task to start")
        victim = int(first[0].split("-")[0])
        # The task holds its chunk in shared memory named after the worker.
        assert segments_of(victim)
        os.kill(victim, signal.SIGKILL)
        got = fut.result(timeout=60)
        assert np.array_equal(got, expected_row_sums(x))
    finally:
        shutil.rmtree(markers, ignore_errors=True)
    # The Nanny restarts the worker; the plugin activates autozyme there, whose
    # sweep unlinks the dead worker's segments.
    client.wait_for_workers(N_WORKERS, timeout=60)
    wait_until(lambda: workers_status()["active"] == N_WORKERS, what="the restarted worker's plugin")
    wait_until(lambda: not segments_of(victim), what=f"the killed worker's segments {segments_of(victim)}")
    assert victim not in client.run(os.getpid).values()
    # The replacement joined after registration and still got the client's settings.
    assert {e["AUTOZYME_STRICT"] for e in client.run(_worker_env).values()} == {"1"}


def test_daemon_killed_under_a_worker(cluster):
    client, _ = cluster
    x = counts_matrix(seed=2)
    markers = tempfile.mkdtemp(prefix="azm-markers-")
    strict = os.environ.get("AUTOZYME_STRICT")
    os.environ["AUTOZYME_STRICT"] = "0"
    try:
        azm_cluster.register(client)  # the workers now run non-strict
        assert {e["AUTOZYME_STRICT"] for e in client.run(_worker_env).values()} == {"0"}
        client.run(_reset_counts)
        # Make sure both daemons are up, then kill one before the tasks run...
        for a in sorted(client.scheduler_info()["workers"]):
            client.submit(row_sums_chunk, x[:10], workers=[a], pure=False).result()
        client.run(_reset_counts)
        reps = workers_status()["by_worker"]
        (a0, r0), (a1, r1) = sorted(reps.items())
        before = {r0["daemon_pid"], r1["daemon_pid"]}
        os.kill(r0["daemon_pid"], signal.SIGKILL)
        # ... and the other one while its tasks run (they pause before the request).
        arr = dask_row_sums(dask_csr(x, 60), marker_dir=markers, pause=0.2)
        fut = client.compute(arr)
        wait_until(lambda: any(m.startswith(f"{r1['pid']}-") for m in os.listdir(markers)),
                   what="a task on the second worker")
        os.kill(r1["daemon_pid"], signal.SIGKILL)
        got = fut.result(timeout=60)
        assert np.array_equal(got, expected_row_sums(x))
        w = workers_status()
        # Every chunk was either served (by a daemon the retry restarted) or fell back.
        done = w["served"].get(CHUNK_COUNTER, 0) + sum(w["fallbacks"].get(CHUNK_COUNTER, {}).values())
        assert done == 10
        after = {r["daemon_pid"] for r in w["by_worker"].values()}
        assert not (after & before), (before, after)
    finally:
        shutil.rmtree(markers, ignore_errors=True)
        if strict is None:
            os.environ.pop("AUTOZYME_STRICT", None)
        else:
            os.environ["AUTOZYME_STRICT"] = strict
        azm_cluster.register(client)


@pytest.mark.parametrize("chunk_type", ["csr_matrix", "csr_array"])
def test_normalize_total_log1p_on_the_cluster(cluster, chunk_type):
    """scanpy's own calls on a dask X, computed on the cluster: autozyme's result
    (strict, served by the workers) equals upstream's on the same cluster."""
    import anndata as ad
    import scanpy as sc

    client, _ = cluster
    to_chunk = getattr(sp, chunk_type)
    x = counts_matrix(seed=4)

    def run():
        dense = da.from_array(x.toarray(), chunks=(70, -1))
        X = dense.map_blocks(to_chunk, dtype=x.dtype, meta=to_chunk((0, 0), dtype=x.dtype))
        adata = ad.AnnData(X=X)
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
        assert isinstance(adata.X, da.Array)  # lazy, as upstream's
        return client.compute(adata.X).result(timeout=60)

    autozyme.deactivate()  # upstream here and on the workers
    try:
        client.run(_reset_counts)
        want = run()
        assert workers_status()["served"] == {}
    finally:
        autozyme.activate("scanpy", prewarm=False)
    client.run(_reset_counts)
    got = run()
    assert type(got) is type(want) and got.dtype == want.dtype
    for part in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(got, part), getattr(want, part)), part
    w = workers_status()
    assert w["fallbacks"] == {}
    # Every chunk of both calls' layers ran autozyme's chunk functions on a worker.
    for call in ("normalize_total", "log1p"):
        assert w["served"].get(chunks.counter_name(call), 0) >= 9, w["served"]


def _set_daemon_binary(binary):
    """Point this worker at another daemon binary (None: the one installed beside
    its interpreter, as where AUTOZYMED is unset), and drop its connection."""
    from autozyme.client import get_client

    if binary is None:
        os.environ.pop("AUTOZYMED", None)
    else:
        os.environ["AUTOZYMED"] = binary
    get_client().reset()


def test_worker_that_cannot_reach_a_daemon(cluster):
    client, _ = cluster
    x = counts_matrix(seed=3)[:120]
    a0 = sorted(client.scheduler_info()["workers"])[0]
    binary = client.run(_worker_env, workers=[a0])[a0]["AUTOZYMED"]
    strict = os.environ.get("AUTOZYME_STRICT")
    # Not a daemon: the worker's shim cannot start or accept one.
    client.run(_set_daemon_binary, "/bin/false", workers=[a0])
    try:
        client.run(_reset_counts)
        # Strict on the client, hence on the worker: the chunk's fallback is an error.
        with pytest.raises(fallback.AutozymeFallbackError, match="dask chunk"):
            client.submit(row_sums_chunk, x, workers=[a0], pure=False).result()
        os.environ["AUTOZYME_STRICT"] = "0"
        azm_cluster.register(client)
        client.run(_reset_counts)
        got = client.submit(row_sums_chunk, x, workers=[a0], pure=False).result()
        assert np.array_equal(got, expected_row_sums(x))
        w = workers_status()
        assert w["served"].get(CHUNK_COUNTER, 0) == 0
        (reason, n), = w["fallbacks"][CHUNK_COUNTER].items()
        assert n == 1 and reason.startswith("failure: DaemonUnavailable"), reason
        assert "fell back: " + CHUNK_COUNTER in autozyme.format_status()
    finally:
        if strict is None:
            os.environ.pop("AUTOZYME_STRICT", None)
        else:
            os.environ["AUTOZYME_STRICT"] = strict
        client.run(_set_daemon_binary, binary, workers=[a0])
        azm_cluster.register(client)


def test_deactivate_removes_the_plugin(cluster):
    client, _ = cluster
    autozyme.deactivate()
    try:
        w = workers_status()
        assert w["active"] == 0
        # Each worker's own environment is back (the Nanny's AUTOZYME_STRICT=0).
        assert {e["AUTOZYME_STRICT"] for e in client.run(_worker_env).values()} == {"0"}
    finally:
        autozyme.activate("scanpy", prewarm=False)
    assert workers_status()["active"] == N_WORKERS
    assert {e["AUTOZYME_STRICT"] for e in client.run(_worker_env).values()} == {"1"}
