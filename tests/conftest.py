import blockserve.engine.runtime  # noqa: F401  (first: preloads OpenBLAS before anything imports mlx)
