"""``autozyme bench --report DIR`` (autozyme.bench.report): every call on dataset tiers and thread counts.

For each tier (a generated count matrix), each thread count and each call, the
upstream and autozyme sides run in fresh worker processes exactly as
``autozyme bench`` runs them (calls.py, rank.py, leiden.py); illico
(wilcoxon) and PIASO (leiden) join when installed. The rows go to
``DIR/report.json``; ``DIR/report.md`` gets the tables and the charts
(charts.py). Every choice that shapes the numbers (subsets, tiers, thread
counts, repeats) is written into report.md by ``method_notes``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from . import leiden, rank
from .calls import PHASES as PP_PHASES
from .calls import PP_CALLS, measure_call, warm_numba_cache
from .labels import CALL_TITLES, LEIDEN_NAMES, fmt_x
from .measure import daemon_cli, dataset_path, touch_memory

ALL_CALLS = (*PP_CALLS, "rank_genes_groups", "leiden")
# name: (cells, genes, leiden graph nodes)
NAMED_TIERS = {"small": (20_000, 20_000, 20_000), "medium": (100_000, 25_000, 100_000)}
# The large tier: 25,000 genes and as many cells as memory allows. The heaviest
# calls per cell: scale's three dense float64 copies of 3,000 genes (~72 kB) and
# normalize_total at 7% density (upstream 5.2 GB client + daemon pool 2.5 GB at
# 100k cells, ~77 kB). Planning at 80 kB per cell against 60% of MemAvailable
# leaves a ~1.7x margin for the parent's comparisons and noise.
LARGE_GENES = 25_000
LARGE_BYTES_PER_CELL = 80_000
LARGE_MEMORY_SHARE = 0.6
LARGE_STEP = 10_000
LEIDEN_MAX_NODES = 100_000


@dataclass
class Tier:
    name: str
    cells: int
    genes: int
    leiden_nodes: int

    @property
    def label(self) -> str:
        return f"{self.name} ({self.cells:,} × {self.genes:,})"


# --- planning -------------------------------------------------------------------
def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def large_tier_cells(available: int) -> int:
    cells = int(available * LARGE_MEMORY_SHARE / LARGE_BYTES_PER_CELL)
    return cells // LARGE_STEP * LARGE_STEP


def plan_tiers(spec: str, available: int) -> tuple[list[Tier], list[str]]:
    """The tiers to run and, for skipped ones, why."""
    tiers, skipped = [], []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in NAMED_TIERS:
            tiers.append(Tier(name, *NAMED_TIERS[name]))
        elif name == "large":
            cells = large_tier_cells(available)
            medium = NAMED_TIERS["medium"][0]
            if cells <= medium:
                skipped.append(f"large: {available / 2**30:.1f} GiB available allows {cells:,} cells "
                               f"(60% of it at 80 kB per cell), not more than medium's {medium:,}")
            else:
                tiers.append(Tier("large", cells, LARGE_GENES, LEIDEN_MAX_NODES))
        elif "x" in name:
            cells, genes = (int(v) for v in name.lower().split("x"))
            tiers.append(Tier(name, cells, genes, min(cells, LEIDEN_MAX_NODES)))
        else:
            raise SystemExit(f"autozyme bench: unknown tier {name!r} (small, medium, large or CELLSxGENES)")
    return tiers, skipped


def default_threads(cores: int) -> list[int]:
    """1, 2, 4, ... below the core count, then all cores."""
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return [*counts, cores]


def parse_threads(spec: str | None, cores: int) -> list[int]:
    if not spec:
        return default_threads(cores)
    counts = set()
    for part in spec.split(","):
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-"))
            counts.update(range(lo, hi + 1))
        elif part.strip():
            counts.add(int(part))
    if not counts or min(counts) < 1:
        raise SystemExit(f"autozyme bench: bad --threads {spec!r}")
    return sorted(counts)


# --- progress -------------------------------------------------------------------
class Progress:
    """``[elapsed 03:12] tier small (20,000 × 20,000) · threads 2 · scale · autozyme run 1/1``,
    flushed, so a report that runs for many minutes shows where it is."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.where: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def at(self, *where: str) -> None:
        self.where = list(where)

    def __call__(self, msg: str) -> None:
        m, s = divmod(int(self.elapsed()), 60)
        print(f"[elapsed {m:02d}:{s:02d}] {' · '.join([*self.where, msg])}", flush=True)


# --- machine --------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = 0
    try:
        total = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                         if x.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    try:
        from ..runtime import expected_build_id

        build = expected_build_id()
    except Exception:  # noqa: BLE001 - only a label
        build = None
    return dict(cpu=cpu, cores=os.cpu_count() or 1, memory=total, memory_available=mem_available(),
                kernel=f"{platform.system()} {platform.release()}", python=platform.python_version(),
                versions={p: _version(p) for p in ("scanpy", "anndata", "numpy", "scipy", "pandas", "numba", "illico",
                                                   "piaso-tools", "autozyme")},
                autozymed=build, date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


# --- rows -----------------------------------------------------------------------
def _peaks(side: dict, phases) -> tuple[int, int]:
    """(client, daemon) peak of the phase whose sum is largest."""
    best = max(phases, key=lambda p: side.get(f"{p}_client_peak", 0) + side.get(f"{p}_daemon_peak", 0))
    return side.get(f"{best}_client_peak", 0), side.get(f"{best}_daemon_peak", 0)


def call_row(tier: Tier, threads: int, call: str, impl: str, up: dict, side: dict, phases,
             equivalent: bool | None, equivalence: str, served: int | None) -> dict:
    client, daemon = _peaks(side, phases)
    row = dict(kind="call", tier=tier.name, call=call, impl=impl, threads=threads,
               cells=up["cells"], genes=up["genes"], nnz=up["nnz"], runs=side.get("runs", 1),
               upstream_time={p: up[p] for p in phases}, time={p: side[p] for p in phases},
               speedup={p: up[p] / side[p] for p in phases},
               upstream_peak=_peaks(up, phases)[0], peak_client=client, peak_daemon=daemon,
               served=served, calls=len(phases) if served is not None else None,
               equivalent=equivalent, equivalence=equivalence,
               daemon_threads=side.get("daemon_threads"))
    if impl == "autozyme" and row["daemon_threads"] not in (None, threads):
        # The sweep is meaningless if the daemon did not get the thread count.
        row["equivalence"] += f" (daemon ran {row['daemon_threads']} threads, not {threads})"
    return row


def failed_row(tier: Tier, threads: int | None, call: str, impl: str, err: Exception) -> dict:
    last = [line for line in str(err).splitlines() if line.strip()]
    return dict(kind="failed", tier=tier.name, call=call, impl=impl, threads=threads,
                equivalent=False, equivalence=f"FAILED: {last[-1] if last else err!r}"[:300],
                error=str(err)[-3000:])


def pp_equivalence(res: dict) -> str:
    ulp = res["max_ulp"]
    return "0 ulp" if ulp == 0 else ("results differ (names, dtypes or shapes)" if ulp is None
                                     else f"max {ulp} ulp")


# --- the run ----------------------------------------------------------------------
def thread_envs(threads: int, runtime_base: Path) -> tuple[dict, dict]:
    """(upstream env, autozyme env) for one thread count: numba's threads for
    upstream; for autozyme a daemon of its own (own runtime dir) with that many
    threads, never exiting for idleness while the report runs."""
    rt = runtime_base / f"t{threads}"
    rt.mkdir(mode=0o700, exist_ok=True)
    up = {"NUMBA_NUM_THREADS": str(threads)}
    az = {**up, "AUTOZYME_THREADS": str(threads), "AUTOZYME_RUNTIME_DIR": str(rt),
          "AUTOZYME_IDLE_TIMEOUT": "0"}
    return up, az


def run(args) -> int:
    from .charts import make_charts

    progress = Progress()
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).expanduser()
    repeat = args.repeat or 1
    machine = machine_info()
    tiers, skipped = plan_tiers(args.tiers, machine["memory_available"])
    threads = parse_threads(args.threads, machine["cores"])
    calls = [c for c in (args.calls or ",".join(ALL_CALLS)).split(",") if c]
    unknown = set(calls) - set(ALL_CALLS)
    if unknown:
        raise SystemExit(f"autozyme bench: unknown calls {', '.join(sorted(unknown))}")
    have_illico = "rank_genes_groups" in calls and rank.illico_installed()
    have_piaso = "leiden" in calls and leiden.piaso_installed()
    for note in skipped:
        print(f"skipping tier {note}", flush=True)
    settings = dict(tiers=[asdict(t) for t in tiers], threads=threads, calls=calls, repeat=repeat,
                    pause=args.pause, density=args.density, scale_genes=args.scale_genes,
                    rgg_cells=args.rgg_cells, rgg_genes=args.rgg_genes, illico=have_illico, piaso=have_piaso,
                    large_rule=dict(genes=LARGE_GENES, bytes_per_cell=LARGE_BYTES_PER_CELL,
                                    memory_share=LARGE_MEMORY_SHARE, step=LARGE_STEP))
    print(f"autozyme bench --report {out}: tiers {', '.join(t.label for t in tiers) or 'none'}; "
          f"threads {', '.join(map(str, threads))}; calls {', '.join(calls)}; {repeat} fresh process(es) "
          f"per side; {machine['cores']} cores, {machine['memory_available'] / 2**30:.1f} GiB available",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    runtime_base = Path(tempfile.mkdtemp(prefix="azm-report-rt-"))
    print(f"daemons: one per tier and thread count, runtime dirs under {runtime_base}", flush=True)
    rows: list[dict] = []
    measured: dict[tuple, str] = {}  # rank subset / leiden graph -> the tier that measured it
    try:
        warm = [c for c in calls if c in (*PP_CALLS, "rank_genes_groups")]
        if warm:
            progress.at("setup")
            progress("warming numba's cache (a throwaway upstream process on small data)")
            try:
                warm_numba_cache(dataset_path(cache, 3_000, 2_000, args.density), warm)
            except RuntimeError as e:  # only a warm-up: upstream's first phase would compile instead
                progress(f"warm-up failed, continuing: {str(e).splitlines()[-1]}")
        for tier in tiers:
            rows += run_tier(tier, threads, calls, args, cache, work, runtime_base, repeat,
                             have_illico, have_piaso, measured, progress)
            # A report runs for many minutes: keep what is measured so far.
            (out / "report.json").write_text(json.dumps(dict(partial=True, machine=machine, settings=settings,
                                                             rows=rows), indent=1, default=str))
    finally:
        for t in threads:
            daemon_cli("stop", thread_envs(t, runtime_base)[1])
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runtime_base, ignore_errors=True)

    report = dict(machine=machine, command=command_line(), settings=settings, skipped=skipped,
                  measured_in={f"{k[0]} {k[1]}": v for k, v in measured.items()},
                  duration_s=progress.elapsed(), rows=rows)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    progress.at("report")
    progress("drawing charts")
    charts = make_charts(report, out)
    (out / "report.md").write_text(render_markdown(report, charts))
    bad = [r for r in rows if r["equivalent"] is False]
    progress(f"wrote {out / 'report.md'} ({len(rows)} rows, {len(charts)} charts, "
             f"{len(bad)} NOT EQUIVALENT or failed)")
    for r in bad:
        print(f"  NOT EQUIVALENT or failed: {r['tier']} · {r['call']} · {r['impl']} · "
              f"threads {r.get('threads')}: {r['equivalence']}", flush=True)
    return 1 if bad else 0


def command_line() -> str:
    """The command that regenerates the report, as the user typed it."""
    argv = sys.argv[1:]
    return "autozyme " + shlex.join(argv)


def run_tier(tier, threads, calls, args, cache, work, runtime_base, repeat, have_illico, have_piaso,
             measured, progress) -> list[dict]:
    rows = []
    density = args.density
    progress.at(f"tier {tier.label}")
    pp = [c for c in calls if c in PP_CALLS]
    data = dataset_path(cache, tier.cells, tier.genes, density) if pp else None
    scale_genes = min(tier.genes, args.scale_genes)
    scale_data = dataset_path(cache, tier.cells, scale_genes, density) if "scale" in calls else None
    # wilcoxon: a subset (upstream takes ~30 s a call at 20k x 10k); the same
    # subset in a later tier is not measured again.
    rgg = (min(tier.cells, args.rgg_cells), min(tier.genes, args.rgg_genes))
    rgg_data = None
    if "rank_genes_groups" in calls and ("rgg", rgg) not in measured:
        measured[("rgg", rgg)] = tier.name
        rgg_data = dataset_path(cache, *rgg, density)
    graph = None
    if "leiden" in calls and ("leiden", tier.leiden_nodes) not in measured:
        measured[("leiden", tier.leiden_nodes)] = tier.name
        progress(f"leiden graph of {tier.leiden_nodes:,} nodes")
        graph = leiden.graph_path(cache, tier.leiden_nodes)
    if data is not None:
        # Fresh guest memory is slow to touch on VMs; whichever side ran first
        # would pay it (see measure.touch_memory).
        touch_memory(min(8 * data.stat().st_size, mem_available() // 2))
    leiden_dir = work / f"leiden-{tier.name}"
    leiden_dir.mkdir(exist_ok=True)
    leiden_results: dict[str, dict] = {}
    for t in threads:
        up_env, az_env = thread_envs(t, runtime_base)
        # One daemon per tier and thread count, started before its calls (as
        # after login) and stopped after, so no pool of an earlier tier lingers.
        failed = daemon_cli("start", az_env)
        if failed:  # the autozyme workers will fail and be marked; upstream's rows still count
            progress.at(f"tier {tier.label}", f"threads {t}")
            progress(f"daemon start failed: {failed.splitlines()[-1] if failed else ''}")
        try:
            for call in pp:
                progress.at(f"tier {tier.label}", f"threads {t}", call)
                src = scale_data if call == "scale" else data
                try:
                    res = measure_call(call, src, work, repeat, args.pause, up_env, az_env, progress)
                    rows.append(call_row(tier, t, call, "autozyme", res["upstream"], res["autozyme"],
                                         PP_PHASES, res["equivalent"], pp_equivalence(res), res["served"]))
                    rows[-1]["max_ulp"] = res["max_ulp"]
                except Exception as e:  # noqa: BLE001 - a long report records the failure and goes on
                    progress(f"FAILED: {str(e).splitlines()[0] if str(e) else repr(e)}")
                    rows.append(failed_row(tier, t, call, "autozyme", e))
            if rgg_data is not None:
                progress.at(f"tier {tier.label}", f"threads {t}", f"rank_genes_groups {rgg[0]:,} × {rgg[1]:,}")
                rows += measure_rank(tier, t, rgg_data, rgg, work, args.pause, repeat, up_env, az_env,
                                     have_illico, progress)
            if graph is not None:
                progress.at(f"tier {tier.label}", f"threads {t}", f"leiden {tier.leiden_nodes:,} nodes")
                # upstream igraph and exact mode are single-threaded (igraph's C
                # core; exact mode runs in the shim): once per graph.
                modes = ([("upstream", up_env), ("exact", az_env)] if t == threads[0] else [])
                modes += [(f"parallel-{t}", az_env)]
                modes += [(f"piaso-{t}", up_env)] if have_piaso else []
                for mode, env in modes:
                    try:
                        leiden_results[mode] = leiden.run_mode(mode, graph, leiden_dir, env, progress)
                    except Exception as e:  # noqa: BLE001 - recorded, the report goes on
                        progress(f"FAILED: {str(e).splitlines()[0] if str(e) else repr(e)}")
                        rows.append(failed_row(tier, t if mode not in ("upstream", "exact") else None,
                                               "leiden", mode.split("-")[0], e))
        finally:
            daemon_cli("stop", az_env)
    if graph is not None and "upstream" in leiden_results:
        progress.at(f"tier {tier.label}", "leiden")
        progress("modularity and agreement")
        for r in leiden.evaluate(graph, leiden_dir, leiden_results):
            rows.append(dict(kind="leiden", tier=tier.name, call="leiden", **r))
    return rows


def measure_rank(tier, t, data, rgg, work, pause, repeat, up_env, az_env, have_illico, progress) -> list[dict]:
    """upstream, autozyme and illico wilcoxon rows at one thread count."""
    rows = []
    phases = rank.PHASES
    sides = [("upstream", up_env), ("autozyme", az_env)] + ([("illico", up_env)] if have_illico else [])
    results = {}
    for mode, env in sides:
        try:
            results[mode] = rank.run_side(mode, data, work, pause, *rgg, t, repeat, env, progress)
        except Exception as e:  # noqa: BLE001 - recorded, the report goes on
            progress(f"FAILED: {str(e).splitlines()[0] if str(e) else repr(e)}")
            rows.append(failed_row(tier, t, "rank_genes_groups", mode, e))
    if "upstream" not in results:
        return rows
    up = results["upstream"]
    up_res = rank.load_result(work, "upstream")
    for mode in ("autozyme", "illico"):
        if mode not in results:
            continue
        cmp = rank.compare(up_res, rank.load_result(work, mode))
        side = results[mode]
        if mode == "autozyme":
            served = side.get("served", 0)
            ok = rank.equivalent(cmp, served)
            text = rank.summary(cmp)
        else:  # illico is a reference: its agreement is shown, not judged
            served, ok, text = None, None, "reference: " + rank.summary(cmp)
        rows.append(call_row(tier, t, "rank_genes_groups", mode, up, side, phases, ok, text, served))
        rows[-1]["comparison"] = cmp
    for mode in results:
        (work / f"rank_genes_groups_{mode}.npz").unlink(missing_ok=True)
    return rows


# --- markdown -------------------------------------------------------------------
NOT_EQUIVALENT = "**NOT EQUIVALENT**"
def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 100:
        return f"{ms:.0f}"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def fmt_phase(row: dict, phase: str) -> str:
    """``upstream → other ms (speedup×)``, the cell of one phase."""
    if phase not in row["time"]:
        return ""
    return (f"{fmt_ms(row['upstream_time'][phase])} → {fmt_ms(row['time'][phase])} ms "
            f"({fmt_x(row['speedup'][phase])})")


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_equivalence(row: dict) -> str:
    if row["equivalent"] is False:
        return f"{NOT_EQUIVALENT}: {cell(row['equivalence'])}"
    return cell(row["equivalence"])


def _served(row: dict) -> str:
    return "" if row.get("served") is None else f"{row['served']}/{row.get('calls') or row.get('seeds')}"


def calls_table(rows: list[dict]) -> list[str]:
    lines = ["| call | side | threads | first | warm | rerun | regroup | peak upstream (MiB) "
             "| peak client + daemon (MiB) | equivalence | served |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "failed":
            lines.append(f"| {r['call']} | {r['impl']} | {r['threads'] or ''} | | | | | | | "
                         f"{fmt_equivalence(r)} | |")
            continue
        daemon = f" + {fmt_mib(r['peak_daemon'])}" if r["impl"] == "autozyme" else ""
        lines.append(f"| {r['call']} | {r['impl']} | {r['threads']} | {fmt_phase(r, 'first')} "
                     f"| {fmt_phase(r, 'warm')} | {fmt_phase(r, 'rerun')} | {fmt_phase(r, 'regroup')} "
                     f"| {fmt_mib(r['upstream_peak'])} | {fmt_mib(r['peak_client'])}{daemon} "
                     f"| {fmt_equivalence(r)} | {_served(r)} |")
    return lines


def leiden_table(rows: list[dict]) -> list[str]:
    lines = ["| row | threads | time (ms) | speedup | modularity | clusters | ARI to upstream "
             "| identical labels | equivalence | served |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "failed":
            lines.append(f"| {r['impl']} | {r['threads'] or ''} | | | | | | | "
                         f"{fmt_equivalence(r)} | |")
            continue
        lines.append(f"| {LEIDEN_NAMES.get(r['impl'], r['impl'])} | {r['threads'] or '-'} | {fmt_ms(r['time'])} "
                     f"| {fmt_x(r['speedup'])} | {r['modularity']:.5f} | {r['clusters']} | {r['ari']:.4f} "
                     f"| {r['identical']}/{r['seeds']} | {fmt_equivalence(r)} | {_served(r)} |")
    return lines


def summary_table(report: dict) -> list[str]:
    """Warm phase (leiden: median over seeds) at the largest thread count, one
    column per tier: the table the README shows."""
    tiers = report["settings"]["tiers"]
    top = max(report["settings"]["threads"])
    rows = [r for r in report["rows"] if r.get("threads") in (top, None)]
    head = "| call | " + " | ".join(f"{t['name']} ({t['cells']:,} × {t['genes']:,})" for t in tiers) + " |"
    lines = [head, "|---" * (len(tiers) + 1) + "|"]
    keys = [(c, "autozyme") for c in (*PP_CALLS, "rank_genes_groups")]
    keys += [("rank_genes_groups", "illico"), ("leiden", "exact"), ("leiden", "parallel"), ("leiden", "piaso")]
    for call, impl in keys:
        cells, any_row = [], False
        for t in tiers:
            match = [r for r in rows if r["tier"] == t["name"] and r["call"] == call and r["impl"] == impl
                     and (r.get("threads") == top or impl == "exact")]
            if not match:
                cells.append("")
                continue
            any_row = True
            r = match[0]
            if r["kind"] == "failed":
                cells.append(f"{NOT_EQUIVALENT} (failed)")
            elif r["kind"] == "leiden":
                cells.append(f"{fmt_ms(r['upstream_time'])} → {fmt_ms(r['time'])} ms ({fmt_x(r['speedup'])})"
                             + (f" {NOT_EQUIVALENT}" if r["equivalent"] is False else ""))
            else:
                cells.append(fmt_phase(r, "warm") + (f" {NOT_EQUIVALENT}" if r["equivalent"] is False else ""))
        if any_row:
            name = CALL_TITLES[call] + ("" if impl == "autozyme" else f" ({LEIDEN_NAMES.get(impl, impl)})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def method_notes(report: dict) -> list[str]:
    s = report["settings"]
    top = max(s["threads"])
    notes = [
        f"- Each side of each call runs in fresh worker processes: {s['repeat']} per side, call, tier and "
        f"thread count (`--repeat`; with more than one, times are medians and peaks the largest). "
        f"Phases: **first** (first call in the process), **warm** (a fresh copy of the data), **rerun** (the same object again), and for "
        f"wilcoxon **regroup** (the same object, another grouping); {s['pause']:g} s apart, as notebook "
        f"cells are.",
        "- Thread counts: upstream workers get `NUMBA_NUM_THREADS=t`; autozyme workers a daemon of their "
        "own started with `AUTOZYME_THREADS=t` (its own runtime dir) before the tier's calls and stopped "
        "after, so it is running as after login but holds no pool from an earlier tier: autozyme's first "
        "process of a tier pays for its shared segments. illico gets `n_threads=t`, PIASO `n_threads=t`.",
        "- Before the tiers, a throwaway upstream process runs every call on small data to fill numba's "
        "on-disk cache, as for anyone who has called these functions before.",
        f"- Tiers: small 20,000 × 20,000; medium 100,000 × 25,000; large {LARGE_GENES:,} genes and as many "
        f"cells as {LARGE_MEMORY_SHARE:.0%} of MemAvailable at start allows at {LARGE_BYTES_PER_CELL // 1000} kB "
        f"per cell, in steps of {LARGE_STEP:,} (the heaviest calls per cell: scale's three dense float64 "
        f"copies of 3,000 genes, and normalize_total with upstream's copy plus autozyme's pool), skipped "
        f"unless above medium. Generated counts, {s['density']:.0%} density before duplicates merge "
        f"(lognormal gene popularity and depth, 8 clusters, Poisson + 1 values), 7 batches of unequal size.",
        f"- normalize_total (`target_sum=1e4`), log1p and hvg (`flavor='seurat_v3', batch_key='batch', "
        f"n_top_genes=2000`) run on the tier's counts. scale (`max_value=8`) runs on the tier's cells × "
        f"{s['scale_genes']:,} genes (the highly variable genes it usually gets; its result is dense "
        f"float64), scaled to 1e4 per cell and log1p'd first.",
        f"- rank_genes_groups (`method='wilcoxon'`, scanpy's defaults otherwise, 9 groups of unequal size; "
        f"regroup: 5 groups) runs on min(cells, {s['rgg_cells']:,}) × min(genes, {s['rgg_genes']:,}), "
        f"log-normalised, because upstream takes ~30 s a call at 20,000 × 10,000; a later tier with the "
        f"same subset is not measured again. autozyme's fold changes may differ from upstream's by a few "
        f"float32 ulp (the README explains why); every other field must be bit-identical.",
        "- leiden: `flavor='igraph'`, resolution 0.8, seeds 0, 1, 2 in one fresh process per row, median "
        "time, on a 12-nearest-neighbour graph of the tier's leiden size (small: 20,000 nodes; medium and "
        "large: 100,000; a custom tier: its cells, at most 100,000); a graph measured in one tier is not "
        "measured again. upstream igraph and exact mode are single-threaded, so they run once per graph; "
        "their speedups in the thread sweep are against that one run. Exact mode must give upstream's labels "
        "for every seed; parallel mode is autozyme's own Leiden (modularity and ARI are shown) and must "
        "give the same labels at every thread count.",
        f"- Peak memory: the peak resident size (VmHWM) of the worker and of the daemon, in the phase where "
        f"their sum is largest; shared segments count in both, so client + daemon overstates autozyme's "
        f"real total. Summary, charts: warm phase at {top} thread(s).",
    ]
    if s["illico"]:
        notes.append("- illico (`asymptotic_wilcoxon`, scanpy-matching settings: no continuity correction, "
                     "tie correction, fold changes exponentiated after averaging) is a reference: its "
                     "agreement with upstream is shown, not judged.")
    if s["piaso"]:
        notes.append("- PIASO (`piaso.tl.leiden(backend='rust')`, `n_iterations=-1` (until stable) as the scanpy calls here) is a "
                     "reference: modularity and ARI are shown, not judged.")
    notes.append("- **NOT EQUIVALENT** marks a run whose result differed from upstream's beyond the claim "
                 "above, a call autozyme did not serve, or a failed worker; such runs stay in every table "
                 "and chart (red, hatched bars).")
    return notes


def render_markdown(report: dict, charts: list[tuple[str, str]]) -> str:
    m, s = report["machine"], report["settings"]
    v = m["versions"]
    rows = report["rows"]
    minutes, secs = divmod(int(report["duration_s"]), 60)
    extras = ", ".join(f"{p} {v[p]}" for p in ("illico", "piaso-tools") if v.get(p))
    lines = [
        "# autozyme benchmark report", "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['memory'] / 2**30:.1f} GiB RAM "
        f"({m['memory_available'] / 2**30:.1f} GiB available at start), {m['kernel']}; Python {m['python']}, "
        f"scanpy {v['scanpy']}, anndata {v['anndata']}, numpy {v['numpy']}, scipy {v.get('scipy')}, "
        f"pandas {v.get('pandas')}, numba {v['numba']}"
        + (f", {extras}" if extras else "") + f"; autozymed {m['autozymed']}. {m['date']}, "
        f"{minutes} min {secs} s.", "",
        f"**Regenerate:** `{report['command']}`", "",
    ]
    bad = [r for r in rows if r["equivalent"] is False]
    judged = [r for r in rows if r["equivalent"] is not None]
    if bad:
        lines.append(f"**Equivalence:** {NOT_EQUIVALENT}: {len(bad)} of {len(judged)} runs (marked below).")
    else:
        lines.append(f"**Equivalence:** all {len(judged)} judged autozyme runs met their claim (bit-identical "
                     f"to upstream; wilcoxon's fold changes within a few ulp; leiden parallel mode the same "
                     f"labels at every thread count: see Method).")
    lines += ["", "## Summary", "", f"Warm phase, upstream → autozyme, at {max(s['threads'])} thread(s) "
              f"(leiden: median over seeds; exact mode is single-threaded):", ""]
    lines += summary_table(report)
    lines.append("")
    for title, name in charts:
        lines += [f"![{title}]({name})", ""]
    lines += ["## Method", ""] + method_notes(report) + [""]
    if report["skipped"]:
        lines += ["Skipped: " + "; ".join(report["skipped"]) + ".", ""]
    for tier in s["tiers"]:
        trows = [r for r in rows if r["tier"] == tier["name"]]
        lines += [f"## Tier {tier['name']}: {tier['cells']:,} cells × {tier['genes']:,} genes", ""]
        crows = sorted((r for r in trows if r["call"] != "leiden"),
                       key=lambda r: (ALL_CALLS.index(r["call"]), r["impl"] != "autozyme", r.get("threads") or 0))
        if crows:
            sizes: dict[tuple, list[str]] = {}
            for r in crows:
                if "nnz" in r and r["call"] not in sizes.setdefault((r["cells"], r["genes"], r["nnz"]), []):
                    sizes[(r["cells"], r["genes"], r["nnz"])].append(r["call"])
            lines.append("Data: " + "; ".join(f"{', '.join(c)}: {n:,} × {g:,} ({z / 1e6:.1f}M non-zeros)"
                                              for (n, g, z), c in sizes.items()) + ".")
            lines += ["", "### Calls", ""] + calls_table(crows) + [""]
        order = list(LEIDEN_NAMES)
        lrows = sorted((r for r in trows if r["call"] == "leiden"),
                       key=lambda r: (order.index(r["impl"]) if r["impl"] in order else len(order),
                                      r.get("threads") or 0))
        if lrows:
            first = next((r for r in lrows if r["kind"] == "leiden"), None)
            edges = f", {first['edges'] / 1e6:.2f}M stored edges" if first else ""
            lines += [f"### leiden ({tier['leiden_nodes']:,} nodes{edges})", ""] + leiden_table(lrows) + [""]
        elsewhere = [f"{'wilcoxon' if k.startswith('rgg') else 'leiden'} in tier {w}"
                     for k, w in report["measured_in"].items() if w != tier["name"]
                     and _tier_uses(tier, k, s)]
        if elsewhere:
            lines += ["Same data measured earlier: " + ", ".join(elsewhere) + ".", ""]
    lines += ["Raw rows: [report.json](report.json).", ""]
    return "\n".join(lines)


def _tier_uses(tier: dict, key: str, settings: dict) -> bool:
    """Whether ``tier`` would have used the rank subset / leiden graph ``key``."""
    kind, size = key.split(" ", 1)
    if kind == "rgg":
        return size == str((min(tier["cells"], settings["rgg_cells"]), min(tier["genes"], settings["rgg_genes"])))
    return size == str(tier["leiden_nodes"])
