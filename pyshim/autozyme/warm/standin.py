"""The caller's half of a call served by the warm worker: what to send (the parts
of the AnnData upstream's function reads) and writing back what it wrote.

The stand-in carries the AnnData's shape, the representation the function reads
(one ``obsm`` entry, or a dense ``X``) and, for umap, the neighbors' ``uns`` entry
and graph. The worker runs upstream's function on it with the call's own
arguments and returns every ``obsm``/``obsp``/``uns`` entry the function set, and
any input array it changed in place (upstream's umap in scanpy 1.11.5 zeroes the
weakest edges of ``obsp`` connectivities through ``tocoo()``'s shared data); here
they are written back in the same way: new entries assigned, changed arrays
overwritten in place, so every reference the user holds sees what upstream's
would.
"""

from __future__ import annotations

import numpy as np

from ..fallback import Delegate, Fallback
from ..patches import _common
from . import client


class WorkerFallback(Fallback):
    kind = "failure"


def check_anndata(adata) -> None:
    from anndata import AnnData

    if type(adata) is not AnnData:
        raise Fallback(f"{type(adata).__name__} is not an AnnData")
    if adata.isbacked:
        raise Fallback("backed AnnData")
    if adata.is_view:
        raise Fallback("a view (upstream makes it an actual AnnData)")


def bind_call(upstream, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, defaults applied, when the worker can stand in
    for it: an actual in-memory AnnData, no ``copy``, an integer ``random_state``
    (upstream's TypeError for arguments it refuses is upstream's to raise)."""
    import inspect

    try:
        bound = inspect.signature(inspect.unwrap(upstream)).bind(*args, **kwargs)
    except TypeError as e:
        raise Delegate(f"arguments upstream refuses ({e})") from None
    bound.apply_defaults()
    p = bound.arguments
    check_anndata(p["adata"])
    if p["copy"]:
        raise Fallback("copy=True")
    if not isinstance(p["random_state"], int):
        raise Fallback("random_state is not an int (its state after the call is the user's)")
    return p


def representation(adata, use_rep, n_pcs) -> dict:
    """The stand-in's part for ``_choose_representation(adata, use_rep, n_pcs)``:
    the same entry upstream reads, whole (upstream slices it in the worker)."""
    import scanpy as sc

    if use_rep is None and n_pcs == 0:
        use_rep = "X"
    if use_rep is None:
        if adata.n_vars <= sc.settings.N_PCS:
            use_rep = "X"
        elif "X_pca" in adata.obsm:
            use_rep = "X_pca"
        else:
            raise Fallback("no X_pca: upstream computes a PCA first")
    if use_rep != "X" and use_rep in adata.obsm:
        x, part = adata.obsm[use_rep], {"obsm": {use_rep: adata.obsm[use_rep]}}
    elif use_rep == "X":
        x, part = adata.X, {"X": adata.X}
    else:
        raise Delegate(f"use_rep={use_rep!r} is not in obsm (upstream raises)")
    if type(x) is not np.ndarray:
        raise Fallback(f"the representation is a {type(x).__name__}, not a dense numpy array")
    if x.dtype not in _common.FLOATS:
        raise Fallback(f"the representation is {x.dtype}")
    return part


def serve(func: str, adata, spec: dict, args: tuple, kwargs: dict, *, worth_waiting: bool) -> None:
    """Run upstream's ``func`` in the worker on the stand-in ``spec`` and write
    back what it wrote.

    While the worker warms up, a call waits for it only when ``worth_waiting``:
    when the warm-up stage under way compiles what the call would compile here
    (pynndescent's kernels, for a search on pynndescent's path); a call that
    compiles little here (exact kNN on small data, umap) runs here at once.
    Upstream runs here then by design, not by failure: counted, never a strict
    violation (like the worker switched off)."""
    if not client.enabled():
        raise Delegate("the warm worker is off (AUTOZYME_WARM=0)")
    st = client.status()
    if st is None and worth_waiting and client.starting():
        st = client.status_when_listening()  # its import takes seconds, its warm-up much more
    if st is None:
        if client.starting():
            raise Delegate("the warm worker is starting; this call runs here")
        client.start_in_background()  # for the next call
        if not client.seen():  # none was started yet (activate(prewarm=False), a new machine)
            raise Delegate("no warm worker was running; one is starting for the next call")
        raise WorkerFallback("warm worker not reachable")
    if st["state"] != "warm" and not worth_waiting:
        raise Delegate(f"the warm worker is still warming up ({st.get('stage')}); "
                       "this call compiles less here than it would wait there")
    spec = {"n_obs": adata.n_obs, "n_vars": adata.n_vars, **spec}
    try:
        reply = client.run(func, spec, args, kwargs)
    except client.WorkerUnavailable as e:
        client.start_in_background()  # recovered for the next call
        raise WorkerFallback(str(e)) from None
    if not reply["ok"]:
        if reply["kind"] == "upstream":
            raise Delegate(f"upstream raises in the warm worker ({reply['error']})")
        raise WorkerFallback(reply["error"])
    for category, message in reply["warnings"]:
        _common.warn_like_upstream(message, category, skip_packages=True, stacklevel=4)
    for slot in ("obsm", "obsp", "uns"):
        mapping = getattr(adata, slot)
        for k, v in reply[f"{slot}_changed"].items():
            _overwrite(mapping[k], v)
        for k in reply[f"{slot}_removed"]:
            del mapping[k]
        for k, v in reply[slot].items():
            mapping[k] = v


def _overwrite(mine, theirs) -> None:
    """An input array upstream changed in place: change the user's the same way."""
    if isinstance(mine, np.ndarray):
        np.copyto(mine, theirs)
    else:  # a scipy sparse matrix: same structure, values changed
        np.copyto(mine.data, theirs.data)
