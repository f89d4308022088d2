"""The MLX runtime: the batch thread, sampling, blocks <-> KV caches, BLAS.

Importing this package first preloads the system OpenBLAS (Linux), so it must be
imported before anything imports ``mlx.core``; ``engine.models`` imports it first too.
"""

import atexit

from blockserve.engine.runtime.blas import preload_openblas

preload_openblas()

from blockserve.engine.runtime.memory import release_freed_memory_to_os  # noqa: E402

release_freed_memory_to_os()

import mlx.core as mx  # noqa: E402  (after the preload, on purpose)

# MLX asks each thread, the main one included, to destroy its streams before the
# interpreter shuts down; its own cleanup would run too late and abort the process.
atexit.register(mx.clear_streams)
