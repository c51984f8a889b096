"""Load: many client processes (notebook kernels) sharing one daemon, every result
compared with upstream; and a small call is not held up by a large one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from autozyme import client as client_mod
from autozyme import runtime

# One client process: `calls` mixed calls, each run by upstream and by autozyme
# on equal inputs; prints a JSON summary. The mix grows with the fast paths.
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    import scanpy as sc
    import autozyme
    from autozyme import fallback
    from _data import assert_identical, counts

    autozyme.activate("scanpy", prewarm=False)
    rng = np.random.default_rng(int(sys.argv[1]))
    MIX = [
        ("normalize_total", dict(target_sum=1e4)),
        ("normalize_total", dict(exclude_highly_expressed=True)),
        ("normalize_total", dict()),
        ("log1p", dict()),
    ]
    done = 0
    for i in range(int(sys.argv[2])):
        name, kwargs = MIX[rng.integers(len(MIX))]
        fmt = ("csr", "dense")[rng.integers(2)]
        dtype = (np.float32, np.float64)[rng.integers(2)]
        shape = (int(rng.integers(20, 200)), int(rng.integers(10, 150)))
        seed = int(rng.integers(1 << 30))
        a = counts(*shape, fmt=fmt, dtype=dtype, seed=seed)
        b = a.copy()
        fast = getattr(sc.pp, name)
        fast.__autozyme_upstream__(a, **kwargs)
        fast(b, **kwargs)
        assert_identical(a.X, b.X)
        done += 1
    c = fallback.counts()
    print(json.dumps(dict(done=done, served=sum(c["served"].values()), fallbacks=c["fallbacks"])))
    """
)


@pytest.fixture
def shared_daemon(monkeypatch):
    d = tempfile.mkdtemp(prefix="azm-load-")
    monkeypatch.setenv("AUTOZYME_RUNTIME_DIR", d)
    old = client_mod._client
    client_mod._set_client(client_mod.Client())
    pid = client_mod.get_client().connection().hello.pid
    yield pid
    client_mod.get_client().shutdown()
    runtime.terminate_daemon()
    client_mod._set_client(old)
    shutil.rmtree(d, ignore_errors=True)


def test_eight_clients_fifty_mixed_calls_each(shared_daemon, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script), str(seed), "50"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(r["done"] for r in results)
    served = sum(r["served"] for r in results)
    fallbacks = [r["fallbacks"] for r in results if r["fallbacks"]]
    print(f"8 clients: {total} calls equal to upstream ({served} served by autozyme), "
          f"{time.monotonic() - start:.1f} s; fallbacks: {fallbacks or 'none'}")
    assert total == 400
    assert not fallbacks
    # One daemon served them all, and it is still there.
    assert client_mod.get_client().connection().hello.pid == shared_daemon


LARGE = textwrap.dedent(
    """
    import sys, time
    import numpy as np, scipy.sparse as sp, anndata as ad
    import scanpy as sc, autozyme
    autozyme.activate("scanpy", prewarm=False)
    rng = np.random.default_rng(0)
    big = ad.AnnData(sp.random(100_000, 2_000, density=0.1, format="csr", dtype=np.float32,
                               random_state=rng))
    for _ in range(3):
        t = time.time(); print("start", t, flush=True)
        sc.pp.normalize_total(big)
        print("end", t, time.time(), flush=True)
    """
)

SMALL = textwrap.dedent(
    """
    import time
    import numpy as np, scipy.sparse as sp, anndata as ad
    import scanpy as sc, autozyme
    autozyme.activate("scanpy", prewarm=False)
    small = ad.AnnData(sp.random(200, 100, density=0.1, format="csr", dtype=np.float32,
                                 random_state=np.random.default_rng(1)))
    sc.pp.normalize_total(small.copy())  # warm
    t = time.perf_counter(); sc.pp.normalize_total(small.copy()); alone = time.perf_counter() - t
    print("ready", flush=True)
    input()  # the large call has started
    t = time.time(); sc.pp.normalize_total(small.copy())
    print(alone, t, time.time(), flush=True)
    """
)


def test_a_small_call_does_not_wait_for_a_large_one(shared_daemon, tmp_path):
    """Two notebook kernels: while one runs a large call, the other's small call is
    answered before the large one finishes (kernels run in waves)."""
    (tmp_path / "large.py").write_text(LARGE)
    (tmp_path / "small.py").write_text(SMALL)
    small = subprocess.Popen([sys.executable, str(tmp_path / "small.py")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert small.stdout.readline().strip() == "ready"
    large = subprocess.Popen([sys.executable, str(tmp_path / "large.py")], stdout=subprocess.PIPE,
                             text=True)
    # The first large call is the first in its process (peer memory); the later
    # ones run on shared memory. Ask during the last one.
    for _ in range(3):
        line = large.stdout.readline().split()
        assert line[0] == "start"
        if _ < 2:
            assert large.stdout.readline().split()[0] == "end"
    time.sleep(0.01)
    small.stdin.write("go\n")
    small.stdin.flush()
    alone, s0, s1 = map(float, small.stdout.readline().split())
    _, l0, l1 = large.stdout.readline().split()
    l0, l1 = float(l0), float(l1)
    assert small.wait(60) == 0 and large.wait(60) == 0
    print(f"small call alone {alone * 1e3:.1f} ms; beside a large one {(s1 - s0) * 1e3:.1f} ms "
          f"(the large one took {(l1 - l0) * 1e3:.0f} ms, finished {(l1 - s1) * 1e3:.0f} ms after it)")
    assert s0 < l1, "the small call was asked too late to tell"
    assert s1 < l1, "the small call waited for the large one"
