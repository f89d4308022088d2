"""Getting a model: resolve a name (the built-in model, a demo model, a GGUF file, a
directory or hub id), convert it once where needed, and load it with mlx-lm."""

import blockserve.engine.runtime  # noqa: F401  (first: the BLAS preload before mlx)
