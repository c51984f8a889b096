"""Names and number formats shared by the report's tables (report.py) and its charts (charts.py).

Kept apart so that both draw on the same labels while the charts module, which
imports matplotlib, is imported by the report only when it draws.
"""

from __future__ import annotations

CALL_TITLES = {"normalize_total": "normalize_total", "log1p": "log1p", "scale": "scale",
               "highly_variable_genes": "hvg seurat_v3", "rank_genes_groups": "wilcoxon", "leiden": "leiden"}
LEIDEN_NAMES = {"upstream": "upstream igraph", "exact": "exact mode", "parallel": "parallel mode",
                "piaso": "PIASO (rust)", "leidenalg": "upstream leidenalg"}


def fmt_x(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:.0f}×"
    return f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.2f}×"
