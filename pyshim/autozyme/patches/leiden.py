"""sc.tl.leiden, verified against scanpy 1.11.5, 1.12.3 and 1.12.4.

Exact mode (the default) serves ``flavor="igraph"`` and returns upstream's labels
for the same input and ``random_state``: it runs the same igraph routine on the
same graph with the same random numbers, and removes the costs around it that
do not change the result (measured on a 30,000-cell, 12-neighbour graph: about
half of upstream's time):

- **Graph construction.** Upstream builds a Python list of 550,000 tuples of
  numpy scalars and hands it to igraph (and sets a ``weight`` attribute from
  another such list). Here the same edges, in the same order (CSR storage order
  without explicit zeros, as ``adjacency.nonzero()`` yields them), reach igraph
  as a binary GraphDB file on tmpfs (16-bit vertex ids, so graphs of up to 65,535
  vertices; larger ones go through a zip of two integer lists, which creates no
  objects the garbage collector tracks). The weights go to ``community_leiden``
  as one list of the same doubles.
- **Random numbers.** Upstream gives igraph a Python object whose methods call
  numpy's legacy ``RandomState`` once per number (about 200,000 calls, each through
  ``__getattr__``). For an integer ``random_state`` the same stream is computed
  in bulk from the Mersenne Twister's raw words (``getrandbits(32)`` is
  ``tomaxint() & 0xFFFFFFFF`` and ``random()`` is the legacy double; each takes two
  words) and served by C-level callables, one shared position for both kinds. A
  self-check against ``RandomState`` itself guards the derivation; any other
  ``random_state`` (a ``RandomState``, ``None``) uses upstream's own object, since
  its state after the call is visible to the user.
- **Labels.** The categorical is built from integer codes instead of strings.
- **Modularity** (scanpy 1.12: ``uns[key_added]["modularity"]``). Upstream stores
  ``part.modularity`` of igraph's partition, which igraph computes on request
  (``Graph.modularity`` with the call's weights and resolution); here the same
  property of the same partition on the same graph, so the same bits.

Everything else (graph choice, ``restrict_to``, the ``uns`` params, logging) calls
upstream's own helpers or repeats upstream's expression.

What differs between the verified versions is declared once, in ``UPSTREAM``:
scanpy 1.12 takes ``flavor=None`` (its default, leidenalg) and warns on every call
that runs leidenalg (a FutureWarning without ``flavor``, a UserWarning for an
explicit ``flavor="leidenalg"``, attributed to the first frame outside scanpy),
where 1.11.5 warns once per process (a FutureWarning, ``stacklevel=3``); and 1.12
stores the partition's modularity. Exact mode hands leidenalg calls to upstream,
which then warns itself; parallel mode serves them and warns as upstream does.

Parallel mode (``AUTOZYME_LEIDEN=parallel``) runs the daemon's own Leiden. On
scanpy 1.12 its ``modularity`` is that of its own labels, as the flavor defines it:
igraph's (weighted when ``use_weights``, at the call's resolution, undirected) or
leidenalg's partition's (unweighted, resolution 1, directed unless
``directed=False``), evaluated with igraph's formula and summation order in numpy
(``_modularity``), which the tests check against igraph's routine bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import settings, versions
from ..client import DaemonError, get_client
from ..codec import msg
from ..fallback import Delegate, Fallback
from . import _common


@dataclass(frozen=True)
class Upstream:
    """How scanpy's leiden differs between the verified versions."""

    # flavor=None: upstream's default, resolved to "leidenalg" (1.12); else upstream
    # refuses it with a ValueError.
    flavor_none_is_leidenalg: bool
    # How a call that runs leidenalg warns: "once" (scanpy's warn_once: one
    # FutureWarning per process, stacklevel=3) or "every_call" (scanpy's
    # _compat.warn: every call, attributed to the first frame outside scanpy).
    leidenalg_warns: str
    # The warning for an explicit flavor="leidenalg" (its category: FutureWarning
    # when "once", UserWarning when "every_call").
    leidenalg_message: str
    # Appended to it for flavor=None, as a FutureWarning ("every_call" only).
    flavor_none_suffix: str | None
    # uns[key_added]["modularity"] = the partition's modularity.
    stores_modularity: bool
    # A graph without edges: upstream's weight lookup on the empty edge list
    # raises (AttributeError, 1.11.5), or it clusters every vertex alone (1.12).
    edgeless_graph_raises: bool


_LEIDENALG_FUTURE = (
    "In the future, the default backend for leiden will be igraph instead of leidenalg.\n\n"
    " To achieve the future defaults please pass: flavor=\"igraph\" and n_iterations=2.  "
    "directed must also be False to work with igraph\'s implementation."
)

# scanpy 1.12.3 and 1.12.4: the same tools/_leiden.py, _utils_clustering.py,
# _utils/random.py, _compat.py and graph helpers (compared from their sdists).
_SCANPY_1_12 = Upstream(
    flavor_none_is_leidenalg=True,
    leidenalg_warns="every_call",
    leidenalg_message=(
        "The `igraph` implementation of leiden clustering is *orders of magnitude faster*. "
        "Set the flavor argument to (and install if needed) 'igraph' to use it."
    ),
    flavor_none_suffix=(
        "\nIn the future, the default backend for leiden will be igraph instead of leidenalg. "
        "To achieve the future defaults please pass: `flavor='igraph'` and `n_iterations=2`. "
        "`directed` must also be `False` to work with igraph’s implementation."
    ),
    stores_modularity=True,
    edgeless_graph_raises=False,
)

UPSTREAM = {
    "1.11.5": Upstream(
        flavor_none_is_leidenalg=False,
        leidenalg_warns="once",
        leidenalg_message=_LEIDENALG_FUTURE,
        flavor_none_suffix=None,
        stores_modularity=False,
        edgeless_graph_raises=True,
    ),
    "1.12.3": _SCANPY_1_12,
    "1.12.4": _SCANPY_1_12,
}
VERIFIED = tuple(UPSTREAM)

_GRAPHDB_MAX = 65535
_SHM_DIR = "/dev/shm"


@functools.lru_cache(maxsize=None)
def _signature(upstream):
    """Upstream's signature, its data parameter's name and its ``**clustering_args``'."""
    import inspect

    sig = inspect.signature(inspect.unwrap(upstream))
    params = list(sig.parameters.values())
    rest = next(p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD)
    return sig, params[0].name, rest


def fast(upstream, *args, **kwargs):
    from anndata import AnnData

    up = versions.pick(UPSTREAM)
    sig, data_name, rest_name = _signature(upstream)
    try:
        # the arguments exactly as upstream's function receives them
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise Delegate(f"arguments upstream refuses: {e}") from e
    bound.apply_defaults()
    p = dict(bound.arguments)
    adata = p.pop(data_name)
    clustering_args = dict(p.pop(rest_name))
    if p["flavor"] == "igraph" and _is_str(clustering_args.get("objective_function"), "modularity"):
        # upstream's igraph call sets this very value by default (setdefault);
        # igraph compares it case-sensitively, hence exactly this string
        del clustering_args["objective_function"]
    extra = sorted(clustering_args)

    flavor = requested = p["flavor"]
    if flavor is None and up.flavor_none_is_leidenalg:
        flavor = "leidenalg"
    parallel_mode = settings.leiden_mode() == "parallel"
    if flavor not in {"igraph", "leidenalg"}:
        raise Delegate(f"flavor {flavor!r}")
    if flavor == "leidenalg" and not parallel_mode:
        raise Fallback(f"flavor={requested!r} runs leidenalg (exact mode serves flavor='igraph'; "
                       "parallel mode serves both)")
    if flavor == "igraph" and p["directed"]:
        raise Delegate("directed graph with flavor='igraph'")
    if flavor == "igraph" and p["partition_type"] is not None:
        raise Delegate("partition_type with flavor='igraph'")
    try:
        import igraph  # noqa: F401
    except ImportError as e:
        raise Delegate("igraph is not installed") from e
    if flavor == "leidenalg":
        try:
            import leidenalg
        except ImportError as e:
            raise Delegate("leidenalg is not installed") from e
        if p["partition_type"] not in (None, leidenalg.RBConfigurationVertexPartition):
            raise Fallback(f"partition_type {p['partition_type']!r}")
    if extra:
        raise Fallback(f"further clustering arguments {extra}")
    if not isinstance(adata, AnnData):
        raise Fallback(f"{type(adata).__name__} is not an AnnData")
    if adata.isbacked:
        raise Fallback("backed AnnData")
    args = {k: p[k] for k in _EXACT_ARGS}
    if parallel_mode:
        warning = _flavor_warning(up, requested)
        return _exact(adata, **args, up=up, solver=_Parallel(flavor, p["directed"], warning))
    return _exact(adata, **args, up=up)


def _is_str(x, value: str) -> bool:
    return type(x) is str and x == value


_EXACT_ARGS = (
    "resolution", "restrict_to", "random_state", "key_added", "adjacency",
    "use_weights", "n_iterations", "neighbors_key", "obsp", "copy",
)


def _exact(adata, *, resolution, restrict_to, random_state, key_added, adjacency,
           use_weights, n_iterations, neighbors_key, obsp, copy, up, solver=None):
    import pandas as pd
    from natsort import natsorted
    from scanpy import _utils
    from scanpy import logging as logg
    from scanpy.tools._utils_clustering import rename_groups, restrict_adjacency

    # Scope checks on the graph before anything changes.
    if adjacency is None:
        try:
            graph = _utils._choose_graph(adata, obsp, neighbors_key)
        except Exception as e:  # noqa: BLE001 - upstream raises its own error
            raise Delegate(f"no graph: {e}") from e
    else:
        graph = adjacency
    _check_graph(graph)
    if restrict_to is not None:
        # (reads only obs, which a copy shares)
        try:
            restrict_key, restrict_categories = restrict_to
            graph, restrict_indices = restrict_adjacency(
                adata, restrict_key, restrict_categories=restrict_categories, adjacency=graph
            )
        except Exception as e:  # noqa: BLE001 - upstream raises its own error
            raise Delegate(f"restrict_to {restrict_to!r}: {e}") from e
    if up.edgeless_graph_raises and not graph.data.any():
        raise Delegate("a graph without edges")
    if solver is not None:
        solver.check(graph, random_state, n_iterations)

    start = logg.info("running Leiden clustering")
    adata = adata.copy() if copy else adata
    if solver is not None:
        groups, modularity = solver.run(graph, resolution=resolution, random_state=random_state,
                                        n_iterations=n_iterations, use_weights=use_weights,
                                        with_modularity=up.stores_modularity)
    else:
        part = community_leiden(
            graph, resolution=resolution, random_state=random_state,
            n_iterations=n_iterations, use_weights=use_weights,
        )
        groups = np.array(part.membership)
        # igraph computes it when asked, on the partition's graph, weights and resolution
        modularity = part.modularity if up.stores_modularity else None
    if restrict_to is not None:
        if key_added == "leiden":
            key_added += "_R"
        groups = rename_groups(
            adata, key_added=key_added, restrict_key=restrict_key,
            restrict_categories=restrict_categories, restrict_indices=restrict_indices,
            groups=groups,
        )
        labels = pd.Categorical(
            values=groups.astype("U"), categories=natsorted(map(str, np.unique(groups)))
        )
        n_found = len(np.unique(groups))
    else:
        labels, n_found = _categorical(groups)
    adata.obs[key_added] = labels
    adata.uns[key_added] = {}
    adata.uns[key_added]["params"] = dict(
        resolution=resolution, random_state=random_state, n_iterations=n_iterations
    )
    if up.stores_modularity:
        adata.uns[key_added]["modularity"] = modularity
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"found {n_found} clusters and added\n"
            f"    {key_added!r}, the cluster labels (adata.obs, categorical)"
        ),
    )
    return adata if copy else None


def _check_graph(a) -> None:
    import scipy.sparse as sp

    if not (sp.issparse(a) and a.format == "csr"):
        raise Fallback(f"adjacency of type {type(a).__name__} (served: CSR)")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise Fallback(f"adjacency of shape {a.shape}")
    if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise Fallback(f"adjacency dtype {a.dtype}")


def community_leiden(adjacency, *, resolution, random_state, n_iterations, use_weights):
    """Upstream's ``community_leiden`` call on upstream's graph; igraph's partition
    (its ``membership`` and, computed when asked, its ``modularity``)."""
    import random

    import igraph
    from scanpy._utils.random import _RNGIgraph

    _check_graph(adjacency)
    graph, weights = _graph(adjacency)
    kwargs = {"n_iterations": n_iterations}
    if use_weights:
        kwargs["weights"] = weights.astype(np.float64).tolist()
    if resolution is not None:
        kwargs["resolution"] = resolution
    kwargs["objective_function"] = "modularity"
    rng = _fast_rng(random_state, graph.vcount())
    if rng is None:
        rng = _RNGIgraph(random_state)
    igraph.set_random_number_generator(rng)
    try:
        return graph.community_leiden(**kwargs)
    finally:
        igraph.set_random_number_generator(random)


def _edges(a):
    """``a.nonzero()`` and upstream's weights, without the Python objects."""
    n = a.shape[0]
    if not a.has_canonical_format:
        # Duplicates: upstream lists each stored entry and weighs it by the sum
        # of its duplicates (fancy indexing); do exactly that.
        from scanpy._utils import dematrix

        rows, cols = a.nonzero()
        return rows, cols, dematrix(a[rows, cols]).ravel(), False
    indptr = a.indptr.astype(np.int64, copy=False)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    cols, data = a.indices, a.data
    keep = data != 0
    if not keep.all():
        rows, cols, data = rows[keep], cols[keep], data[keep]
    return rows, cols, data, True


def _graph(a):
    import igraph

    n = a.shape[0]
    rows, cols, weights, canonical = _edges(a)
    graph = None
    if canonical and 0 < n <= _GRAPHDB_MAX and os.path.isdir(_SHM_DIR):
        graph = _graph_graphdb(n, rows, cols)
    if graph is None:
        graph = igraph.Graph(n=n, directed=False)
        igraph.GraphBase.add_edges(graph, zip(rows.tolist(), cols.tolist()))
    return graph, weights


def _graph_graphdb(n, rows, cols):
    """The graph read by igraph's GraphDB reader: per vertex, its degree and its
    neighbours as 16-bit little-endian words, so igraph adds edge (i, j) for each
    listed neighbour j of i, in the order listed."""
    import igraph

    counts = np.bincount(rows, minlength=n)
    buf = np.empty(1 + n + rows.size, dtype="<u2")
    buf[0] = n
    heads = np.concatenate(([0], np.cumsum(counts[:-1]))) + np.arange(1, n + 1)
    buf[heads] = counts
    body = np.ones(buf.size, dtype=bool)
    body[0] = False
    body[heads] = False
    buf[body] = cols
    try:
        fd, path = tempfile.mkstemp(prefix="autozyme-leiden-", dir=_SHM_DIR)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.tobytes())
        return igraph.Graph.Read_GraphDB(path, directed=False)
    except Exception:  # noqa: BLE001 - the edge-list path below builds it instead
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


# --- random numbers -------------------------------------------------------------

_TWO53 = 9007199254740992.0
_TWO26 = 67108864.0


def _stream_chunks(rs, first: int):
    """(getrandbits(32), random()) for successive positions of ``rs``'s stream; each
    position is two 32-bit words, whichever of the two igraph asks for."""
    size = first
    while True:
        words = rs._bit_generator.random_raw(2 * size)
        hi, lo = words[0::2], words[1::2]
        bits = ((hi & 1) << 31) | (lo >> 1)
        real = ((hi >> 5).astype(np.float64) * _TWO26 + (lo >> 6).astype(np.float64)) / _TWO53
        yield zip(bits.tolist(), real.tolist())
        size = max(size, 1 << 16)


class _StreamRNG:
    """An igraph RNG whose ``getrandbits`` and ``random`` are C-level callables over
    one shared stream; igraph looks the attributes up once, when it is installed."""

    def __init__(self, seed: int, n: int):
        rs = np.random.RandomState(seed)
        shared = itertools.chain.from_iterable(_stream_chunks(rs, max(8 * n, 1024)))
        self.getrandbits = functools.partial(next, map(operator.itemgetter(0), shared))
        self.random = functools.partial(next, map(operator.itemgetter(1), shared))

    def randint(self, a, b):  # igraph calls it only without getrandbits
        raise RuntimeError("autozyme: randint is not part of this stream")

    def gauss(self, mu, sigma):
        raise RuntimeError("autozyme: gauss is not part of this stream")


@functools.lru_cache(maxsize=1)
def _stream_matches_numpy() -> bool:
    """Whether the bulk derivation reproduces RandomState call by call here."""
    from scanpy._utils.random import _RNGIgraph

    ref = _RNGIgraph(20260)
    ours = _StreamRNG(20260, 1)
    pattern = [0, 1, 1, 0, 0, 0, 1, 0] * 200  # 1600 draws, across no chunk edge
    for kind in pattern:
        if kind:
            if ours.random() != ref.random():
                return False
        elif ours.getrandbits(32) != ref.getrandbits(32):
            return False
    return True


def _fast_rng(random_state, n: int):
    """The fast stream for an integer seed (a private RandomState upstream, whose
    state after the call nobody sees), else None."""
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
        return None
    if not 0 <= int(random_state) < 2**32:
        return None
    if not _stream_matches_numpy():
        return None
    return _StreamRNG(int(random_state), n)


# --- labels ---------------------------------------------------------------------

def _categorical(groups: np.ndarray):
    """``pd.Categorical(groups.astype("U"), categories=natsorted(...))`` from codes."""
    import pandas as pd
    from natsort import natsorted

    uniq = np.unique(groups)
    categories = natsorted(map(str, uniq))
    if groups.size and (uniq[0] < 0 or uniq[-1] > 10 * groups.size):
        return pd.Categorical(values=groups.astype("U"), categories=categories), len(uniq)
    position = np.zeros(int(uniq[-1]) + 1 if uniq.size else 0, dtype=np.int64)
    position[[int(c) for c in categories]] = np.arange(len(categories))
    codes = position[groups] if groups.size else np.zeros(0, dtype=np.int64)
    return pd.Categorical.from_codes(codes, categories=categories), len(uniq)


# --- warnings ---------------------------------------------------------------------

def _flavor_warning(up: Upstream, requested):
    """The warning upstream gives a call with ``flavor=requested`` (a callable that
    gives it), or None. Only calls that run leidenalg warn."""
    if requested == "igraph":
        return None
    if up.leidenalg_warns == "once":
        return functools.partial(_warn_once_at_caller, up.leidenalg_message)
    if requested is None:
        return functools.partial(_warn_outside, up.leidenalg_message + up.flavor_none_suffix, FutureWarning)
    return functools.partial(_warn_outside, up.leidenalg_message, UserWarning)


def _warn_once_at_caller(message: str) -> None:
    """scanpy 1.11.5's ``warn_once(message, FutureWarning, stacklevel=3)`` from its
    leiden: the warning, then an "ignore" filter for it (so it is not repeated,
    whoever gave it first), attributed to leiden's caller. The stack level here
    counts autozyme's frames (this function's caller up to the wrapper) instead."""
    import sys

    from scanpy import _utils

    ours = str(Path(__file__).parent.parent)  # the autozyme package
    # level 1: warn_once; 2: this function; 3: its caller, where the walk starts
    frame, level = sys._getframe(1), 3
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    _utils.warn_once(message, FutureWarning, stacklevel=level)


def _warn_outside(message: str, category) -> None:
    """As scanpy 1.12's ``_compat.warn``: attributed to the first frame outside
    scanpy (and outside autozyme, so the user's line is named)."""
    _common.warn_like_upstream(message, category, skip_packages=True, stacklevel=1)


# --- modularity ---------------------------------------------------------------------

def _modularity(adjacency, membership: np.ndarray, *, weighted: bool, resolution: float,
                directed: bool) -> float:
    """``Graph.modularity(membership, weights, resolution)`` of the graph upstream
    builds from ``adjacency`` (an edge per stored non-zero, in storage order), with
    igraph's arithmetic in igraph's order: one pass over the edges adding each
    edge's weight to its end communities' out- and in-strength (an undirected edge
    runs from its larger to its smaller vertex) and, within a community, the
    weight times 2 (undirected) or 1 to the sum; the strengths then scaled by
    1 / (that factor times the total weight), the sum divided by it, and
    resolution * out * in subtracted community by community. ``np.bincount``,
    ``np.cumsum`` and ``np.subtract.accumulate`` add in sequence, as igraph's loops do."""
    rows, cols, data, _ = _edges(adjacency)
    if rows.size == 0:
        return float("nan")
    if not directed:
        rows, cols = np.maximum(rows, cols), np.minimum(rows, cols)
    source, target = membership[rows], membership[cols]
    w = data.astype(np.float64) if weighted else np.ones(rows.size)
    factor = 1.0 if directed else 2.0
    total = float(np.cumsum(w)[-1])
    if not total > 0:
        return float("nan")
    inside = w[source == target] * factor
    q = float(np.cumsum(inside)[-1]) if inside.size else 0.0
    k = int(membership.max()) + 1
    k_out = np.bincount(source, weights=w, minlength=k)
    k_in = np.bincount(target, weights=w, minlength=k)
    if not directed:
        k_out = k_out + k_in
        k_in = k_out
    scale = 1.0 / (factor * total)
    k_out, k_in = k_out * scale, k_in * scale
    q /= factor * total
    terms = resolution * k_out * k_in
    return float(np.subtract.accumulate(np.concatenate(([q], terms)))[-1])


# --- parallel mode ----------------------------------------------------------------

class _Parallel:
    """The daemon's Leiden (``Request::Leiden``): modularity with ``resolution`` on
    the graph igraph would build (each stored non-zero an undirected edge, so
    A + Aᵀ), for both flavors. leidenalg's default (a directed graph,
    RBConfiguration) optimises the same quantity when the graph is symmetric, so a
    directed call on an asymmetric graph falls back."""

    _peer_refused = False

    def __init__(self, flavor: str, directed, warning=None):
        self.flavor = flavor
        self.directed = directed
        self.warning = warning

    def check(self, graph, random_state, n_iterations) -> None:
        if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
            raise Fallback(f"parallel mode takes an integer random_state, not {type(random_state).__name__}")
        if not isinstance(n_iterations, (int, np.integer)) or isinstance(n_iterations, bool):
            raise Fallback(f"n_iterations of type {type(n_iterations).__name__}")
        if self.flavor == "leidenalg" and self.directed is not False:
            if (graph != graph.T).nnz:
                raise Fallback("flavor='leidenalg' (directed) on an asymmetric graph")
        if graph.data.size and not np.isfinite(graph.data).all() or (graph.data < 0).any():
            raise Fallback("non-finite or negative edge weights")

    def run(self, graph, *, resolution, random_state, n_iterations, use_weights, with_modularity):
        """The membership, and the modularity the flavor reports for it (None unless
        ``with_modularity``)."""
        request = dict(
            use_weights=bool(use_weights),
            resolution=1.0 if resolution is None else float(resolution),
            n_iterations=None if n_iterations < 0 else int(n_iterations),
            seed=int(random_state) & 0xFFFFFFFFFFFFFFFF,
        )
        peer = not _Parallel._peer_refused
        matrix, *_ = _common.csr_refs(graph, with_indices=True, peer=peer)
        try:
            reply = get_client().call(msg("Leiden", graph=matrix, **request))
        except DaemonError as e:
            if e.kind == "Unsupported" and peer:
                _Parallel._peer_refused = True
                matrix, *_ = _common.csr_refs(graph, with_indices=True, peer=False)
                reply = get_client().call(msg("Leiden", graph=matrix, **request))
            else:
                raise
        membership = reply.membership.astype(np.int64)
        modularity = None
        if with_modularity:
            if self.flavor == "igraph":
                # igraph's partition: the call's weights and resolution, undirected
                modularity = _modularity(graph, membership, weighted=bool(use_weights),
                                         resolution=1 if resolution is None else resolution,
                                         directed=False)
            else:
                # leidenalg's partition reports igraph's modularity of its graph
                # without weights or resolution; the graph is directed unless
                # directed=False
                modularity = _modularity(graph, membership, weighted=False, resolution=1,
                                         directed=self.directed is not False)
        # Warned once the call is served (a daemon failure before this point runs
        # upstream, which warns itself), before anything is written.
        if self.warning is not None:
            self.warning()
        return membership, modularity
