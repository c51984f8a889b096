"""`autozyme bench --report DIR` on a tiny custom tier at two thread counts:
the files exist, the PNGs are images, the markdown's numbers are report.json's,
the daemon of each thread count really ran that many threads, and no daemon is
left behind. One run (about a minute) shared by the tests of this module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autozyme.bench.labels import LEIDEN_NAMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARGS = ["--tiers", "3000x2000", "--threads", "1,2", "--calls", "normalize_total,rank_genes_groups,leiden",
        "--repeat", "1", "--pause", "0", "--rgg-cells", "1000", "--rgg-genes", "500"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cache = tmp_path_factory.mktemp("cache")
    # The report starts its own daemons (one runtime dir per thread count); the
    # session's AUTOZYME_RUNTIME_DIR (conftest) is inherited but not used by them.
    proc = subprocess.run([sys.executable, "-m", "autozyme.cli", "bench", "--report", str(out),
                           "--cache", str(cache), *ARGS],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_files_and_images(report):
    out, stdout, data, md = report
    import matplotlib.image

    for name in ("speedup.png", "threads.png", "memory.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 400
        assert f"]({name})" in md  # embedded in report.md
    assert not list(out.glob(".work-*"))  # scratch results removed
    assert data["command"].startswith("autozyme bench --report ")


def test_progress_and_no_daemon_left(report):
    _, stdout, _, _ = report
    lines = [line for line in stdout.splitlines() if line.startswith("[elapsed ")]
    assert any("· threads 2 · normalize_total · autozyme run 1/1" in line for line in lines)
    assert any("leiden" in line for line in lines)
    base = re.search(r"runtime dirs under (\S+)", stdout).group(1)
    assert not Path(base).exists()
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and base.encode() in (proc / "cmdline").read_bytes():
                alive.append(proc.name)
        except OSError:
            pass
    assert not alive, f"daemons left running: {alive}"


def test_sweep_ran_each_thread_count(report):
    _, _, data, _ = report
    rows = [r for r in data["rows"] if r["impl"] == "autozyme"]
    assert {r["threads"] for r in rows} == {1, 2}
    for r in rows:
        assert r["daemon_threads"] == r["threads"]
        assert r["equivalent"] is True, r
    leiden = {(r["impl"], r["threads"]) for r in data["rows"] if r["call"] == "leiden"}
    assert {("upstream", None), ("exact", None), ("parallel", 1), ("parallel", 2)} <= leiden
    assert all(r["equivalent"] is not False for r in data["rows"])
    assert "NOT EQUIVALENT**:" not in report[3]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("×"))


def _close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` rounded as printed (3-4 significant digits, or
    thousands without decimals)."""
    x = _number(shown)
    decimals = len(shown.split(".")[1].rstrip("×")) if "." in shown else 0
    return abs(x - value) <= 0.51 * 10 ** -decimals + 1e-12


def _table_rows(md: str, tier: str, header_start: str) -> list[list[str]]:
    """The cells of the table whose header starts with ``header_start`` in the
    section of ``tier``."""
    section = md.split(f"## Tier {tier}:", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


PHASE_CELL = re.compile(r"^([\d,.]+) → ([\d,.]+) ms \(([\d,.]+)×\)$")


def test_markdown_numbers_match_json(report):
    _, _, data, md = report
    tier = data["settings"]["tiers"][0]["name"]
    calls = [r for r in data["rows"] if r["kind"] == "call"]
    table = _table_rows(md, tier, "| call | side | threads |")
    assert len(table) == len(calls)
    for r in calls:
        cells = next(c for c in table if c[:3] == [r["call"], r["impl"], str(r["threads"])])
        for phase, cell in zip(("first", "warm", "rerun", "regroup"), cells[3:7]):
            if phase not in r["time"]:
                assert cell == ""
                continue
            up, az, ratio = PHASE_CELL.match(cell).groups()
            assert _close(up, r["upstream_time"][phase] * 1000), (cell, r)
            assert _close(az, r["time"][phase] * 1000), (cell, r)
            assert _close(ratio, r["speedup"][phase]), (cell, r)
        assert _close(cells[7], r["upstream_peak"] / 2**20)
        client = cells[8].split(" + ")
        assert _close(client[0], r["peak_client"] / 2**20)
        if r["impl"] == "autozyme":
            assert _close(client[1], r["peak_daemon"] / 2**20)
            assert cells[9] == r["equivalence"].replace("|", "\\|")
            assert cells[10] == f"{r['served']}/{r['calls']}"

    leiden = [r for r in data["rows"] if r["kind"] == "leiden"]
    table = _table_rows(md, tier, "| row | threads |")
    assert len(table) == len(leiden)
    for r in leiden:
        cells = next(c for c in table
                     if c[:2] == [LEIDEN_NAMES[r["impl"]], str(r["threads"]) if r["threads"] else "-"])
        assert _close(cells[2], r["time"] * 1000), (cells, r)
        assert _close(cells[3], r["speedup"]), (cells, r)
        assert _close(cells[4], r["modularity"])
        assert cells[7] == f"{r['identical']}/{r['seeds']}"

    # The summary: warm phase at the largest thread count.
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    row = next(r for r in calls if r["call"] == "normalize_total" and r["threads"] == 2)
    line = next(line for line in summary.splitlines() if line.startswith("| normalize_total |"))
    up, az, ratio = PHASE_CELL.match(line.split("|")[2].strip()).groups()
    assert _close(up, row["upstream_time"]["warm"] * 1000) and _close(az, row["time"]["warm"] * 1000)
    assert _close(ratio, row["speedup"]["warm"])


def test_tier_and_thread_planning():
    from autozyme.bench.report import default_threads, plan_tiers

    tiers, skipped = plan_tiers("small,medium,large", 32 * 2**30)
    assert [(t.name, t.cells, t.genes, t.leiden_nodes) for t in tiers] == [
        ("small", 20_000, 20_000, 20_000), ("medium", 100_000, 25_000, 100_000),
        ("large", 250_000, 25_000, 100_000)]  # 60% of 32 GiB at 80 kB a cell, in steps of 10,000
    tiers, skipped = plan_tiers("large,3000x2000", 12 * 2**30)
    assert [t.name for t in tiers] == ["3000x2000"] and tiers[0].leiden_nodes == 3000
    assert len(skipped) == 1 and skipped[0].startswith("large:")
    assert default_threads(2) == [1, 2] and default_threads(12) == [1, 2, 4, 8, 12]
