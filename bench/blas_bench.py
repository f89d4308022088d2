"""float32 1024^3 matmul with and without the OpenBLAS preload, and the ratio.

    python -m blockserve.bench.blas_bench

Each side runs in its own process, since the preload must happen before MLX loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = """
import json, time
from blockserve.engine.runtime.blas import active_blas
import mlx.core as mx
a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a, b)
mx.eval(a @ b)
best = min(
    (lambda t0: (mx.eval(a @ b), time.perf_counter() - t0)[1])(time.perf_counter())
    for _ in range(5)
)
print(json.dumps({"blas": active_blas, "gflops": 2 * 1024**3 / best / 1e9}))
"""


def probe(preload: bool) -> dict:
    env = dict(os.environ)
    if preload:
        env.pop("BLOCKSERVE_OPENBLAS", None)
    else:
        env["BLOCKSERVE_OPENBLAS"] = "0"
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    without = probe(False)
    with_ = probe(True)
    print(f"without preload: {without['gflops']:7.1f} GFLOP/s  ({without['blas']})")
    print(f"with preload:    {with_['gflops']:7.1f} GFLOP/s  ({with_['blas']})")
    print(f"speed-up: {with_['gflops'] / without['gflops']:.1f}x")


if __name__ == "__main__":
    main()
