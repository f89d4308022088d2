"""Speculation's cost at each concurrency, in process (no HTTP), interleaved runs.

    python -m blockserve.bench.spec_overhead [--model demo:tiny] [--streams 1,4,16,32,64]
        [--tokens 256] [--reps 3]

The overhead workload's compare runs each server minutes apart; on a busy machine that
moves its ratios more than the change being measured. This drives the ragged runner
alone (the one place speculation lives) with N greedy streams of M tokens, and runs the
three policies one after another at each level, ``--reps`` times: speculation off, the
fixed price (``STEP_COST_TOKENS``, the policy before issue 33) and the measured price
(``StepCost``). It prints tokens/s (median over the reps), the ratio to off, the step
split of the last rep, and whether every policy gave the same tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import blockserve.engine.runtime  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx
from mlx_lm.generate import generation_stream

from blockserve.engine.models.loader import load_model
from blockserve.engine.runtime import runner as runner_mod
from blockserve.engine.runtime.runner import RaggedRunner

POLICIES = {"off": (False, True), "fixed price": (True, False), "measured": (True, True)}


def run_once(model, prompts: list[list[int]], tokens: int, speculative: bool,
             measured: bool) -> tuple[float, list[list[int]], dict, int]:
    runner_mod.MEASURED_COSTS = measured
    with mx.stream(generation_stream):
        r = RaggedRunner(model, speculative=speculative, max_running=len(prompts))
        uids = r.insert_segments([[p] for p in prompts], max_tokens=[tokens] * len(prompts))
        out: dict[int, list[int]] = {u: [] for u in uids}
        t0 = time.perf_counter()
        while True:
            p, g = r.next()
            if not p and not g:
                break
            for x in g:
                out[x.uid].append(x.token)
        wall = time.perf_counter() - t0
    runner_mod.MEASURED_COSTS = True
    n = sum(len(v) for v in out.values())
    split = {k: 1e3 * v / max(r.times.steps, 1) for k, v in r.times.seconds.items()}
    return n / wall, [out[u] for u in uids], split, r.draft_stats.accepted


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo:tiny")
    p.add_argument("--streams", default="1,4,16,32,64")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    model = load_model(args.model).model
    rng = random.Random(0)
    print("| streams | policy | tok/s (median) | x off | accepted drafts | same tokens | "
          "draft / build / eval / emit ms per step |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.streams.split(",")):
        prompts = [[rng.randrange(1, 1000) for _ in range(args.prompt_tokens)]
                   for _ in range(n)]
        rates: dict[str, list[float]] = {k: [] for k in POLICIES}
        outs, splits, acc = {}, {}, {}
        for _ in range(args.reps):
            for name, (spec, measured) in POLICIES.items():
                rate, toks, split, accepted = run_once(model, prompts, args.tokens, spec,
                                                       measured)
                rates[name].append(rate)
                outs[name], splits[name], acc[name] = toks, split, accepted
        off = statistics.median(rates["off"])
        for name in POLICIES:
            med = statistics.median(rates[name])
            s = splits[name]
            print(f"| {n} | {name} | {med:.0f} | {med / off:.2f} | {acc[name]} | "
                  f"{outs[name] == outs['off']} | "
                  + " / ".join(f"{s.get(k, 0):.2f}" for k in ("draft", "build", "eval", "emit"))
                  + " |", flush=True)


if __name__ == "__main__":
    main()
