"""``autozyme bench``: upstream scanpy and autozyme side by side, in fresh processes.

The modules import one way, each only from those after it:
  cli.py      the ``autozyme bench`` options and what each form runs
  report.py   ``--report DIR``: every call on tiers and thread counts (charts.py
              draws its PNGs; labels.py holds the names both use)
  calls.py    the preprocessing calls' workers and rows (its numba warm-up also
              runs rank.py's wilcoxon); rank.py, leiden.py, on_dask.py: the
              other per-call runners
  measure.py  data, datasets cache, peak memory, ulp comparison, fresh processes
The workers run as ``python -m autozyme.bench.<module> ...``. Nothing is
imported here, so that a worker's module is loaded once, as ``__main__``.
"""
