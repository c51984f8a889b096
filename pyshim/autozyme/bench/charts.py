"""PNG charts of a ``autozyme bench --report`` run (autozyme.bench.charts; matplotlib, Agg backend).

Every chart is drawn from report.json's rows and labels its bars or points
with the same formatted ratios the tables show, so a chart and its table
cannot disagree. Runs that are not equivalent (or failed) are drawn red and
hatched, never dropped.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .calls import PP_CALLS  # noqa: E402
from .labels import CALL_TITLES, LEIDEN_NAMES, fmt_x  # noqa: E402

PHASE_COLORS = {"first": "#9ecae1", "warm": "#2171b5", "rerun": "#6baed6"}
REFERENCE_COLORS = {"first": "#d9d9d9", "warm": "#737373", "rerun": "#bdbdbd"}
BAD = dict(facecolor="#fcbba1", edgecolor="#cb181d", hatch="///", linewidth=1.2)
# One color per call in every panel, even where a tier lacks a call.
CALL_COLORS = dict(zip((*PP_CALLS, "rank_genes_groups", "leiden"),
                       ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]))


def _finish(fig, path: Path, title: str, handles, labels=None, ncol: int = 5) -> None:
    """Title on top, legend below the axes (constrained layout keeps them
    clear of each other), saved as PNG."""
    fig.suptitle(title, fontsize=11)
    if labels is None:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _top(report: dict) -> int:
    return max(report["settings"]["threads"])


def _tiers(report: dict) -> list[dict]:
    """Tiers with at least one row (a tier whose every call was measured in an
    earlier tier would draw an empty panel)."""
    names = {r["tier"] for r in report["rows"]}
    return [t for t in report["settings"]["tiers"] if t["name"] in names]


def _groups(report: dict, tier: str, threads: int) -> list[tuple[str, dict, bool]]:
    """(label, row, is_reference) per bar group of one tier at ``threads``."""
    rows = [r for r in report["rows"] if r["tier"] == tier]
    out = []
    for call in (*PP_CALLS, "rank_genes_groups"):
        for impl in ("autozyme", "illico"):
            match = [r for r in rows if r["call"] == call and r["impl"] == impl and r.get("threads") == threads]
            if match:
                label = CALL_TITLES[call] + ("" if impl == "autozyme" else "\n(illico)")
                out.append((label, match[0], impl != "autozyme"))
    for impl in ("exact", "parallel", "piaso"):
        match = [r for r in rows if r["call"] == "leiden" and r["impl"] == impl
                 and (r.get("threads") in (threads, None) if impl == "exact" else r.get("threads") == threads)]
        if match:
            out.append((f"leiden\n{LEIDEN_NAMES[impl].split(' ')[0]}", match[0], impl == "piaso"))
    return out


def _label(ax, bar, text: str, bad: bool = False) -> None:
    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                textcoords="offset points", ha="center", va="bottom", fontsize=6.5, rotation=90,
                color="#cb181d" if bad else "black", fontweight="bold" if bad else "normal")


def speedup_chart(report: dict, path: Path) -> None:
    tiers, top = _tiers(report), _top(report)
    fig, axes = plt.subplots(len(tiers), 1, figsize=(11, 3.6 * len(tiers)), squeeze=False,
                             layout="constrained")
    width = 0.26
    for ax, tier in zip(axes[:, 0], tiers):
        groups = _groups(report, tier["name"], top)
        for i, (label, row, ref) in enumerate(groups):
            bad = row["equivalent"] is False
            if row["kind"] == "failed":
                bar = ax.bar(i, 1.0, width * 3, **BAD)[0]
                _label(ax, bar, "FAILED", True)
                continue
            if row["kind"] == "leiden":  # one time per row: median over the seeds
                style = BAD if bad else dict(color=(REFERENCE_COLORS if ref else PHASE_COLORS)["warm"])
                bar = ax.bar(i, row["speedup"], width, **style)[0]
                _label(ax, bar, fmt_x(row["speedup"]) + (" NOT EQUIV." if bad else ""), bad)
                continue
            for j, phase in enumerate(("first", "warm", "rerun")):
                colors = REFERENCE_COLORS if ref else PHASE_COLORS
                style = BAD if bad else dict(color=colors[phase])
                bar = ax.bar(i + (j - 1) * width, row["speedup"][phase], width, **style)[0]
                _label(ax, bar, fmt_x(row["speedup"][phase]) + (" NOT EQUIV." if bad else ""), bad)
        ax.set_yscale("log")
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
        ax.set_ylabel("speedup vs upstream (×, log)")
        ax.set_title(f"tier {tier['name']} ({tier['cells']:,} × {tier['genes']:,}), {top} thread(s)", fontsize=10)
        ax.margins(y=0.25)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.5), hi * 3)  # room for the rotated labels
    handles = [Patch(color=PHASE_COLORS[p], label=f"autozyme {p}") for p in PHASE_COLORS]
    handles += [Patch(color=REFERENCE_COLORS["warm"], label="illico / PIASO (reference)"),
                Patch(**BAD, label="NOT EQUIVALENT / failed")]
    _finish(fig, path, "Speedup vs upstream per call (leiden: one bar, median over seeds 0-2)", handles)


def _sweep_series(report: dict, tier: str):
    """Per call: (call, title, [(threads, upstream s, autozyme s, equivalent)])."""
    rows = [r for r in report["rows"] if r["tier"] == tier and r["kind"] != "failed"]
    series = []
    for call in (*PP_CALLS, "rank_genes_groups"):
        pts = sorted((r["threads"], r["upstream_time"]["warm"], r["time"]["warm"], r["equivalent"])
                     for r in rows if r["call"] == call and r["impl"] == "autozyme")
        if pts:
            series.append((call, CALL_TITLES[call], pts))
    pts = sorted((r["threads"], r["upstream_time"], r["time"], r["equivalent"])
                 for r in rows if r["call"] == "leiden" and r["impl"] == "parallel")
    if pts:
        series.append(("leiden", "leiden parallel mode (upstream: igraph, single-threaded)", pts))
    return series


def thread_chart(report: dict, path: Path) -> None:
    tiers = _tiers(report)
    threads = report["settings"]["threads"]
    fig, axes = plt.subplots(1, len(tiers), figsize=(max(5.5 * len(tiers), 8), 5.6), squeeze=False,
                             layout="constrained")
    for ax, tier in zip(axes[0], tiers):
        for call, title, pts in _sweep_series(report, tier["name"]):
            color = CALL_COLORS[call]
            ts = [p[0] for p in pts]
            ax.plot(ts, [p[1] * 1000 for p in pts], "--x", color=color, alpha=0.7)
            ax.plot(ts, [p[2] * 1000 for p in pts], "-o", color=color, label=title)
            for t, up, az, ok in pts:
                bad = ok is False
                ax.annotate(fmt_x(up / az) + (" NOT EQUIV." if bad else ""), (t, az * 1000), xytext=(4, -3),
                            textcoords="offset points", fontsize=6.5, color="#cb181d" if bad else color)
                if bad:
                    ax.plot([t], [az * 1000], "X", color="#cb181d", markersize=11)
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(threads, [str(t) for t in threads])
        ax.minorticks_off()
        ax.set_xlabel("threads (upstream: NUMBA_NUM_THREADS; autozyme: daemon threads)", fontsize=8)
        ax.set_ylabel("warm-phase time (ms, log)")
        ax.set_title(f"tier {tier['name']} ({tier['cells']:,} × {tier['genes']:,})", fontsize=10)
    # The legend from every panel, each call once.
    labelled = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    _finish(fig, path, "Thread sweep: autozyme (solid, labelled with speedup) vs upstream (dashed)",
            list(labelled.values()), list(labelled), ncol=3)


def memory_chart(report: dict, path: Path) -> None:
    tiers, top = _tiers(report), _top(report)
    fig, axes = plt.subplots(len(tiers), 1, figsize=(10, 3.4 * len(tiers)), squeeze=False,
                             layout="constrained")
    width = 0.38
    for ax, tier in zip(axes[:, 0], tiers):
        groups = [g for g in _groups(report, tier["name"], top)
                  if g[1]["kind"] == "call" and g[1]["impl"] == "autozyme"]
        for i, (_, row, _) in enumerate(groups):
            gib = 2**30
            up = row["upstream_peak"] / gib
            client, daemon = row["peak_client"] / gib, row["peak_daemon"] / gib
            bad = row["equivalent"] is False
            ax.bar(i - width / 2, up, width, color="#969696")
            ax.bar(i + width / 2, client, width, **(BAD if bad else dict(color="#2171b5")))
            top_bar = ax.bar(i + width / 2, daemon, width, bottom=client,
                             **(BAD if bad else dict(color="#9ecae1")))[0]
            ratio = (client + daemon) / up if up else float("nan")
            ax.annotate(f"{fmt_x(ratio)} of upstream" + (" NOT EQUIV." if bad else ""),
                        (top_bar.get_x() + width / 2, client + daemon), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color="#cb181d" if bad else "black")
        ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
        ax.set_ylabel("peak resident (GiB)")
        ax.set_title(f"tier {tier['name']} ({tier['cells']:,} × {tier['genes']:,}), {top} thread(s)", fontsize=10)
        ax.margins(y=0.2)
    handles = [Patch(color="#969696", label="upstream (client)"), Patch(color="#2171b5", label="autozyme client"),
               Patch(color="#9ecae1", label="autozyme daemon (shared segments count in both)")]
    _finish(fig, path, "Peak memory in the largest phase, autozyme client + daemon vs upstream", handles, ncol=3)


def make_charts(report: dict, out: Path) -> list[tuple[str, str]]:
    """Writes the PNGs into ``out``; returns (title, file name) of each."""
    if not _tiers(report):
        return []
    charts = [("Speedup per call and tier", "speedup.png", speedup_chart),
              ("Thread sweep", "threads.png", thread_chart),
              ("Peak memory, client + daemon vs upstream", "memory.png", memory_chart)]
    done = []
    for title, name, draw in charts:
        draw(report, out / name)
        done.append((title, name))
    return done
