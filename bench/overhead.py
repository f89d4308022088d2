"""The overhead regime (issue 33): a near-free model, N concurrent greedy streams.

    blockserve compare --model demo:tiny --workloads overhead \\
        --overhead-streams 1,4,16,32,64 --overhead-tokens 256 [--py-spy 32]

With ``demo:tiny`` a forward costs well under a millisecond, so tokens/s measures what
a server does around it: planning, sampling, drafting, bookkeeping, events, SSE. For
blockserve each level also reports the engine thread's step split, from ``/metrics``
(``blockserve_engine_step_seconds``): per step, in ms, the runner's ``draft``, ``build``
(graphs), ``eval`` (device), ``emit``, the worker's ``engine`` and ``events``; and
``other``, the wall time per step the engine thread spent elsewhere (waiting on its
commands queue, or on the GIL held by the event loop: the scheduler, the API encoders,
HTTP). ``--py-spy N`` samples the blockserve server with py-spy (when installed) during
the N-stream level and reports where the CPU went, by thread and layer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter

PHASES = ("draft", "build", "eval", "emit", "engine", "events")
STEPS = "blockserve_engine_steps_total"
_PHASE = re.compile(r'blockserve_engine_step_seconds_total\{phase="(\w+)"\}')


def step_split(before: dict[str, float], after: dict[str, float], wall: float
               ) -> dict | None:
    """Per step ms by phase between two scrapes; None if the server has no such metric."""
    if STEPS not in after:
        return None
    steps = after[STEPS] - before.get(STEPS, 0)
    if steps <= 0:
        return None
    out = {"steps": steps, "steps_per_s": steps / wall if wall else 0.0, "ms": {}}
    busy = 0.0
    for name, v in after.items():
        m = _PHASE.fullmatch(name)
        if m:
            d = v - before.get(name, 0.0)
            busy += d
            out["ms"][m.group(1)] = 1e3 * d / steps
    out["ms"]["other"] = max(1e3 * (wall - busy) / steps, 0.0)
    out["ms"]["step"] = 1e3 * wall / steps
    return out


def split_header() -> list[str]:
    cols = [*PHASES, "forward", "other", "step"]
    return ["| level | server | steps/s | tokens/step | " + " | ".join(
        f"{c} ms" for c in cols) + " |", "|---" * (len(cols) + 4) + "|"]


def split_row(workload: str, server: str, split: dict, tokens: int) -> str:
    ms = split["ms"]
    cols = [*PHASES, "forward", "other", "step"]
    return (f"| {workload} | {server} | {split['steps_per_s']:.0f} | "
            f"{tokens / split['steps']:.1f} | "
            + " | ".join("-" if c not in ms else f"{ms[c]:.2f}" for c in cols) + " |")


def py_spy_start(pid: int, seconds: float, out: str) -> subprocess.Popen | None:
    """py-spy record of ``pid`` (raw collapsed stacks per thread), or None without it."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    exe = here if os.path.exists(here) else shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)),
                             "-r", "200", "-f", "raw", "--threads", "--nonblocking",
                             "-o", out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


# A sample's layer: the first of these its stack passes through, from the leaf up.
_LAYERS = (("mlx eval", ("mx.eval", "eval (", "tolist")),
           ("runner", ("runtime/runner.py", "runtime/ragged.py", "runtime/lookup.py",
                       "runtime/sampling.py")),
           ("worker", ("runtime/worker.py", "text/streaming.py")),
           ("scheduler", ("scheduler/",)),
           ("server/API", ("server/",)),
           ("aiohttp/asyncio", ("aiohttp", "asyncio")))


def py_spy_summary(path: str) -> list[str]:
    """Samples by thread and layer, as markdown lines."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return []
    by: Counter = Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        thread = "engine thread" if "blockserve-engine" in frames[0] else (
            "main (event loop)" if "MainThread" in frames[0] or "main" in frames[0].lower()
            else "other threads")
        layer = "other"
        for frame in reversed(frames):
            hit = next((name for name, keys in _LAYERS if any(k in frame for k in keys)), None)
            if hit:
                layer = hit
                break
        by[(thread, layer)] += n
        total += n
    if not total:
        return []
    out = ["| thread | layer | share of samples |", "|---|---|---|"]
    for (thread, layer), n in sorted(by.items(), key=lambda kv: -kv[1]):
        out.append(f"| {thread} | {layer} | {100 * n / total:.1f}% |")
    return out
