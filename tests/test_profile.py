"""autozyme.profile() and the IPython magics: where each patched call ran."""

from __future__ import annotations

import numpy as np
import pytest

from _data import counts


def test_profile_rows_for_served_and_fallen_back_calls(active, monkeypatch):
    import autozyme

    sc = active
    ad = counts(300, 50, seed=1)
    with autozyme.profile() as p:
        sc.pp.normalize_total(ad)
        sc.pp.log1p(ad)
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
        sc.pp.normalize_total(ad, target_sum=np.array([1.0]))  # out of scope: upstream
    sc.pp.log1p(ad.copy())  # after the block: not recorded
    assert [r["call"] for r in p.calls] == ["normalize_total", "log1p", "normalize_total"]
    assert [r["ran"] for r in p.calls] == ["autozyme", "autozyme", "upstream"]
    assert p.calls[0]["reason"] is None and "target_sum" in p.calls[2]["reason"]
    assert all(r["seconds"] >= 0 for r in p.calls)
    t = p.totals()
    assert t["autozyme"]["calls"] == 2 and t["upstream"]["calls"] == 1
    text, page = repr(p), p._repr_html_()
    assert "normalize_total" in text and "upstream" in text and "<table>" in page


def test_magics_in_an_ipython_shell(active, capsys):
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    import autozyme

    # The process's one shell (another test may have made it already).
    ip = InteractiveShell.instance()
    autozyme.load_ipython_extension(ip)
    ip.user_ns["ad"] = counts(200, 40, seed=2)
    ip.run_cell_magic("autozyme.profile", "", "import scanpy as sc\nsc.pp.normalize_total(ad)\nsc.pp.log1p(ad)")
    out = capsys.readouterr().out
    assert "normalize_total" in out and "log1p" in out and "2 by autozyme" in out
    status = ip.run_line_magic("autozyme", "")
    page = status._repr_html_()
    assert "normalize_total" in repr(status) and "<table>" in page
    assert "<td>normalize_total</td>" in page and "<td>leiden</td>" in page


def test_where_each_call_ran_is_logged_at_scanpys_verbosity(active, monkeypatch):
    import io
    import sys

    sc = active
    ad = counts(200, 40, seed=3)
    old = sc.settings.verbosity, sc.settings.logfile
    log = io.StringIO()
    try:
        sc.settings.logfile = log
        sc.settings.verbosity = "warning"  # scanpy's default: nothing from autozyme
        sc.pp.normalize_total(ad.copy())
        assert "autozyme" not in log.getvalue()
        sc.settings.verbosity = "hint"
        sc.pp.normalize_total(ad.copy())
        monkeypatch.setenv("AUTOZYME_STRICT", "0")
        sc.pp.normalize_total(ad.copy(), target_sum=np.array([1.0]))
    finally:
        sc.settings.verbosity, sc.settings.logfile = old[0], old[1] if old[1] is not None else sys.stderr
    text = log.getvalue()
    assert "autozyme served normalize_total" in text
    assert "autozyme: normalize_total ran in upstream: scope: target_sum" in text
