"""sc.pp.neighbors, verified against scanpy 1.11.5 and 1.12.4: upstream's own
function, run in the warm worker (``autozyme.warm``), where pynndescent's and
umap's numba kernels are already compiled.

In a fresh process upstream's first call compiles those kernels (numba cannot
cache them on disk: docs/warm.md), about 20 s of a 27 s call at 50,000 cells; the
worker compiled them once, so the first call in a new kernel costs what a later
call costs, plus sending the representation (one ``obsm`` entry or a dense ``X``)
and receiving the graphs. The worker runs with the caller's numba thread count
and ``sc.settings.n_jobs`` and the call's own arguments, so the results are
upstream's in a fresh process, bit for bit.

Served: an in-memory AnnData (not a view), ``copy=False``, no ``transformer``
object or name, ``knn=True``, a metric given by name, a dense float
representation. Anything else, or a worker that is off, unreachable or failing,
runs upstream here.

What differs between the verified versions is declared in ``UPSTREAM``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import versions
from ..fallback import Fallback
from ..warm import standin


@dataclass(frozen=True)
class Upstream:
    """How scanpy's neighbors differs between the verified versions."""

    # scanpy 1.12 takes precomputed ``distances`` (then it searches nothing: not
    # compile-bound, runs here).
    takes_distances: bool
    # scanpy 1.12's ``metric`` defaults to None (meaning "euclidean").
    metric_default_none: bool


UPSTREAM = {
    "1.11.5": Upstream(takes_distances=False, metric_default_none=False),
    "1.12.4": Upstream(takes_distances=True, metric_default_none=True),
}
VERIFIED = tuple(UPSTREAM)


def fast(upstream, *args, **kwargs):
    up = versions.pick(UPSTREAM)
    p = standin.bind_call(upstream, args, kwargs)
    adata = p["adata"]
    if up.takes_distances and p["distances"] is not None:
        raise Fallback("precomputed distances")
    if p["transformer"] is not None:
        raise Fallback("a transformer")
    if p["knn"] is not True:
        raise Fallback("knn=False")
    metric = p["metric"]
    if not (isinstance(metric, str) or (metric is None and up.metric_default_none)):
        raise Fallback("a callable metric")
    spec = standin.representation(adata, p["use_rep"], p["n_pcs"])
    # Upstream's switch to pynndescent (whose compile the worker's warm-up does first).
    pynndescent = adata.n_obs >= (8192 if metric in (None, "euclidean") else 4096)
    standin.serve("neighbors", adata, spec, args[1:], kwargs, worth_waiting=pynndescent)
