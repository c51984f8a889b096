"""The example notebook, run the way a user runs it: in a real Jupyter kernel
(ipykernel, driven by nbclient), with ``%load_ext autozyme`` at the top.

The notebook asserts itself that ``autozyme.profile()`` saw all six calls run by
autozyme and that, after ``%unload_ext autozyme``, upstream scanpy gives equal
results; here the ``%%autozyme.profile`` cell's table is checked for a row of each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tutorial.ipynb"
CALLS = ("highly_variable_genes", "normalize_total", "log1p", "scale", "leiden", "rank_genes_groups")


def test_tutorial_notebook_in_a_real_kernel(runtime_dir, monkeypatch):
    # The six calls above; neighbors/umap's warm worker is tested in test_warm.py
    # (off here: counted as delegated, the notebook's neighbors runs upstream).
    monkeypatch.setenv("AUTOZYME_WARM", "0")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment: the test daemon's runtime
    # dir, AUTOZYME_STRICT=1 (a fallback in the notebook is an error) and, when
    # the tests run against the source tree, its PYTHONPATH.
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    profile_cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%autozyme.profile"))
    html = "".join(o.get("data", {}).get("text/html", "") for o in profile_cell.outputs)
    assert html.count("<td>autozyme</td>") == len(CALLS), html
    for call in CALLS:
        assert f"<td>{call}</td>" in html, call
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "identical to upstream scanpy" in outputs
