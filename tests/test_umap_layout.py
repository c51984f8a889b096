"""umap's layout optimisation in the daemon (autozyme.warm.umap_layout) against
umap-learn's own ``optimize_layout_euclidean`` (numba), on the same inputs, bit
for bit; a real daemon. End to end through sc.tl.umap in the warm worker:
tests/test_warm.py."""

from __future__ import annotations

import numpy as np
import pytest

from autozyme.warm import umap_layout

pytest.importorskip("umap")


def _graph(n, k, seed, *, dim=2, index=np.int32, self_loops=True, isolated=0, epochs=30):
    """A kNN-like COO graph sorted by head (as scanpy's CSR graph gives), with
    make_epochs_per_sample's values, and a random embedding."""
    rng = np.random.default_rng(seed)
    heads = np.arange(n - isolated)
    head = np.repeat(heads, k).astype(index)
    tail = rng.integers(0, n, head.size).astype(index)
    if self_loops:
        tail[::17] = head[::17]
    weights = rng.uniform(0.01, 1.0, head.size)
    keep = weights >= weights.max() / epochs
    head, tail, weights = head[keep], tail[keep], weights[keep]
    per_sample = epochs / (epochs * (weights / weights.max()))
    emb = rng.uniform(-3, 12, (n, dim)).astype(np.float32)
    if n > 8:
        emb[3] = emb[4]  # a repeated point
    return emb, head, tail, per_sample


def _both(emb, head, tail, per_sample, epochs, **kw):
    upstream = umap_layout.upstream()
    rng_state = np.array(kw.pop("rng_state", [-631472624, 247551186, 1380708704]), dtype=np.int64)
    args = (head, tail, epochs, emb.shape[0], per_sample, kw.pop("a", 0.583), kw.pop("b", 1.334),
            rng_state)
    kwargs = {**dict(gamma=1.0, initial_alpha=1.0, negative_sample_rate=5, move_other=True), **kw}
    want = emb.copy()
    upstream(want, want, *args, **kwargs)
    got = emb.copy()
    returned = umap_layout.layout(upstream, got, got, *args, **kwargs)
    assert returned is got
    return got, want


CASES = [
    # (cells, neighbours, seed, options, epochs)
    (2000, 12, 0, {}, 40),
    (2000, 12, 1, {"index": np.int64}, 25),
    (700, 5, 2, {"dim": 3}, 30),
    (500, 6, 3, {"dim": 1}, 30),
    (900, 10, 4, {"isolated": 300}, 20),
    (3, 2, 5, {}, 50),  # fewer runs than the two threads need: one thread
    (60, 4, 6, {"self_loops": False}, 1),
    (1500, 15, 7, {}, 11),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[3]}-{c[4]}ep")
def test_layout_matches_upstream_bit_for_bit(case):
    n, k, seed, options, epochs = case
    emb, head, tail, per_sample = _graph(n, k, seed, epochs=epochs, **options)
    got, want = _both(emb, head, tail, per_sample, epochs)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("params", [
    {"gamma": 0.5, "negative_sample_rate": 2},
    {"negative_sample_rate": 7.5, "initial_alpha": 0.7},
    {"a": 1.9, "b": 0.79},
    {"rng_state": [2**62 + 5, -(2**40), 0]},
], ids=str)
def test_layout_parameters_match_upstream(params):
    emb, head, tail, per_sample = _graph(800, 8, 11, epochs=30)
    got, want = _both(emb, head, tail, per_sample, 30, **params)
    assert got.tobytes() == want.tobytes()


def test_the_probe_finds_the_daemon_equal_to_numba():
    assert umap_layout.probe(umap_layout.upstream())


@pytest.mark.parametrize("change, reason", [
    (lambda a, kw: kw.update(densmap=True), "densmap"),
    (lambda a, kw: kw.update(move_other=False), "move_other"),
    (lambda a, kw: a.__setitem__(0, a[0].astype(np.float64)), "float32"),
    (lambda a, kw: a.__setitem__(0, np.ascontiguousarray(np.hstack([a[0]] * 2))), "1-3 columns"),
])
def test_out_of_scope_calls_run_upstream(change, reason):
    emb, head, tail, per_sample = _graph(200, 4, 3, epochs=10)
    args = [emb, emb, head, tail, 10, emb.shape[0], per_sample, 0.583, 1.334,
            np.array([1, 2, 3], dtype=np.int64)]
    kw = dict(move_other=True)
    change(args, kw)
    args[1] = args[0]
    with pytest.raises(umap_layout.NotServed, match=reason):
        umap_layout.layout(umap_layout.upstream(), *args, **kw)


def test_edges_the_daemon_refuses_leave_the_embedding_as_it_was():
    emb, head, tail, per_sample = _graph(300, 4, 8, epochs=10)
    order = np.random.default_rng(0).permutation(head.size)  # not sorted by head
    before = emb.copy()
    rng_state = np.array([1, 2, 3], dtype=np.int64)
    with pytest.raises(umap_layout.NotServed, match="sorted by head"):
        umap_layout.layout(umap_layout.upstream(), emb, emb, head[order], tail[order], 10,
                           emb.shape[0], per_sample[order], 0.583, 1.334, rng_state,
                           move_other=True)
    assert emb.tobytes() == before.tobytes()


def test_served_puts_the_layout_in_umaps_place_and_back():
    import umap.umap_ as umap_

    original = umap_.optimize_layout_euclidean
    with umap_layout.served():
        assert umap_.optimize_layout_euclidean is not original
    assert umap_.optimize_layout_euclidean is original
