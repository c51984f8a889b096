"""An offline stand-in for ``sc.datasets.pbmc3k()`` (10x PBMC 3k raw counts).

scanpy's tests load pbmc3k through ``sc.datasets.pbmc3k()``, which reads
``settings.datasetdir / "pbmc3k_raw.h5ad"`` and downloads it when the file is
missing; these machines cannot download it. This module writes a synthetic file
of the same *shape and kind* once, and the ``offline_datasets`` plugin puts it where
the loader looks, so those tests run offline:

* 2,700 cells x 32,738 genes, raw integer counts stored as float32 CSR (like the real
  file, which ``read_10x_mtx`` wrote);
* obs_names like 10x barcodes (``AAACATACAACCAC-1``), no obs columns; var_names unique
  symbol-like names and ``var["gene_ids"]`` Ensembl-like ids (the real file's only
  var column);
* about half of the genes all-zero (the real file has 16,104 of 32,738), scattered
  over the gene axis, so every slice the tests take (``[:1000, :500]``,
  ``[:1500, :1000]``, ``[:200]``) has both expressed and empty genes;
* about 2.6 % of the entries stored overall (the real file: 2,286,884 of 88.4 M),
  a median of ~830 genes and ~2,200 counts per cell (real: 817 and 2,197), from a
  gamma-Poisson (negative binomial) model with log-normal gene abundances,
  log-normal cell depths and a few cell groups with their own marker genes, so
  highly-variable-gene methods and the loess fit of seurat_v3 see over-dispersed,
  structured counts.

The abundance spread (sigma 2.2) and the strong over-dispersion (theta ~0.35) are
chosen together: a wider spread reaches the same sparsity with many more genes seen
once or twice, and then, in the small slices the tests take, so many genes share the
lowest mean that scikit-misc's loess (seurat_v3) stops with "There are other near
singularities" / "reciprocal condition number"; the real data does not do that.

Nothing about the real dataset's values is reproduced: a test that compares with
stored results of the real pbmc3k cannot pass on it and is deselected (see the
deselect-<version>.txt files). Seeded, so the file is the same on every run.

Imports anndata/numpy/scipy/pandas only, never scanpy. Run in the runner's
process, not in pytest's.
"""

from __future__ import annotations

import os
from pathlib import Path

FILENAME = "pbmc3k_raw.h5ad"  # the name sc.datasets.pbmc3k() reads under datasetdir
# Bump when the generator changes: a stand-in with another stamp is regenerated.
STAMP = "pbmc3k-standin v2 seed 20261206"
SEED = 20261206

N_CELLS = 2_700
N_GENES = 32_738
# Fraction of genes given any expression at all; a few of those still draw no
# count, so the all-zero share ends near the real 49 %.
EXPRESSED_FRACTION = 0.52
N_GROUPS = 6  # cell groups ("cell types")
MARKERS_PER_GROUP = 150
CELL_CHUNK = 300  # cells simulated at once (bounds memory to ~100 MB)


def _barcodes(rng, n: int) -> list[str]:
    bases = "ACGT"
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        codes = rng.integers(0, 4, size=(n, 14))
        for row in codes:
            bc = "".join(bases[i] for i in row) + "-1"
            if bc not in seen:
                seen.add(bc)
                out.append(bc)
                if len(out) == n:
                    break
    return sorted(out)  # 10x writes barcodes sorted


def generate():
    """Return the stand-in AnnData (seeded; no file I/O)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(SEED)

    expressed = np.flatnonzero(rng.random(N_GENES) < EXPRESSED_FRACTION)
    n_expr = expressed.size
    # relative abundance of each expressed gene: heavy-tailed, like UMI data
    # (a few genes take percent of all counts, most are seen in a handful of cells)
    abundance = rng.lognormal(mean=0.0, sigma=2.2, size=n_expr)
    abundance /= abundance.sum()
    # gene-wise inverse dispersion of the negative binomial (small: bursty expression,
    # so a gene's counts gather in fewer cells at the same mean)
    theta = rng.lognormal(mean=np.log(0.35), sigma=0.6, size=n_expr)

    # cell groups with their own up-regulated marker genes
    group_of_cell = rng.choice(N_GROUPS, size=N_CELLS, p=rng.dirichlet(np.full(N_GROUPS, 4.0)))
    group_factor = np.ones((N_GROUPS, n_expr))
    for g in range(N_GROUPS):
        markers = rng.choice(n_expr, size=MARKERS_PER_GROUP, replace=False)
        group_factor[g, markers] = rng.lognormal(mean=np.log(6.0), sigma=0.7, size=MARKERS_PER_GROUP)
    # total counts per cell (sequencing depth)
    depth = rng.lognormal(mean=np.log(2_200.0), sigma=0.45, size=N_CELLS)

    chunks = []
    for start in range(0, N_CELLS, CELL_CHUNK):
        stop = min(start + CELL_CHUNK, N_CELLS)
        p = abundance * group_factor[group_of_cell[start:stop]]
        p /= p.sum(axis=1, keepdims=True)
        mu = depth[start:stop, None] * p
        # gamma-Poisson = negative binomial with mean mu and inverse dispersion theta
        lam = rng.gamma(shape=theta, scale=mu / theta)
        counts = rng.poisson(lam).astype(np.float32)
        chunks.append(sparse.csr_matrix(counts))
    x_expr = sparse.vstack(chunks, format="csr")
    # place the simulated columns at their gene positions; the rest stay empty
    x_expr = x_expr.tocoo()
    x = sparse.csr_matrix(
        (x_expr.data, (x_expr.row, expressed[x_expr.col])),
        shape=(N_CELLS, N_GENES),
        dtype=np.float32,
    )
    x.sort_indices()
    x.indptr = x.indptr.astype(np.int32)
    x.indices = x.indices.astype(np.int32)

    obs = pd.DataFrame(index=pd.Index(_barcodes(rng, N_CELLS)))
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{200_000 + 7 * i:011d}" for i in range(N_GENES)]},
        index=pd.Index([f"SG{i:05d}" for i in range(N_GENES)]),
    )
    return ad.AnnData(x, obs=obs, var=var)


def ensure(directory: Path) -> Path:
    """Write the stand-in into `directory` unless a current one is there; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    stamp = directory / (FILENAME + ".stamp")
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == STAMP:
        return path
    adata = generate()
    tmp = directory / (FILENAME + f".partial-{os.getpid()}")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    stamp.write_text(STAMP + "\n")
    return path


def describe(path: Path) -> str:
    """One line of the stand-in's vital statistics (for the README / a sanity check)."""
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(path)
    x = a.X
    counts_per_gene = np.asarray(x.sum(axis=0)).ravel()
    genes_per_cell = np.diff(x.indptr)
    totals = np.asarray(x.sum(axis=1)).ravel()
    return (
        f"{a.n_obs} x {a.n_vars} {type(x).__name__} {x.dtype}; "
        f"nnz {x.nnz} ({x.nnz / (a.n_obs * a.n_vars):.2%}); "
        f"all-zero genes {(counts_per_gene == 0).sum()}; "
        f"genes/cell median {np.median(genes_per_cell):.0f}; "
        f"counts/cell median {np.median(totals):.0f}; "
        f"genes in >= 3 cells {(np.diff(x.tocsc().indptr) >= 3).sum()}"
    )


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(d))
        print(describe(p))
