"""sc.tl.umap, verified against scanpy 1.11.5 and 1.12.4: upstream's own function,
run in the warm worker (``autozyme.warm``), where umap's numba kernels (the
layout optimisation) are already compiled.

The stand-in carries the neighbors' ``uns`` entry and connectivities graph, the
representation the neighbors were computed on (umap's spectral initialisation
of a graph with several components places them by that data), and an ``obsm``
``init_pos``. The worker runs with the caller's numba thread count and
``sc.settings.n_jobs``; the caller gets ``obsm[key_added]`` and ``uns`` as upstream
writes them, and, on scanpy 1.11.5, the connectivities changed in place as
upstream changes them (see ``UPSTREAM``).

Served: an in-memory AnnData (not a view), ``copy=False``, ``method="umap"``, an
``init_pos`` that is "spectral", "random", an ``obsm`` key or an array, an int
``random_state``. Anything else, or a worker that is off, unreachable or failing,
runs upstream here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import versions
from ..fallback import Delegate, Fallback
from ..warm import standin


@dataclass(frozen=True)
class Upstream:
    """How scanpy's umap differs between the verified versions."""

    # 1.11.5 hands umap ``connectivities.tocoo()``, which shares the CSR's values,
    # and umap zeroes the edges too weak to be sampled in them: the user's graph
    # changes. 1.12 passes ``tocoo(copy=True)``. (Nothing to branch on here: the
    # worker reports input arrays changed in place and the caller repeats it.)
    changes_connectivities: bool


UPSTREAM = {
    "1.11.5": Upstream(changes_connectivities=True),
    "1.12.4": Upstream(changes_connectivities=False),
}
VERIFIED = tuple(UPSTREAM)


def fast(upstream, *args, **kwargs):
    versions.pick(UPSTREAM)
    p = standin.bind_call(upstream, args, kwargs)
    adata = p["adata"]
    if p["method"] != "umap":
        raise Fallback(f"method={p['method']!r}")
    key = p["neighbors_key"]
    neighbors = adata.uns.get(key) if isinstance(key, str) else None
    if not isinstance(neighbors, dict) or not isinstance(neighbors.get("params"), dict):
        raise Delegate(f"no neighbors in uns[{key!r}] (upstream raises)")
    conns = neighbors.get("connectivities_key", "connectivities")
    if conns not in adata.obsp:
        raise Delegate(f"no obsp[{conns!r}] (upstream raises)")
    params = neighbors["params"]
    spec = standin.representation(adata, params.get("use_rep"), params.get("n_pcs"))
    spec.setdefault("obsm", {})
    init_pos = p["init_pos"]
    if isinstance(init_pos, str) and init_pos in adata.obsm:
        spec["obsm"][init_pos] = adata.obsm[init_pos]
    elif isinstance(init_pos, str) and init_pos not in ("spectral", "random"):
        raise Fallback(f"init_pos={init_pos!r}")
    spec["obsp"] = {conns: adata.obsp[conns]}
    spec["uns"] = {key: neighbors}
    standin.serve("umap", adata, spec, args[1:], kwargs, worth_waiting=False)
