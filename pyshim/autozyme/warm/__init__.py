"""The warm worker: a per-user Python process that keeps scanpy's numba-compiled
kernels (pynndescent's nearest-neighbour descent, umap's fuzzy simplicial set and
layout optimisation) compiled across kernel restarts.

numba cannot cache those kernels on disk (pynndescent marks its parallel kernels
``cache=False`` and builds its distance kernels as closures per index; see
docs/warm.md for the measurements), so every fresh process pays 20-100 s of
compilation on its first ``sc.pp.neighbors``. The worker pays it once, then runs
**upstream's own** ``sc.pp.neighbors`` / ``sc.tl.umap`` on a stand-in AnnData that
carries exactly what those functions read, and the caller writes back exactly
what upstream wrote.

- :mod:`.wire` - the worker's key (interpreter, package versions, machine), its
  socket path, and the length-prefixed pickle framing.
- :mod:`.worker` - the worker process (``python -m autozyme.warm.worker``).
- :mod:`.client` - starting the worker in the background, asking it to run a call.
"""
