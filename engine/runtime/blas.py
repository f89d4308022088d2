"""Load the system OpenBLAS into the process before MLX, on Linux.

MLX's CPU wheel links a reference BLAS: a float32 1024^3 matmul runs at ~5 GFLOP/s.
Loading an optimized ``libopenblas`` with RTLD_GLOBAL first makes MLX's BLAS symbols
resolve to it, ~30x faster. This must run before the first ``import mlx.core``; the
``engine`` package does it on import.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

log = logging.getLogger(__name__)

# Debian/Ubuntu's libopenblas0-pthread first; any other OpenBLAS build after it.
_CANDIDATES = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: What the process's BLAS is, for the start-up log: set by ``preload_openblas``.
active_blas = "platform default"


def find_openblas() -> str | None:
    override = os.environ.get("BLOCKSERVE_OPENBLAS")
    if override:
        return override
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def preload_openblas() -> str:
    """Preload OpenBLAS once (Linux only); returns a description of the active BLAS.

    ``BLOCKSERVE_OPENBLAS=0`` disables it (for comparisons); a path overrides the search.
    """
    global active_blas
    if not sys.platform.startswith("linux"):
        active_blas = "Accelerate (macOS)" if sys.platform == "darwin" else "platform default"
        return active_blas
    if os.environ.get("BLOCKSERVE_OPENBLAS") == "0":
        active_blas = "MLX reference BLAS (preload disabled by BLOCKSERVE_OPENBLAS=0)"
        return active_blas
    if "mlx.core" in sys.modules:
        active_blas = "MLX reference BLAS (mlx was imported before engine: preload too late)"
        log.warning("mlx.core was imported before engine; OpenBLAS could not be preloaded")
        return active_blas
    path = find_openblas()
    if path is None:
        active_blas = (
            "MLX reference BLAS (slow: install OpenBLAS with "
            "`sudo apt-get install libopenblas0-pthread`)"
        )
        return active_blas
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        active_blas = f"MLX reference BLAS (loading {path} failed: {e})"
        return active_blas
    active_blas = f"OpenBLAS ({os.path.realpath(path)})"
    return active_blas
