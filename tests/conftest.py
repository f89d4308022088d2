import blockserve.engine  # noqa: F401  (first: preloads OpenBLAS before anything imports mlx)
