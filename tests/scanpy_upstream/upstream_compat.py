"""pytest plugin: keep scanpy's installed test helpers working with the pinned anndata.

Loaded by run_scanpy_tests.py (`-p upstream_compat`, with this directory on
PYTHONPATH) in every run, with or without autozyme, for every scanpy version. It
changes no scanpy code and no test; it only restores a test-helper name when the
installed anndata lacks it:

* scanpy 1.11.5's `testing.scanpy._helpers.as_sparse_dask_array` imports
  `anndata.tests.helpers.as_sparse_dask_array`, which anndata 0.12.x renamed to
  `as_sparse_dask_matrix` (same function: a dask array of scipy CSR chunks).
  Without the alias every `dask_array_sparse` parametrization fails with
  ImportError before reaching scanpy. (1.11.5 lane: anndata 0.12.19.)
* scanpy 1.12.4 needs nothing: its helpers import `as_sparse_dask_matrix` on
  anndata >= 0.12.6, and anndata 0.13.4 has both names again (`as_sparse_dask_array`
  now builds csr_array chunks), so the condition below is false and the plugin
  does nothing there.

Must not import scanpy (testing.scanpy._pytest asserts it is not imported yet).
"""

from __future__ import annotations

import anndata.tests.helpers as _ad_helpers

if not hasattr(_ad_helpers, "as_sparse_dask_array") and hasattr(
    _ad_helpers, "as_sparse_dask_matrix"
):
    _ad_helpers.as_sparse_dask_array = _ad_helpers.as_sparse_dask_matrix
