"""Everything MLX: models, tokenizers, the batch thread, blocks <-> KV caches, sampling.

Importing this package first preloads the system OpenBLAS (Linux), so it must be
imported before anything imports ``mlx.core``.
"""

from engine.blas import preload_openblas

preload_openblas()
