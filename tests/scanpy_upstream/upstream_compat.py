"""pytest plugin: keep scanpy 1.11.5's test helpers working with the pinned anndata.

Loaded by run_scanpy_tests.py (`-p upstream_compat`, with this directory on
PYTHONPATH) in every run, with or without autozyme. It changes no scanpy code
and no test; it only restores a test-helper name that scanpy's installed
`testing.scanpy._helpers.as_sparse_dask_array` imports from anndata:

* anndata 0.12.x renamed `anndata.tests.helpers.as_sparse_dask_array` to
  `as_sparse_dask_matrix` (same function: a dask array of scipy CSR chunks).
  Without the alias every `dask_array_sparse` parametrization fails with
  ImportError before reaching scanpy.

Must not import scanpy (testing.scanpy._pytest asserts it is not imported yet).
"""

from __future__ import annotations

import anndata.tests.helpers as _ad_helpers

if not hasattr(_ad_helpers, "as_sparse_dask_array") and hasattr(
    _ad_helpers, "as_sparse_dask_matrix"
):
    _ad_helpers.as_sparse_dask_array = _ad_helpers.as_sparse_dask_matrix
