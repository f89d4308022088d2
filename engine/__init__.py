"""Everything MLX: models, tokenizers, the batch thread, blocks <-> KV caches, sampling.

Importing this package first preloads the system OpenBLAS (Linux), so it must be
imported before anything imports ``mlx.core``.
"""

import atexit

from blockserve.engine.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402  (after the preload, on purpose)

# MLX asks each thread, the main one included, to destroy its streams before the
# interpreter shuts down; its own cleanup would run too late and abort the process.
atexit.register(mx.clear_streams)
