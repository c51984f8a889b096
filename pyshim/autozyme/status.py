"""``autozyme.status()``: the daemon, the shim's shared memory, and what was served."""

from __future__ import annotations

from . import activation, fallback, runtime, shm, verify, versions
from .client import DaemonError, get_client


def status(*, start: bool = False) -> dict:
    """A snapshot. Does not start the daemon unless ``start``."""
    out = {
        "active": activation.is_active(),
        "patched": activation.patched_targets(),
        "scanpy_version": None,
        "verified_versions": activation.verified_versions(),
        "version_problems": {},
        "runtime_dir": str(runtime.runtime_dir()),
        "shared_memory": shm.stats(),
        "verify": verify.report(),
        **fallback.counts(),
    }
    try:
        out["scanpy_version"] = versions.scanpy_version()
        out["version_problems"] = activation.version_problems()
    except ImportError:
        out["version_problems"] = {name: "scanpy is not installed" for name in activation.TARGETS}
    try:
        st = get_client().status(autostart=start)
        out["daemon"] = {k: v for k, v in st.fields.items() if k != "cache"}
        out["daemon"]["cache"] = [dict(e.fields) for e in st.cache]
    except (runtime.DaemonUnavailable, DaemonError) as e:
        out["daemon"] = None
        out["daemon_problem"] = str(e)
    out["workers"] = _workers()
    out["warm_worker"] = _warm_worker()
    return out


def _warm_worker() -> dict | None:
    """The warm worker of this interpreter (``autozyme.warm``): its own report, or
    None when none runs."""
    try:
        from .warm import client

        return client.status()
    except Exception:  # noqa: BLE001 - a status never fails because of the worker
        return None


def _workers() -> dict | None:
    """The dask.distributed workers' summed counts and daemons (None without a
    client in this process; distributed is not imported for it)."""
    import sys

    if "distributed" not in sys.modules:
        return None
    try:
        from .dask import cluster
    except Exception:  # noqa: BLE001
        return None
    return cluster.workers_status()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_status(st: dict | None = None) -> str:
    st = status() if st is None else st
    lines = [f"autozyme: {'active' if st['active'] else 'inactive'}"
             + (f" (patched: {', '.join(st['patched'])})" if st["patched"] else "")]
    lines.append(f"scanpy {st.get('scanpy_version') or 'not installed'}; fast paths verified on:")
    problems = st.get("version_problems") or {}
    for name, verified in st["verified_versions"].items():
        if name in problems:
            here = "falls back here"
        elif st.get("scanpy_version") in verified:
            here = "serves here"
        else:
            here = "not verified here, served by opt-in (AUTOZYME_ALLOW_UNVERIFIED=1)"
        lines.append(f"  {name}: {', '.join(verified)} ({here})")
    if problems:
        lines.append(f"  falls back: {next(iter(problems.values()))}")
    d = st.get("daemon")
    if d:
        lines.append(
            f"daemon: pid {d['pid']}, version {d['version']} (build {d['build_id']}), "
            f"{d['threads']} threads, up {d['uptime_ms'] / 1000:.0f}s"
        )
        lines.append(f"  memory: rss {_mib(d['rss_bytes'])}, peak {_mib(d['peak_rss_bytes'])}")
        lines.append(
            f"  requests: {d['requests_served']} served, {d['requests_failed']} failed; "
            f"{d['open_connections']} connections; {d['mapped_segments']} segments mapped "
            f"({_mib(d['mapped_bytes'])})"
        )
        cache = d.get("cache") or []
        lines.append(
            f"  cache: {len(cache)} entries, {_mib(sum(e['bytes'] for e in cache))} "
            f"of {_mib(d.get('cache_budget_bytes', 0))}; "
            f"{d.get('cache_hits', 0)} hits, {d.get('cache_misses', 0)} misses"
        )
        for e in cache:
            lines.append(f"    {e['key']}: {_mib(e['bytes'])}, {e['hits']} hits")
        lines.append(f"  idle exit after {d['idle_timeout_s']}s; runtime dir {d['runtime_dir']}")
    else:
        lines.append(f"daemon: not running ({st.get('daemon_problem', 'unknown')})")
    w = st.get("warm_worker")
    if w:
        stage = f", compiling {w['stage']}" if w.get("stage") else ""
        took = f" in {w['warm_seconds']}s" if w.get("warm_seconds") is not None else ""
        lines.append(
            f"warm worker (neighbors, umap): pid {w['pid']}, {w['state']}{took}{stage}; "
            f"{w['served']} served, {w['failed']} failed; idle exit after {w['idle_timeout_s']:.0f}s"
        )
        layouts = w.get("umap_layout") or {}
        if layouts:
            others = ", ".join(f"{why} {n}" for why, n in sorted(layouts.items()) if why != "served")
            lines.append(f"  umap layouts in the daemon: {layouts.get('served', 0)}"
                         + (f"; upstream's: {others}" if others else ""))
    else:
        lines.append("warm worker (neighbors, umap): not running")
    m = st["shared_memory"]
    lines.append(
        f"shim shared memory: {m['segments']} segments ({_mib(m['bytes'])}), "
        f"{m['pooled_segments']} pooled ({_mib(m['pooled_bytes'])})"
    )
    lines.append("served: " + (", ".join(f"{k} {v}" for k, v in sorted(st["served"].items())) or "none"))
    v = st.get("verify") or {}
    if v.get("enabled") or v.get("checked"):
        lines.append(f"verify mode: {v['checked']} calls checked against upstream, "
                     f"{len(v['differences'])} differences")
        lines += [f"  {d}" for d in v["differences"][-10:]]
    if st["fallbacks"]:
        lines.append("fallbacks:")
        for name, reasons in sorted(st["fallbacks"].items()):
            for reason, n in sorted(reasons.items()):
                lines.append(f"  {name}: {n} x {reason}")
    if st.get("workers"):
        from .dask.cluster import format_workers

        lines += format_workers(st["workers"])
    return "\n".join(lines)
